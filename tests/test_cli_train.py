"""`moekit train` end to end on a micro config: the comparison table, comparison.json and
loss.png, a line per evaluation; resume; prepare + --data .bin; `moekit eval` equals the
table's final loss; `moekit generate` equals the library."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import MICRO, run_cli

from moekit.data import Tokenizer
from moekit.generate import generate
from moekit.train import evaluate_run, load_trained_model, read_metrics, steps_to_reach
from moekit.train.compare import seconds_at_step

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("compare")
    code, stdout, stderr = run_cli("train", "--data", str(text_file), "--out", str(out), *MICRO)
    assert code == 0, stderr
    return out, stdout


def test_comparison_prints_the_table_and_writes_json_and_plot(comparison):
    out, stdout = comparison
    for row in (
        "total parameters",
        "active parameters per token",
        "final validation loss",
        "steps to dense final val loss",
        "training tokens/s",
        "speed-up",
        "loss gap (dense - MoE final)",
        "peak memory",
    ):
        assert row in stdout
    numbers = json.loads((out / "comparison.json").read_text())
    assert numbers["steps"] == 6 and numbers["tokens_per_step"] == 4 * 32
    moe, dense = numbers["moe"], numbers["dense"]
    # The twin has the MoE's active FFN width (top_k * d_hidden = 64): same active count
    # minus the routers (2 layers x E 4 x D 32 = 256 parameters).
    assert moe["active_params"] - dense["active_params"] == 256
    assert moe["total_params"] > moe["active_params"]
    assert [s for s, _ in moe["evals"]] == [s for s, _ in dense["evals"]] == [0, 2, 4, 6]
    assert dense["final_val_loss"] == dense["evals"][-1][1]
    assert numbers["loss_gap"] == dense["final_val_loss"] - moe["final_val_loss"]
    assert numbers["peak_memory_gb"] > 0 and numbers["job_seconds"] > 0
    assert numbers["steps_to_dense_loss"] == steps_to_reach(moe["evals"], dense["final_val_loss"])
    if numbers["steps_to_dense_loss"] is not None:  # the stopwatch race, from the step times
        steps = [128 / r["tokens_per_s"] for r in read_metrics(out / "moe", "train")]
        seconds = seconds_at_step(steps, numbers["steps_to_dense_loss"])
        assert numbers["seconds_to_dense_loss"] == pytest.approx(seconds)
        assert numbers["wall_clock_speedup"] == pytest.approx(dense["train_seconds"] / seconds)
        assert "wall-clock speed-up" in stdout
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_both_runs_saw_the_same_tokens(comparison):
    out, _ = comparison
    assert (out / "moe" / "tokenizer.json").read_bytes() == (
        out / "dense" / "tokenizer.json"
    ).read_bytes()
    assert (out / "moe/data/train.bin").read_bytes() == (out / "dense/data/train.bin").read_bytes()
    # Step 0 evaluations differ (different models) but run on the same fixed batches.
    assert len(read_metrics(out / "moe", "train")) == len(read_metrics(out / "dense", "train")) == 6


def test_seconds_at_step_sums_the_step_times_with_a_fraction_of_the_next():
    step_seconds = [5.0, 1.0, 1.0, 2.0]  # the first step held a compile
    assert seconds_at_step(step_seconds, 0.0) == 0.0
    assert seconds_at_step(step_seconds, 2.0) == 6.0
    assert seconds_at_step(step_seconds, 3.5) == 8.0  # 7 + half of the fourth step
    assert seconds_at_step(step_seconds, 4.0) == 9.0
    assert seconds_at_step(step_seconds, 4.5) is None  # past the log


def test_steps_to_reach_interpolates_between_evaluations():
    evals = [(0, 8.0), (10, 6.0), (20, 5.0)]
    assert steps_to_reach(evals, 5.5) == 15.0  # halfway from 6.0 to 5.0
    assert steps_to_reach(evals, 9.0) == 0.0
    assert steps_to_reach(evals, 4.0) is None


def test_resume_of_a_finished_comparison_trains_no_further(comparison):
    out, stdout = comparison
    before = (out / "moe" / "checkpoint" / "model.safetensors").read_bytes()
    code, again, _ = run_cli("train", "--resume", "--out", str(out), "--no-progress")
    assert code == 0
    assert (out / "moe" / "checkpoint" / "model.safetensors").read_bytes() == before
    assert not any(line.startswith("step ") for line in again.splitlines())  # no evaluation
    final = [line for line in stdout.splitlines() if line.startswith("final validation loss")]
    assert final == [line for line in again.splitlines() if line.startswith("final validation")]


def test_eval_prints_the_runs_validation_loss(comparison):
    out, _ = comparison
    code, stdout, _ = run_cli("eval", str(out / "moe"), "--max-batches", "3")
    assert code == 0
    expected = evaluate_run(out / "moe", max_batches=3)
    assert f"validation loss {expected.loss:.4f}, perplexity {expected.perplexity:.2f}" in stdout


def test_eval_equals_the_tables_final_validation_loss(comparison):
    # One definition: the run's validation batches, trainer.evaluate, the run's dtype.
    out, stdout = comparison
    numbers = json.loads((out / "comparison.json").read_text())
    code, evaluated, _ = run_cli("eval", str(out))
    assert code == 0
    for run in ("moe", "dense"):
        loss = numbers[run]["final_val_loss"]
        assert evaluate_run(out / run).loss == loss
        assert f"{out / run}: validation loss {loss:.4f}" in evaluated
    moe, dense = numbers["moe"]["final_val_loss"], numbers["dense"]["final_val_loss"]
    assert f"final validation loss{moe:>25.4f}{dense:>14.4f}" in stdout


def test_eval_equals_the_final_loss_under_bfloat16_autocast_too(tmp_path, text_file):
    run = tmp_path / "bf16"
    args = ["--no-compare", "--train.dtype", "bfloat16", "--data", str(text_file)]
    code, _, err = run_cli("train", *args, "--out", str(run), *MICRO, "--steps", "2")
    assert code == 0, err
    assert evaluate_run(run).loss == read_metrics(run, "val")[-1]["loss"]


def test_eval_of_a_comparison_folder_covers_both_runs(comparison, text_file):
    out, _ = comparison
    code, stdout, _ = run_cli("eval", str(out), "--data", str(text_file), "--max-batches", "2")
    assert code == 0
    assert stdout.count("validation loss") == 2


def test_eval_on_a_built_in_corpus_reads_its_validation_split(comparison):
    """--data builtin:NAME evaluates on that corpus's validation documents, tokenised with
    the run's tokenizer: the same loss as those documents written to a file."""
    from moekit.data import build_builtin_corpus

    out, _ = comparison
    validation = build_builtin_corpus("default").validation
    text = out / "default-validation.jsonl"
    with text.open("w", encoding="utf-8") as file:
        for document in validation:
            file.write(json.dumps({"text": document.text}) + "\n")
    builtin = evaluate_run(out / "moe", data="builtin:default", max_batches=2)
    from_file = evaluate_run(out / "moe", data=text, max_batches=2)
    assert not builtin.run_batches
    assert builtin.num_tokens == from_file.num_tokens > 0
    assert builtin.loss == pytest.approx(from_file.loss, rel=1e-6)
    code, _, err = run_cli("eval", str(out / "moe"), "--data", "builtin:nothing")
    assert code != 0 and "unknown built-in corpus 'builtin:nothing'" in err


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_generate_greedy_equals_the_library(comparison, compiled):
    run = comparison[0] / "moe"
    prompt = "def decode(self, s"
    code, stdout, _ = run_cli(
        "generate",
        str(run),
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
        *(["--compile"] if compiled else []),
    )
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


def test_generate_shows_experts_per_layer(comparison):
    code, stdout, _ = run_cli(
        "generate",
        str(comparison[0] / "moe"),
        "--prompt",
        "x = ",
        "--max-new-tokens",
        "3",
        "--show-experts",
        "--top-k",
        "5",
    )
    assert code == 0
    assert "experts per MoE layer" in stdout and "L0:" in stdout and "L1:" in stdout


def test_prepare_then_train_one_model_on_the_bin(tmp_path, text_file):
    code, _, err = run_cli(
        "prepare",
        str(text_file),
        "--out",
        str(tmp_path / "tokens"),
        "--vocab-size",
        "384",
    )
    assert code == 0, err
    run = tmp_path / "run"
    code, stdout, err = run_cli(
        "train",
        "--no-compare",
        "--data",
        str(tmp_path / "tokens/train.bin"),
        "--out",
        str(run),
        *MICRO,
    )
    assert code == 0, err
    assert "6 steps, final validation loss" in stdout
    # One line per evaluation, the model's own (no comparison), at steps 0, 2, 4, 6.
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    losses = [r["loss"] for r in read_metrics(run, "val")]
    assert lines[0] == f"step 0/6  val loss {losses[0]:.3f}"
    assert lines[1].startswith(f"step 2/6  val loss {losses[1]:.3f}  tok/s ")
    assert len(lines) == 4
    assert (run / "checkpoint" / "model.safetensors").exists()


def test_errors_are_one_line_naming_the_problem(tmp_path):
    code, _, err = run_cli("eval", str(tmp_path))
    assert code == 2 and "is not a moekit run directory" in err
    code, _, err = run_cli("train", "--resume", "--no-progress")
    assert code == 2 and "--resume needs --out" in err
    code, _, err = run_cli("train", "--preset", "tiny_dense", "--no-progress")
    assert code == 2 and "preset 'tiny_dense' is dense" in err
    # Sharded checkpoints are written by one process per rank (torchrun).
    code, _, err = run_cli("train", "--checkpoint.format", "sharded", "--no-progress")
    assert code == 2 and "--checkpoint.format sharded needs one process per rank" in err
