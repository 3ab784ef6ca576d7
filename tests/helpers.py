"""Small builders shared by the MoE tests."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import warnings

import torch
from torch import nn

from moekit import MoE, MoEConfig


def make_moe(seed: int = 0, **overrides) -> MoE:
    """A tiny MoE whose every parameter and buffer is random (so every gradient is non-trivial).

    Defaults: D=8, F=6, E=4, top_k=2; settings-without-effect warnings are silenced here
    (test_config.py checks them).
    """
    settings = dict(d_model=8, d_hidden=6, num_experts=4, top_k=2)
    settings.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        config = MoEConfig(**settings)
    torch.manual_seed(seed)
    moe = MoE(config)
    randomize(moe)
    return moe


@torch.no_grad()
def randomize(moe: MoE) -> None:
    """Replace the zero/one initialisations (noise weight, sigmoid bias, soft scale)."""
    router = moe.router
    for name, param in router.named_parameters():
        if name == "scale":
            param.fill_(2.0)
        else:
            param.normal_(0.0, 0.6)
    if hasattr(router, "bias"):
        router.bias.normal_(0.0, 0.1)
    for module in moe.modules():
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, module.in_features**-0.5)


def tokens(num_tokens: int, d_model: int = 8, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    """Standard normal (num_tokens, d_model) input."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, d_model, generator=generator, dtype=dtype)


# A micro language model trained for a few steps from the command line (moekit train).
MICRO = [
    "--model.vocab_size", "384", "--model.d_model", "32", "--model.num_layers", "2",
    "--model.num_heads", "2", "--model.num_kv_heads", "1", "--model.max_seq_len", "32",
    "--model.moe.d_hidden", "32", "--model.num_experts", "4",
    "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--eval-every", "2",
    "--train.eval_batches", "2", "--no-progress",
]  # fmt: skip


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run `moekit ARGS...` in-process; returns (exit code, stdout, stderr)."""
    from moekit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


# A tiny language model with an MoE in every layer, for the training-step oracles
# (gradient accumulation, balance scopes, parallel layouts).
LM_VOCAB, LM_LENGTH = 40, 6
# Router settings whose routing is deterministic in training (no noise).
ROUTER_SETTINGS = {
    "softmax_topk": {},
    "sigmoid_topk": dict(router="sigmoid_topk", num_groups=2, topk_groups=1, routed_scaling=2.5),
    "switch": dict(router="switch", top_k=1, jitter_eps=0.0),
    "top_p": dict(router="top_p", top_p=0.6),
}


def lm_config(**moe):
    """ModelConfig of 2 MoE layers (d_model 16, 4 experts of width 12, top-2) and moe's
    MoEConfig overrides."""
    from moekit.models import ModelConfig

    settings = dict(d_model=16, d_hidden=12, num_experts=4, top_k=2) | moe
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return ModelConfig(
            vocab_size=LM_VOCAB,
            d_model=16,
            num_layers=2,
            num_heads=2,
            max_seq_len=LM_LENGTH,
            moe=MoEConfig(**settings),
        )


def seeded_lm(config, seed: int = 0):
    """Transformer(config) after torch.manual_seed(seed), with random selection biases
    (so the sigmoid router's selection and scores disagree)."""
    from moekit.models import Transformer

    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor) and not isinstance(bias, nn.Parameter):
                bias.normal_(0.0, 0.2)
    return model


def lm_batch(rows: int = 8, seed: int = 1, ignore: bool = False):
    """(inputs, targets) of rows x LM_LENGTH random tokens; with ignore, a different number
    of targets per row is -100 (not counted by the loss)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, LM_VOCAB, (rows, LM_LENGTH), generator=generator)
    targets = torch.randint(0, LM_VOCAB, (rows, LM_LENGTH), generator=generator)
    if ignore:
        for row in range(rows):
            targets[row, : row % 4 + (3 if row < rows // 2 else 0)] = -100
    return inputs, targets


# torchrun's wall-clock limit in the multi-process training tests (a hung rank fails the
# test instead of the suite).
HARD_LIMIT_S = 240


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """`python -m moekit ARGS` in 2 processes under torchrun (standalone, this machine)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "moekit", *args]  # fmt: skip
    return subprocess.run(
        command, capture_output=True, text=True, timeout=HARD_LIMIT_S, check=False
    )
