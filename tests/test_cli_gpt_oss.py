"""The gpt_oss_tiny preset through the command line on a micro size: `moekit train`
against its dense twin, `moekit report`, `moekit generate` (eager and compiled, equal to
the library), and `moekit convert` to a folder transformers reads with equal logits."""

from __future__ import annotations

import inspect
import json
import textwrap

import pytest
import torch
from helpers import run_cli

from moekit.data import Tokenizer
from moekit.generate import generate
from moekit.train import load_trained_model

pytestmark = pytest.mark.usefixtures("one_thread")

# gpt_oss_tiny shrunk (its 4 layers kept, so layers 0 and 2 slide), for a few steps.
MICRO_GPT_OSS = [
    "--preset", "gpt_oss_tiny",
    "--model.vocab_size", "384", "--model.d_model", "32", "--model.num_heads", "2",
    "--model.num_kv_heads", "1", "--model.max_seq_len", "32", "--model.moe.d_hidden", "32",
    "--model.num_experts", "8", "--model.sliding_window", "8",
    "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--eval-every", "2",
    "--train.eval_batches", "2", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt_oss")
    text = folder / "source.txt"
    text.write_text(inspect.getsource(json.decoder) + inspect.getsource(textwrap))
    out = folder / "cmp"
    code, stdout, stderr = run_cli("train", "--data", str(text), "--out", str(out), *MICRO_GPT_OSS)
    assert code == 0, stderr
    return out, stdout


def test_trains_against_its_dense_twin(comparison):
    out, stdout = comparison
    assert "final validation loss" in stdout
    moe, dense = load_trained_model(out / "moe"), load_trained_model(out / "dense")
    assert moe.config.attention == dense.config.attention == "sinks"
    assert moe.config.sliding_layers == [0, 2] and moe.config.moe.router_bias
    assert dense.config.moe is None and dense.config.activation == "swiglu_clamped"
    results = json.loads((out / "comparison.json").read_text())
    assert results["steps"] == 6
    assert results["moe"]["active_params"] > results["dense"]["active_params"]  # the routers


def test_report_handles_it(comparison):
    code, stdout, stderr = run_cli("report", str(comparison[0]), "--tokens-per-domain", "128")
    assert code == 0, stderr
    assert (comparison[0] / "report.html").is_file()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_generate_greedy_equals_the_library(comparison, compiled):
    run, prompt = comparison[0] / "moe", "def decode(self, s"
    args = ["--prompt", prompt, "--temperature", "0", "--max-new-tokens", "8"]
    code, stdout, _ = run_cli("generate", str(run), *args, *(["--compile"] if compiled else []))
    assert code == 0
    model, tokenizer = load_trained_model(run), Tokenizer.load(run)
    result = generate(
        model,
        torch.tensor([tokenizer.encode(prompt)]),
        max_new_tokens=8,
        temperature=0.0,
        eos_token_id=tokenizer.eot_id,
    )
    ids = result.tokens_BN[0].tolist()
    ids = ids[: ids.index(tokenizer.eot_id)] if tokenizer.eot_id in ids else ids
    assert stdout == prompt + tokenizer.decode(ids) + "\n"


def test_converts_to_a_folder_transformers_reads(comparison, tmp_path):
    transformers = pytest.importorskip("transformers")
    run = comparison[0] / "moe"
    assert run_cli("convert", str(run), str(tmp_path / "hf"))[0] == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens_BT = torch.randint(0, 384, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_trained_model(run)(tokens_BT).logits
        torch.testing.assert_close(theirs(tokens_BT).logits, expected, atol=1e-4, rtol=0)
