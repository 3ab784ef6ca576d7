"""Small builders shared by the MoE tests."""

from __future__ import annotations

import contextlib
import io
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
