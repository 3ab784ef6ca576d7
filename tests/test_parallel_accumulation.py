"""Gradient accumulation across ranks: 2 gloo processes x grad_accum 2 equal one process
with the whole batch (loss and every gradient, fp32) under the global balance scope, at
DP 2 and at EP 2; and `moekit train --train.grad_accum 2` under torchrun at DP 2, EP 2
and FSDP x EP 2 logs the losses of one process."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import torch
from builders import ROUTER_SETTINGS, lm_config, seeded_lm
from helpers import MICRO, lm_batch, torchrun

from moekit.cli import main
from moekit.parallel import build_mesh
from moekit.parallel.launch import spawn_local
from moekit.train.accumulation import forward_backward, micro_batches
from moekit.train.run import LOCAL_RUN, run_on

pytestmark = pytest.mark.distributed
LOSSES = dict(balance_loss_coef=0.1, importance_loss_coef=0.05, z_loss_coef=0.01)


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


def _step(model, run, data, grad_accum):
    batches = micro_batches(run.shard(*data), grad_accum)
    out = forward_backward(model, model, batches, run, _no_autocast)
    run.reduce_and_clip(model, 0.0)
    return run.mean(out.loss.item()), run.mean(out.aux_loss.item())


def accumulation_worker() -> None:
    cpu = torch.device("cpu")
    for ep in (1, 2):  # DP 2, then EP 2
        mesh = build_mesh(ep, timeout=timedelta(seconds=60), device=cpu)
        run = run_on(mesh)
        for router in ("softmax_topk", "sigmoid_topk", "switch"):
            config = lm_config(**ROUTER_SETTINGS[router], **LOSSES, balance_scope="global")
            data = lm_batch(rows=8)
            reference = seeded_lm(config)
            ref_loss, ref_aux = _step(reference, LOCAL_RUN, data, 1)
            model = run.prepare(seeded_lm(config))
            loss, aux = _step(model, run, data, 2)
            where = f"ep {ep}, {router}"
            assert abs(loss - ref_loss) < 1e-6, (where, loss, ref_loss)
            assert abs(aux - ref_aux) < 1e-6, (where, aux, ref_aux)
            expected = dict(reference.named_parameters())
            for name, param in model.named_parameters():
                grad = expected[name].grad
                shard = _expert_shard(model, name)
                if shard is not None:
                    grad = grad[shard]
                torch.testing.assert_close(
                    param.grad,
                    grad,
                    rtol=1e-5,
                    atol=1e-6,
                    msg=lambda m, n=name, w=where: f"{w} {n}: {m}",
                )


def _expert_shard(model, name: str) -> slice | None:
    """The rows of the whole expert tensor this rank holds, for a sharded expert weight."""
    module_name, _, param = name.rpartition(".")
    module = model.get_submodule(module_name)
    if param not in getattr(module, "sharded_names", ()):
        return None
    return slice(module.first_expert, module.first_expert + module.num_experts)


def test_two_ranks_times_two_micro_batches_equal_one_process():
    spawn_local(accumulation_worker, world_size=2, timeout_s=300, collective_timeout_s=60)


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["split"], r["step"], r["loss"]) for r in map(json.loads, lines)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("one") / "job"
    flags = ["--model.moe.balance_scope", "global", "--no-compare", "--threads", "1"]
    assert main(["train", "--data", str(text_file), "--out", str(out), *MICRO, *flags]) == 0
    return _losses(out)


@pytest.mark.parametrize(
    "layout",
    [
        ["--parallel.ep", "1"],
        ["--parallel.ep", "2"],
        ["--parallel.ep", "2", "--parallel.fsdp", "true"],
    ],
    ids=["dp2", "ep2", "fsdp-ep2"],
)
def test_torchrun_accumulates_like_one_process(layout, one_process, tmp_path, text_file):
    out = tmp_path / "job"
    done = torchrun(
        "train", "--data", str(text_file), "--out", str(out), *MICRO, *layout,
        "--model.moe.balance_scope", "global", "--train.grad_accum", "2", "--no-compare",
        "--threads", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    mine = _losses(out)
    assert [(s, step) for s, step, _ in mine] == [(s, step) for s, step, _ in one_process]
    for (split, step, loss), (_, _, expected) in zip(mine, one_process, strict=True):
        assert loss == pytest.approx(expected, abs=2e-5), (split, step)
