"""The run contract's one-process side, the shared optimizer step and metrics record, and
the one helper that knows the comparison layout."""

from __future__ import annotations

import torch

from moekit.train import LocalRun, TrainConfig, optimizer_step, run_on, train_record
from moekit.train.compare import comparison_runs


def test_a_folder_with_moe_and_no_config_is_a_comparison(tmp_path):
    assert comparison_runs(tmp_path) is None
    (tmp_path / "moe").mkdir()
    assert comparison_runs(tmp_path) == {"moe": tmp_path / "moe", "dense": tmp_path / "dense"}
    (tmp_path / "config.json").write_text("{}")  # a run directory that holds a moe/ folder
    assert comparison_runs(tmp_path) is None


def test_local_run_is_the_identity():
    run = run_on(None)
    assert isinstance(run, LocalRun) and run.is_main and (run.rank, run.world_size) == (0, 1)
    x, y = torch.arange(4), torch.arange(4, 8)
    assert run.shard(x, y) == (x, y)
    assert run.mean(1.5) == 1.5 and run.any(True) and not run.any(False)
    with run.main_first():
        pass


def test_optimizer_step_clips_schedules_steps_and_zeroes():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    config = TrainConfig(steps=10, lr=0.1, warmup_steps=2, grad_clip=1.0)
    (100 * model(torch.ones(1, 3)).sum()).backward()
    before = model.weight.detach().clone()
    lr, grad_norm = optimizer_step(model, optimizer, config, steps_done=0)
    assert lr == optimizer.param_groups[0]["lr"] > 0  # warmup's first step
    assert grad_norm > 1.0  # the norm before clipping
    assert all(p.grad is None for p in model.parameters())
    # clipped to norm 1: the update is lr * (a gradient of norm <= 1)
    assert (model.weight - before).norm() <= lr * 1.0 + 1e-6


def test_train_record_keeps_the_metrics_layout():
    record = train_record(
        step=3, loss=2.0, aux_loss=0.1, lr=1e-3, grad_norm=0.5,
        throughput=("tokens_per_s", 100.0), stats=[None],
    )  # fmt: skip
    assert list(record) == [
        "split", "step", "loss", "aux_loss", "lr", "grad_norm", "tokens_per_s",
        "dropped_fraction", "load_cv", "time",
    ]  # fmt: skip
    assert record["dropped_fraction"] == record["load_cv"] == 0.0  # a dense model
