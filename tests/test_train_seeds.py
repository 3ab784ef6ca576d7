"""`moekit train --seeds N`: a comparison folder per seed, a summary whose numbers are the
seeds' comparison.json numbers (mean, sample std), the claim per seed, and --resume."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest
from helpers import MICRO, run_cli

from moekit.train.compare import claim_holds, read_comparison
from moekit.train.seeds import FIGURES, figures, format_summary, summarize_seeds

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def seeds_job(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("seeds") / "job"
    code, stdout, stderr = run_cli(
        "train", "--seeds", "2", "--data", str(text_file), "--out", str(out), *MICRO
    )
    assert code == 0, stderr
    return out, stdout


def test_each_seed_is_a_comparison_folder_trained_with_its_seed(seeds_job):
    out, _ = seeds_job
    assert not (out / "moe").exists()  # one seed keeps OUT/moe, OUT/dense; several do not
    for seed in (0, 1):
        for run in ("moe", "dense"):
            config = json.loads((out / f"seed{seed}" / run / "config.json").read_text())
            assert config["train"]["seed"] == seed
            state = json.loads(
                (out / f"seed{seed}" / run / "checkpoint/trainer_state.json").read_text()
            )
            assert state["loader"]["seed"] == seed  # the seed sets the data order too
    # Same tokens, different initialisation and batches: different curves.
    assert (out / "seed0/moe/data/train.bin").read_bytes() == (
        out / "seed1/moe/data/train.bin"
    ).read_bytes()
    numbers = [json.loads((out / f"seed{s}/comparison.json").read_text()) for s in (0, 1)]
    assert numbers[0]["moe"]["evals"] != numbers[1]["moe"]["evals"]


def test_summary_holds_the_seeds_numbers_and_their_mean_and_std(seeds_job):
    out, stdout = seeds_job
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    numbers = {s: json.loads((out / f"seed{s}/comparison.json").read_text()) for s in (0, 1)}
    for seed, n in numbers.items():
        per_seed = summary["per_seed"][str(seed)]
        assert per_seed["moe_final_val_loss"] == n["moe"]["final_val_loss"]
        assert per_seed["dense_final_val_loss"] == n["dense"]["final_val_loss"]
        assert per_seed["loss_gap"] == n["loss_gap"]
        assert per_seed["steps_to_dense_loss"] == n["steps_to_dense_loss"]
        assert per_seed["speedup"] == n["speedup"]
        assert per_seed["wall_clock_speedup"] == n["wall_clock_speedup"]
        assert per_seed["moe_tokens_per_s"] == n["moe"]["tokens_per_s"]
        assert per_seed["dense_tokens_per_s"] == n["dense"]["tokens_per_s"]
        assert (
            per_seed["tokens_per_s_ratio"] == n["moe"]["tokens_per_s"] / n["dense"]["tokens_per_s"]
        )
        assert per_seed["moe_train_seconds"] == n["moe"]["train_seconds"]
        assert per_seed["dense_train_seconds"] == n["dense"]["train_seconds"]
    for key, _, _ in FIGURES:
        values = [summary["per_seed"][s][key] for s in ("0", "1")]
        values = [v for v in values if v is not None]
        aggregate = summary["aggregate"][key]
        assert aggregate["n"] == len(values)
        if len(values) == 2:
            assert aggregate["mean"] == pytest.approx(statistics.mean(values))
            assert aggregate["std"] == pytest.approx(statistics.stdev(values))
    fails = [s for s in (0, 1) if not claim_holds(read_comparison(out / f"seed{s}"))]
    assert summary["claim_fails"] == fails
    # Each seed's table, then the summary.
    assert stdout.count("final validation loss  ") == 2
    assert "over 2 seeds (0, 1): mean +- std" in stdout
    assert "final validation loss, MoE" in stdout and "wall-clock speed-up" in stdout
    assert ("holds in every seed" in stdout) == (not fails)


def test_summary_names_the_seeds_where_the_claim_fails(seeds_job):
    out, _ = seeds_job
    comparisons = {s: read_comparison(out / f"seed{s}") for s in (0, 1)}
    comparisons[1].speedup = 0.9  # the MoE needed more steps than the dense model
    summary = summarize_seeds(comparisons)
    assert 1 in summary.claim_fails
    summary.job_seconds, summary.peak_memory_gb = 1.0, 0.5
    assert "fails in seed" in format_summary(summary)
    assert summary.per_seed[1] == figures(comparisons[1])


def test_resume_continues_the_unfinished_seeds(seeds_job, tmp_path):
    out, _ = seeds_job
    job = tmp_path / "job"
    shutil.copytree(out, job)
    shutil.rmtree(job / "seed1")  # stopped before seed 1 started
    (job / "summary.json").unlink()
    code, stdout, stderr = run_cli("train", "--resume", "--out", str(job), "--no-progress")
    assert code == 0, stderr
    assert "seed 1 (2 of 2)" in stdout and "seed 0 (" not in stdout  # seed 0 is read back
    before = json.loads((out / "summary.json").read_text())["per_seed"]
    after = json.loads((job / "summary.json").read_text())["per_seed"]
    for key in ("moe_final_val_loss", "dense_final_val_loss", "loss_gap", "steps_to_dense_loss"):
        assert after["0"][key] == before["0"][key] and after["1"][key] == before["1"][key]


def test_seeds_needs_the_comparison(tmp_path):
    code, _, err = run_cli("train", "--seeds", "2", "--no-compare", "--out", str(tmp_path))
    assert code == 2 and "--seeds runs the comparison" in err
    code, _, err = run_cli("train", "--seeds", "0", "--out", str(tmp_path))
    assert code == 2 and "--seeds (0) must be >= 1" in err
