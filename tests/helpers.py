"""Small helpers shared by the tests: the MoE layer builder (make_moe), inputs, the
command line in-process and under torchrun, training texts and corpora."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import subprocess
import sys
import textwrap
import warnings

import torch
from builders import LM_LENGTH, LM_VOCAB
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


def write_text(path):
    """A small training text: Python source from the standard library."""
    path.write_text(inspect.getsource(json.decoder) + inspect.getsource(textwrap), encoding="utf-8")
    return path


def tiny_corpus():
    """Two domains (code, prose) of 3 training and 1 validation documents each."""
    from moekit.data import Corpus, Document

    def docs(domain: str, text: str, count: int) -> list[Document]:
        return [Document(id=f"{domain}/{i}", domain=domain, text=text) for i in range(count)]

    train = docs("code", "def f(x):\n    return x + 1\n", 3) + docs(
        "prose", "The quick brown fox. ", 3
    )
    validation = docs("code", "class A:\n    pass\n", 1) + docs("prose", "A lazy dog sleeps. ", 1)
    return Corpus(train=train, validation=validation)


def write_domain_corpus(path) -> None:
    """A .jsonl of three domains, 20 documents each (so each has validation documents)."""
    from moekit.data import generate_problems

    code = inspect.getsource(textwrap).split("\ndef ")
    prose = (textwrap.__doc__ or "") + (json.__doc__ or "")
    lines = []
    for i in range(20):
        lines.append({"text": "def " + code[1 + i % (len(code) - 1)], "domain": "code"})
        lines.append({"text": prose[i * 40 : i * 40 + 400] or prose[:400], "domain": "prose"})
        problem = generate_problems(1, seed=i)[0]
        lines.append({"text": problem.question + "\n" + problem.solution, "domain": "math"})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")


def micro_comparison(tmp_path_factory):
    """`moekit train` of MICRO on write_domain_corpus's three domains (the micro MoE and its
    dense twin); returns the comparison folder."""
    folder = tmp_path_factory.mktemp("report")
    corpus = folder / "corpus.jsonl"
    write_domain_corpus(corpus)
    code, _, stderr = run_cli("train", "--data", str(corpus), "--out", str(folder / "cmp"), *MICRO)
    assert code == 0, stderr
    return folder / "cmp"


def folder_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder (one file or shards), by name."""
    from safetensors.torch import load_file

    from moekit.interop.hf import weight_files

    tensors = {}
    for file in set(weight_files(folder).values()):
        tensors |= load_file(file)
    return tensors
