"""`moekit train --task NAME`: every task runs end to end on tiny settings and writes
config.json, metrics.jsonl, specialisation.json, results.json and its weights."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli, tiny_corpus
from safetensors.torch import load_file

import moekit.data
from moekit.train import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = ["--steps", "4", "--eval-every", "2", "--batch-size", "16", "--no-progress"]
CASES = {
    "classify-digits": ["--model", "hmoe", "--router", "softmax_topk"],
    "classify-text": ["--snippet-tokens", "4", "--buckets", "64", "--train-per-domain", "20",
                      "--val-per-domain", "5"],
    "mmoe-synthetic": ["--examples", "200", "--dim", "8", "--correlation", "0.3"],
    "vit": ["--data", "digits", "--layers", "2", "--d-model", "16", "--heads", "2",
            "--mlp-hidden", "16", "--num-experts", "4", "--capacity-factor", "0.75"],
}  # fmt: skip


@pytest.mark.parametrize("task", list(CASES))
def test_task_writes_the_run_files(task, tmp_path, monkeypatch):
    monkeypatch.setattr(moekit.data, "build_corpus", lambda *a, **k: tiny_corpus())
    out = tmp_path / "run"
    code, stdout, stderr = run_cli("train", "--task", task, "--out", str(out), *TINY, *CASES[task])
    assert code == 0, stderr
    assert str(out) in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == task and config["train"]["steps"] == 4
    train = read_metrics(out, split="train")
    val = read_metrics(out, split="val")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in val] == [0, 2, 4]
    metric = "task1_mse" if task == "mmoe-synthetic" else "accuracy"
    assert all(metric in r and "loss" in r for r in val + train)
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == task and results["val_loss"] == val[-1]["loss"]
    table = json.loads((out / "specialisation.json").read_text())
    val_examples = config["data"]["val_examples"]
    for layer in table["layers"]:
        assert len(layer["counts"]) == len(table["labels"])
        total = sum(map(sum, layer["counts"]))
        per_example = 16 if task == "vit" else 1  # ViT: every patch of every image
        tasks = 2 if task == "mmoe-synthetic" else 1  # MMoE: one row per task's gate
        assert total == val_examples * per_example * tasks
    assert table["layers"], "every case above has a gate"
    assert load_file(str(out / "model.safetensors"))


def test_vit_soft_router_and_dense_model(tmp_path):
    for extra in (["--router", "soft", "--slots-per-expert", "2"], ["--model", "dense"]):
        out = tmp_path / extra[1]
        code, _, stderr = run_cli("train", "--task", "vit", "--out", str(out), *TINY,
                                  *CASES["vit"], *extra)  # fmt: skip
        assert code == 0, stderr
    config = json.loads((tmp_path / "soft" / "config.json").read_text())
    assert config["model"]["router"] == "soft" and config["model"]["capacity_factor"] is None
    assert json.loads((tmp_path / "dense" / "specialisation.json").read_text())["layers"] == []


@pytest.mark.parametrize("task", list(CASES))
def test_help_lists_the_tasks_options(task):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("train", "--task", task, "--help")
    assert exit_info.value.code == 0


def test_bad_values_are_one_clear_error(tmp_path):
    code, _, stderr = run_cli("train", "--task", "mmoe-synthetic", "--correlation", "2",
                              "--out", str(tmp_path / "a"), *TINY)  # fmt: skip
    assert code == 2 and "correlation (2.0) must be in [-1, 1]" in stderr
    code, _, stderr = run_cli("train", "--task", "classify-digits", "--router", "soft",
                              "--out", str(tmp_path / "b"), *TINY)  # fmt: skip
    assert code == 2 and "soft" in stderr
    code, _, stderr = run_cli("train", "--task", "vit", "--patch", "3", "--data", "digits",
                              "--out", str(tmp_path / "c"), *TINY)  # fmt: skip
    assert code == 2 and "patch_size (3) must divide image_size (8)" in stderr
    code, _, stderr = run_cli("train", "--task", "vit", "--threads", "0", *TINY)
    assert code == 2 and "--threads (0) must be >= 1" in stderr


def test_capacity_sweep_of_a_trained_vit_run(tmp_path):
    from moekit.tasks.capacity import capacity_sweep

    out = tmp_path / "vit"
    code, _, stderr = run_cli("train", "--task", "vit", "--out", str(out), *TINY, *CASES["vit"],
                              "--capacity-factor", "none")  # fmt: skip
    assert code == 0, stderr
    rows = capacity_sweep(out, [0.25, 100.0])
    by_key = {(r["capacity_factor"], r["priority"]): r for r in rows}
    assert len(rows) == 4
    assert by_key[(0.25, "batch")]["dropped_fraction"] > 0.5
    # With room for every token, both orders keep everything and agree.
    roomy = by_key[(100.0, "batch")], by_key[(100.0, "position")]
    assert roomy[0]["dropped_fraction"] == roomy[1]["dropped_fraction"] == 0
    assert roomy[0]["accuracy"] == roomy[1]["accuracy"]
