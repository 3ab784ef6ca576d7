"""FSDP2 composed with expert parallelism equals one process: 10 training steps of losses
and the final weights, on 2 and 4 gloo processes, for a token-choice and a sigmoid router
(the sigmoid router's model built on the meta device, its initial shards exactly one
process's weights); and with a multi-token-prediction module at 2 processes, EP 2.

# W world size, ep expert-parallel size, dp = W / ep
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from builders import parallel_config

from moekit.models import Transformer
from moekit.moe import update_router_biases
from moekit.parallel import all_reduce_router_loads, build_mesh, parallelize
from moekit.parallel.all_to_all import ExpertParallelExperts
from moekit.parallel.fsdp import fully_shard_model, reduce_and_clip_sharded, sharded_bytes
from moekit.parallel.launch import spawn_local
from moekit.parallel.meta import sharded_transformer

pytestmark = pytest.mark.distributed
STEPS, BATCH, SEQ = 10, 4, 16


def _step(model, optimizer, tokens, clip):
    out = model(tokens, tokens)
    (out.loss + out.aux_loss + out.mtp_loss).backward()
    clip()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update_router_biases(model)
    return (out.loss + out.mtp_loss).detach()  # every rank has as many targets: means add up


def _single_process(router: str, batches, mtp_depth: int):
    torch.manual_seed(0)
    model = Transformer(parallel_config(router, mtp_depth))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    clip = lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # noqa: E731
    losses = [_step(model, optimizer, b, clip).item() for b in batches]
    return losses, model.state_dict(), sum(p.numel() * 4 for p in model.parameters())


def _worker(router: str, ep: int, mtp_depth: int = 0) -> None:
    mesh = build_mesh(ep, timeout=timedelta(seconds=60), device=torch.device("cpu"))
    W, rank = mesh.world_size, mesh.rank
    torch.manual_seed(1)
    batches = torch.randint(0, 64, (STEPS, BATCH, SEQ))
    ref_losses, ref_state, full_param_bytes = _single_process(router, batches, mtp_depth)

    torch.manual_seed(0)
    if router in ("sigmoid_topk", "deepseek", "gpt_oss"):  # built on the meta device
        model = sharded_transformer(parallel_config(router, mtp_depth), mesh)
        torch.manual_seed(0)
        initial = Transformer(parallel_config(router, mtp_depth)).state_dict()
        for name, param in model.named_parameters():  # exactly one process's init
            owner = _owner(model, name)
            want = initial[name]
            if owner is not None:
                want = want[owner.first_expert : owner.first_expert + owner.num_experts]
            assert torch.equal(param.full_tensor(), want), name
    else:  # built whole, then sharded (a given model, as fine-tuning passes one)
        model = fully_shard_model(
            parallelize(Transformer(parallel_config(router, mtp_depth)), mesh), mesh
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)

    def clip():
        norm = reduce_and_clip_sharded(model, 0.5, mesh)
        all_reduce_router_loads(model, mesh)
        return norm

    rows = slice(rank * BATCH // W, (rank + 1) * BATCH // W)
    for step, batch in enumerate(batches):
        loss = _step(model, optimizer, batch[rows], clip).double()
        dist.all_reduce(loss, group=mesh.world_group)
        got = loss.item() / W
        assert abs(got - ref_losses[step]) <= 1e-5 * abs(ref_losses[step]), (
            step,
            got,
            ref_losses[step],
        )

    # Weights: every shard gathered back equals the single-process weights (this rank's
    # experts: its EP slice of them).
    for name, param in model.named_parameters():
        full = param.full_tensor()
        expected = ref_state[name]
        owner = _owner(model, name)
        if owner is not None:
            expected = expected[owner.first_expert : owner.first_expert + owner.num_experts]
        torch.testing.assert_close(full, expected, atol=1e-5, rtol=1e-5, msg=name)

    # Memory: this rank holds 1/W of every parameter (and of its AdamW moments), up to the
    # rounding of dim 0 into W shards.
    held = sharded_bytes(model, optimizer)
    assert held["parameters"] <= full_param_bytes / W * 1.25 + 1024, (held, full_param_bytes)
    assert held["optimizer"] <= 2 * held["parameters"] + 64


def _owner(model, name: str) -> ExpertParallelExperts | None:
    module_name = name.rpartition(".")[0]
    module = model.get_submodule(module_name)
    return module if isinstance(module, ExpertParallelExperts) else None


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk"])
@pytest.mark.parametrize(
    ("world", "ep"), [(2, 1), (2, 2), (4, 2)], ids=["fsdp2", "fsdp2xep2", "fsdp4xep2"]
)
def test_fsdp_and_expert_parallel_equal_one_process(router, world, ep):
    spawn_local(_worker, (router, ep), world_size=world, timeout_s=240)


@pytest.mark.parametrize("architecture", ["deepseek", "gpt_oss"])
def test_fsdp_x_ep_equals_one_process_for_latent_and_sink_attention(architecture):
    spawn_local(_worker, (architecture, 2), world_size=4, timeout_s=240)


@pytest.mark.parametrize("router", ["softmax_topk", "deepseek"])
def test_multi_token_prediction_under_fsdp_and_expert_parallel_equals_one_process(router):
    """An MTP module whose block is MoE (for "deepseek" also latent attention): its
    experts sharded by EP, the module an FSDP unit, its loss trained; the deepseek case
    built on the meta device, its initial shards exactly one process's weights."""
    spawn_local(_worker, (router, 2, 1), world_size=2, timeout_s=240)


# ---------------------------------------------------------------- through the Trainer

TRAIN_MICRO = {
    "model.vocab_size": "384", "model.d_model": "32", "model.num_layers": "2",
    "model.num_heads": "2", "model.num_kv_heads": "1", "model.max_seq_len": "32",
    "model.moe.d_hidden": "32", "model.num_experts": "4", "model.moe.balance_loss_coef": "0",
    "train.steps": "4", "train.batch_size": "4", "train.seq_len": "32", "train.eval_every": "2",
    "train.eval_batches": "2", "train.checkpoint_every": "2",
}  # fmt: skip


def _trainer(
    folder: str, text: str, run: str, mesh, resume: bool = False, router: str = "softmax_topk"
):
    from moekit.train import Trainer
    from moekit.train.data import prepare_run_data
    from moekit.train.overrides import build_configs

    model_config, train_config = build_configs("tiny", TRAIN_MICRO | {"model.moe.router": router})
    data = prepare_run_data(f"{folder}/{run}", data=text, vocab_size=384, mesh=mesh)
    return Trainer(
        model_config, train_config, f"{folder}/{run}", data=data, mesh=mesh, resume=resume,
        show_progress=False,
    )  # fmt: skip


def _train_losses(run_dir: str) -> list[float]:
    from moekit.train import read_metrics

    return [r["loss"] for r in read_metrics(run_dir, split="train")]


def _final_weights(run_dir: str) -> dict[str, torch.Tensor]:
    """A run's checkpointed weights, read in this process alone (either layout)."""
    from moekit.train import load_trained_model

    return load_trained_model(run_dir).state_dict()


def trainer_worker(folder: str, text: str, ep: int, router: str, checkpoint_format) -> None:
    """FSDP (x EP) through the Trainer, built on the meta device: the single-process losses
    and weights, a stopped and resumed run bit-identical to an uninterrupted one, and the
    checkpoint resumed in one process (another layout) ending at the same weights."""
    import dataclasses

    from moekit.checkpoint import saved_layout
    from moekit.parallel import init_parallel

    mesh = init_parallel(ep, timeout_s=120, device=torch.device("cpu"), fsdp=True)
    mesh = dataclasses.replace(mesh, checkpoint_format=checkpoint_format)
    _trainer(folder, text, "whole", mesh, router=router).train()
    _trainer(folder, text, "half", mesh, router=router).train(stop_at=2)
    _trainer(folder, text, "stopped", mesh, router=router).train(stop_at=2)
    resumed = _trainer(folder, text, "stopped", mesh, resume=True, router=router)
    assert resumed.step == 2
    resumed.train()
    if mesh.rank == 0:
        assert saved_layout(f"{folder}/whole") == (checkpoint_format or "sharded")
        whole, again = _final_weights(f"{folder}/whole"), _final_weights(f"{folder}/stopped")
        for name, tensor in whole.items():
            assert torch.equal(tensor, again[name]), name
        # One process, same data and seed: the same losses and weights (to rounding).
        _trainer(folder, text, "single", None, router=router).train()
        for got, want in zip(_train_losses(f"{folder}/whole"), _train_losses(f"{folder}/single")):
            assert abs(got - want) <= 1e-5 * abs(want), (got, want)
        single = _final_weights(f"{folder}/single")
        for name, tensor in single.items():
            torch.testing.assert_close(whole[name], tensor, atol=1e-5, rtol=1e-5, msg=name)
        # The FSDP checkpoint of step 2 resumes in one process (another layout): the same
        # end weights as the uninterrupted FSDP run.
        relayout = _trainer(folder, text, "half", None, resume=True, router=router)
        assert relayout.step == 2
        relayout.train()
        ended = _final_weights(f"{folder}/half")
        for name, tensor in whole.items():
            torch.testing.assert_close(ended[name], tensor, atol=1e-5, rtol=1e-5, msg=name)
    dist.barrier()


@pytest.mark.parametrize(
    ("ep", "checkpoint_format"),
    [(1, None), (2, None), (2, "consolidated")],
    ids=["fsdp", "fsdp_x_ep2", "fsdp_x_ep2_consolidated"],
)
def test_trainer_under_fsdp_equals_one_process_and_resumes(tmp_path, ep, checkpoint_format):
    import inspect
    import json
    import textwrap

    text = tmp_path / "source.txt"
    text.write_text(inspect.getsource(json.decoder) + inspect.getsource(textwrap), encoding="utf-8")
    spawn_local(
        trainer_worker,
        (str(tmp_path), str(text), ep, "sigmoid_topk", checkpoint_format),
        world_size=2,
        timeout_s=300,
    )


def test_torchrun_fsdp_x_ep_trains_the_comparison_end_to_end(tmp_path):
    """The literal command: `torchrun ... -m moekit train --parallel.fsdp true --parallel.ep 2
    --checkpoint.format consolidated` (the sharded default: the 4-process test below)."""
    import inspect
    import json
    import subprocess
    import sys
    import textwrap

    from safetensors.torch import load_file

    text = tmp_path / "source.txt"
    text.write_text(inspect.getsource(json.decoder) + inspect.getsource(textwrap), encoding="utf-8")
    micro = [f"--{key}={value}" for key, value in TRAIN_MICRO.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "moekit", "train", "--parallel.fsdp", "true", "--parallel.ep", "2",
               "--checkpoint.format", "consolidated",
               "--data", str(text), "--out", str(tmp_path / "job"), "--no-progress", "--threads", "1",
               *micro]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "speed-up" in done.stdout
    weights = load_file(str(tmp_path / "job/moe/checkpoint/model.safetensors"))
    assert weights["layers.0.ffn.experts.w_up"].shape[0] == 4  # consolidated: every expert
    memory = json.loads((tmp_path / "job/moe/memory.json").read_text())
    assert memory["parameters_mib"] > 0
    assert memory["optimizer_mib"] == pytest.approx(2 * memory["parameters_mib"], abs=0.002)
    assert "bytes per rank" in done.stdout
    assert "all-to-all on rank 0:" in done.stdout  # communication against compute
    records = [
        json.loads(line) for line in (tmp_path / "job/moe/metrics.jsonl").read_text().splitlines()
    ]
    exchanged = [r["all_to_all_s"] for r in records if r["split"] == "train"]
    assert len(exchanged) == 4 and all(s > 0 for s in exchanged)


@pytest.mark.slow
def test_torchrun_4_processes_fsdp_x_ep_sharded_checkpoints_end_to_end(tmp_path):
    """`torchrun --nproc-per-node 4 -m moekit train --no-compare --parallel.fsdp true
    --parallel.ep 2`: sharded checkpoints by default (one file per rank, no rank holding a
    whole expert tensor), resumed on 2 processes without FSDP (EP 1 x DP 2) to the end, and
    read by `moekit eval` and `moekit generate` in one process."""
    import inspect
    import json
    import subprocess
    import sys
    import textwrap

    from safetensors.torch import load_file

    text = tmp_path / "source.txt"
    text.write_text(inspect.getsource(json.decoder) + inspect.getsource(textwrap), encoding="utf-8")
    micro = [f"--{key}={value}" for key, value in TRAIN_MICRO.items()]
    run = str(tmp_path / "run")

    def torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(n), "-m", "moekit", "train", "--no-compare",
                   "--out", run, "--no-progress", "--threads", "1", *args]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=400, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    # No shared expert: a Mixtral-shaped model that `moekit convert` can express.
    torchrun(4, "--parallel.fsdp", "true", "--parallel.ep", "2", "--data", str(text),
             *micro, "--train.steps", "2", "--model.moe.num_shared_experts", "0")  # fmt: skip
    state = json.loads((tmp_path / "run/checkpoint/trainer_state.json").read_text())
    assert state["tensors"] == "sharded" and state["step"] == 2
    shards = sorted((tmp_path / "run/checkpoint/shards").iterdir())
    assert len(shards) == 4 and sorted(state["sha256"]) == [f"shards/{p.name}" for p in shards]
    for path in shards:
        assert load_file(str(path))["model.layers.0.ffn.experts.w_up"].shape[0] < 4

    def moekit(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "moekit", *args], capture_output=True,
                              text=True, timeout=120, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]

    # One process reads the sharded run: eval, generate, convert (to a Hugging Face folder).
    moekit("eval", run)
    moekit("generate", run, "--prompt", "def ", "--max-new-tokens", "4")
    moekit("convert", run, str(tmp_path / "hf"))
    assert load_file(str(tmp_path / "hf/model.safetensors"))
    # Resume on 2 processes, plain data parallel: its checkpoint is consolidated (the
    # default without FSDP) and the run ends at the configured 4 steps.
    config = json.loads((tmp_path / "run/config.json").read_text())
    assert config["train"]["steps"] == 2
    config["train"]["steps"] = 4
    (tmp_path / "run/config.json").write_text(json.dumps(config))
    torchrun(2, "--resume")
    state = json.loads((tmp_path / "run/checkpoint/trainer_state.json").read_text())
    assert state["tensors"] == "consolidated" and state["step"] == 4
    moekit("eval", run)
