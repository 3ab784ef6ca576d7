"""`moekit upcycle` and `moekit add-experts` end to end on micro runs: the new run's step-0
validation loss equals the source run's final one (the function is unchanged), training
continues with `--steps` or `moekit train --resume`, and bad input is one clear error."""

from __future__ import annotations

import inspect
import json
import textwrap

import pytest
from helpers import run_cli

from moekit.train import load_trained_model, read_metrics

MICRO_DENSE = [
    "--preset", "tiny_dense", "--no-compare", "--model.vocab_size", "320", "--model.d_model", "32",
    "--model.num_layers", "2", "--model.num_heads", "2", "--model.num_kv_heads", "1",
    "--model.max_seq_len", "32", "--model.d_hidden", "64", "--steps", "4", "--batch-size", "4",
    "--seq-len", "32", "--eval-every", "2", "--train.eval_batches", "2", "--no-progress",
]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("surgery")
    text = root / "source.txt"
    text.write_text(inspect.getsource(json.decoder) + inspect.getsource(textwrap), encoding="utf-8")
    code, _, stderr = run_cli(
        "train", "--data", str(text), "--out", str(root / "dense"), *MICRO_DENSE
    )
    assert code == 0, stderr
    return root / "dense"


def val_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, split="val")}


def test_upcycle_writes_a_run_that_starts_from_the_dense_function(dense_run, tmp_path):
    out = tmp_path / "moe"
    code, stdout, stderr = run_cli(
        "upcycle", str(dense_run), "--out", str(out), "--num-experts", "4", "--top-k", "2",
        "--steps", "3", "--train.eval_every", "1", "--no-progress",
    )  # fmt: skip
    assert code == 0, stderr
    assert "computes the dense model's function" in stdout and "3 steps" in stdout
    losses = val_losses(out)
    assert losses[0] == pytest.approx(val_losses(dense_run)[4], abs=1e-5)
    assert sorted(losses) == [0, 1, 2, 3]
    model = load_trained_model(out)
    assert (model.config.moe.num_experts, model.config.moe.top_k) == (4, 2)
    assert model.config.moe.d_hidden == 64


def test_upcycle_without_steps_writes_step_zero_and_train_resume_continues(dense_run, tmp_path):
    out = tmp_path / "moe"
    code, stdout, stderr = run_cli(
        "upcycle", str(dense_run), "--out", str(out), "--num-experts", "2", "--router", "switch",
        "--top-k", "1",
    )  # fmt: skip
    assert code == 0, stderr
    assert "note: at step 0 the MoE differs" in stdout and "--resume" in stdout
    code, stdout, stderr = run_cli("train", "--resume", "--out", str(out), "--no-progress")
    assert code == 0, stderr
    assert "4 steps" in stdout  # the dense run's budget


def test_add_experts_keeps_the_loss_and_then_trains(dense_run, tmp_path):
    moe = tmp_path / "moe"
    assert run_cli("upcycle", str(dense_run), "--out", str(moe), "--num-experts", "2",
                   "--steps", "2", "--no-progress")[0] == 0  # fmt: skip
    grown = tmp_path / "grown"
    code, stdout, stderr = run_cli(
        "add-experts", str(moe), "--out", str(grown), "--num", "2", "--steps", "2", "--no-progress"
    )
    assert code == 0, stderr
    assert "now 4 experts per MoE layer, top_k 4, width 32" in stdout
    assert val_losses(grown)[0] == pytest.approx(val_losses(moe)[2], abs=1e-5)


def test_add_experts_offset_on_a_sigmoid_run(dense_run, tmp_path):
    moe = tmp_path / "moe"
    assert run_cli("upcycle", str(dense_run), "--out", str(moe), "--num-experts", "2",
                   "--router", "sigmoid_topk", "--top-k", "1", "--steps", "2", "--no-progress")[0] == 0  # fmt: skip
    grown = tmp_path / "grown"
    code, stdout, stderr = run_cli(
        "add-experts", str(moe), "--out", str(grown), "--num", "3", "--bias-update-rate", "0.5",
        "--steps", "2", "--no-progress",
    )  # fmt: skip
    assert code == 0, stderr
    assert "now 5 experts per MoE layer, top_k 1" in stdout
    assert val_losses(grown)[0] == val_losses(moe)[2]
    assert load_trained_model(grown).config.moe.bias_update_rate == 0.5


def test_errors_name_the_problem(dense_run, tmp_path):
    code, _, stderr = run_cli(
        "add-experts", str(dense_run), "--out", str(tmp_path / "x"), "--num", "2"
    )
    assert code == 2 and "moekit add-experts: error: the model is dense; upcycle it first" in stderr
    code, _, stderr = run_cli(
        "upcycle", str(dense_run), "--out", str(tmp_path / "y"), "--top-k", "9"
    )
    assert code == 2 and "top_k (9) must be <= num_experts (8)" in stderr
    code, _, stderr = run_cli("upcycle", str(dense_run), "--out", str(dense_run))
    assert code == 2 and "already holds a trained run" in stderr
    code, _, stderr = run_cli("upcycle", str(tmp_path / "none"), "--out", str(tmp_path / "z"))
    assert code == 2 and "is not a moekit run directory" in stderr
    code, _, stderr = run_cli(
        "upcycle", "--train.nope", "1", str(dense_run), "--out", str(tmp_path / "w")
    )
    assert code == 2 and "unknown setting --train.nope" in stderr
    code, _, stderr = run_cli(
        "upcycle", str(dense_run), "--out", str(tmp_path / "v"), "--model.top_k", "1"
    )
    assert code == 2 and "only --train.FIELD overrides apply here" in stderr
