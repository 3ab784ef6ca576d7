"""The deepseek_v3_tiny preset through the CLI: `moekit train` against its dense twin (MLA
kept, MoE layers replaced), `moekit report` and `moekit generate` read the runs, and the
trained model converts to transformers' DeepseekV3ForCausalLM with equal logits."""

from __future__ import annotations

import inspect
import json
import textwrap

import pytest
import torch
from helpers import run_cli

from moekit.train import load_trained_model

pytestmark = pytest.mark.usefixtures("one_thread")

# deepseek_v3_tiny made micro: fewer layers (the first still dense), a small vocabulary,
# a few steps; the latent attention, the sigmoid groups and the shared expert stay.
MICRO_DEEPSEEK = [
    "--preset", "deepseek_v3_tiny", "--model.vocab_size", "384", "--model.d_model", "32",
    "--model.num_layers", "2", "--model.max_seq_len", "32",
    "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--eval-every", "2",
    "--train.eval_batches", "2", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deepseek")
    text = folder / "source.txt"
    text.write_text(inspect.getsource(json.decoder) + inspect.getsource(textwrap), encoding="utf-8")
    code, stdout, stderr = run_cli(
        "train", "--data", str(text), "--out", str(folder / "cmp"), *MICRO_DEEPSEEK
    )
    assert code == 0, stderr
    return folder / "cmp", stdout


def test_train_compares_against_a_dense_twin_with_the_same_attention(comparison):
    out, stdout = comparison
    assert "final validation loss" in stdout
    moe = load_trained_model(out / "moe")
    dense = load_trained_model(out / "dense")
    assert moe.config.attention == dense.config.attention == "mla"
    assert moe.config.moe.router == "sigmoid_topk" and dense.config.moe is None
    # the aux-loss-free balancing moved the selection biases of the MoE layer
    assert moe.layers[1].ffn.router.bias.abs().sum() > 0
    numbers = json.loads((out / "comparison.json").read_text())
    assert numbers["steps"] == 4


def test_report_and_generate_read_the_runs(comparison):
    out, _ = comparison
    code, _, stderr = run_cli("report", str(out), "--tokens-per-domain", "128")
    assert code == 0, stderr
    assert (out / "report.html").is_file()
    code, stdout, stderr = run_cli(
        "generate", str(out / "moe"), "--prompt", "x = ", "--max-new-tokens", "3",
        "--temperature", "0", "--show-experts",
    )  # fmt: skip
    assert code == 0, stderr
    assert "experts per MoE layer" in stdout


def test_trained_run_converts_to_transformers(comparison, tmp_path):
    transformers = pytest.importorskip("transformers")
    out, _ = comparison
    code, _, stderr = run_cli("convert", str(out / "moe"), str(tmp_path / "hf"))
    assert code == 0, stderr
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "DeepseekV3ForCausalLM"
    ours = load_trained_model(out / "moe").eval()
    tokens_BT = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(tokens_BT).logits, ours(tokens_BT).logits, atol=1e-4, rtol=0
        )
