"""Training health: a non-finite step stops the run (naming the step, layer and expert) and
never reaches a checkpoint, or is skipped and counted; routing health judged on counts and
warned about once per condition at evaluations."""

from __future__ import annotations

import hashlib
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import MICRO, run_cli

from moekit import MoEConfig
from moekit.models import ModelConfig
from moekit.train import TrainConfig, Trainer, prepare_run_data, read_metrics
from moekit.train.health import (
    COLLAPSE_SPREAD,
    NonFiniteStepError,
    RoutingWatch,
    routing_health,
    spread,
)
from moekit.train.run import LOCAL_RUN

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(run_dir, text_file, **overrides) -> Trainer:
    model = ModelConfig(
        vocab_size=384,
        d_model=32,
        num_layers=2,
        num_heads=2,
        max_seq_len=32,
        moe=MoEConfig(d_model=32, d_hidden=32, num_experts=4, top_k=2),
    )
    settings = dict(steps=6, batch_size=4, seq_len=32, eval_every=2, eval_batches=2)
    data = prepare_run_data(run_dir, data=text_file, vocab_size=384)
    return Trainer(
        model,
        TrainConfig(**(settings | {"checkpoint_every": 2} | overrides)),
        run_dir,
        data=data,
        show_progress=False,
    )


def _poison_expert(trainer: Trainer, layer: int, expert: int, from_step: int) -> None:
    """From optimizer step `from_step` on, expert `expert` of layer `layer` gets a NaN in
    its w_up gradient (the loss stays finite)."""
    w_up = trainer.model.layers[layer].ffn.experts.w_up

    def poison(grad):
        if trainer.step + 1 >= from_step:
            grad = grad.clone()
            grad[expert, 0, 0] = math.nan
        return grad

    w_up.register_hook(poison)


def _digest(folder) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def test_a_nan_gradient_stops_the_run_naming_step_layer_and_expert(tmp_path, text_file):
    trainer = _trainer(tmp_path / "run", text_file)
    _poison_expert(trainer, layer=1, expert=2, from_step=4)
    trainer.train_until(3)  # the checkpoint of step 2 is written on the way
    checkpoint = tmp_path / "run" / "checkpoint"
    before = _digest(checkpoint)
    with pytest.raises(NonFiniteStepError) as caught:
        trainer.train_until(6)
    message = str(caught.value)
    assert "step 4:" in message
    assert "layers.1.ffn.experts.w_up (layer 1, expert 2)" in message
    assert "checkpoint of step 2 is left as it was" in message
    assert trainer.step == 3  # the bad step never happened
    assert _digest(checkpoint) == before
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_skip_drops_the_bad_batches_and_counts_them(tmp_path, text_file):
    trainer = _trainer(tmp_path / "run", text_file, on_nonfinite="skip")
    _poison_expert(trainer, layer=0, expert=1, from_step=5)
    trainer.train()
    records = read_metrics(tmp_path / "run", split="train")
    assert [r.get("skipped_steps", 0) for r in records] == [0, 0, 0, 0, 1, 2]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_on_nonfinite_is_validated():
    with pytest.raises(ValueError, match=r"on_nonfinite \('ignore'\)"):
        TrainConfig(on_nonfinite="ignore")


def test_diverging_command_exits_non_zero_without_a_checkpoint(tmp_path, text_file):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(
        "train", "--preset", "tiny", "--no-compare", *MICRO, "--steps", "12",
        "--train.lr", "50", "--data", str(text_file), "--out", str(out),
    )  # fmt: skip
    assert code != 0
    assert "not finite; first non-finite gradient:" in stderr
    assert "final validation loss" not in stdout
    assert not (out / "checkpoint").exists()


def test_skip_lets_a_diverging_command_finish_with_finite_weights(tmp_path, text_file):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(
        "train", "--preset", "tiny", "--no-compare", *MICRO, "--steps", "12",
        "--train.lr", "50", "--train.on_nonfinite", "skip", "--data", str(text_file),
        "--out", str(out),
    )  # fmt: skip
    assert code == 0 and "batch skipped" in stdout
    skipped = [r.get("skipped_steps", 0) for r in read_metrics(out, split="train")]
    assert skipped[-1] > 0 and skipped == sorted(skipped)


def test_routing_health_names_dead_and_starved_experts():
    counts = torch.tensor([300.0, 290.0, 0.0, 310.0, 5.0, 295.0])
    issues = {i.kind: i for i in routing_health(counts, top_k=2, layer=3)}
    assert set(issues) == {"dead", "starved"}
    assert issues["dead"].experts == [2] and issues["dead"].layer == 3
    assert issues["starved"].experts == [4]


def test_routing_health_finds_collapse_onto_top_k_experts():
    counts = torch.tensor([1000.0, 980.0, 10.0, 5.0, 3.0, 2.0])
    (issue,) = [i for i in routing_health(counts, top_k=2, layer=0) if i.kind == "collapse"]
    assert sorted(issue.experts) == [0, 1] and issue.figure < COLLAPSE_SPREAD
    # the floor and the ceiling of the spread
    assert spread(torch.tensor([5.0, 5.0, 0.0, 0.0]), top_k=2) == pytest.approx(0.0)
    assert spread(torch.tensor([5.0, 5.0, 5.0, 5.0]), top_k=2) == pytest.approx(1.0)


def test_balanced_or_too_few_counts_raise_nothing():
    generator = torch.Generator().manual_seed(0)
    balanced = torch.multinomial(torch.ones(8), 4000, replacement=True, generator=generator)
    assert routing_health(torch.bincount(balanced, minlength=8).double(), 2, 0) == []
    assert routing_health(torch.tensor([9.0, 0.0, 7.0, 0.0]), 2, 0) == []  # 4 per expert


def test_routing_watch_warns_once_per_condition_and_layer():
    lines = []
    watch = RoutingWatch(top_k=2, run=LOCAL_RUN, log=lines.append)
    dead = SimpleNamespace(tokens_per_expert=torch.tensor([60.0, 70.0, 0.0, 62.0]))
    healthy = SimpleNamespace(tokens_per_expert=torch.tensor([60.0, 70.0, 50.0, 62.0]))
    for step in (2, 4):
        watch.add([None, dead, healthy])
        watch.add([None, dead, healthy])
        watch.check(step)
    assert lines == [
        "warning: step 2: layer 1: expert 2 received no token of 384 assignments "
        "(uniform routing gives each 96)"
    ]


def test_a_healthy_run_prints_no_warning(tmp_path, text_file, capsys):
    _trainer(tmp_path / "run", text_file).train()
    assert "warning" not in capsys.readouterr().out
