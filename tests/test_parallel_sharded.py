"""Sharded (torch.distributed.checkpoint) checkpoints and meta-device initialisation.

- a checkpoint written by FSDP x EP 2 on 4 processes loads bit-identically at EP 1 x DP 2
  (2 processes, no FSDP), at FSDP x EP 2 and at EP 2 on 2 processes, and in one plain
  process; EP 2 (no FSDP) saves it again and that copy loads in one process too;
- a save killed (SIGKILL) halfway, in one process or on one of two ranks, leaves the
  previous checkpoint loadable, and a corrupt shard file is refused;
- FSDP's model is built on the meta device: its shards equal one process's weights from
  the same seed, the whole model is never materialised on a rank (peak resident memory
  during the build stays below the model's size).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from builders import sharded_config
from safetensors.torch import load_file, save_file

from moekit import MoEConfig
from moekit.checkpoint import (
    CheckpointError,
    load_checkpoint,
    optimizer_tensors,
    save_sharded_checkpoint,
)
from moekit.models import ModelConfig, Transformer
from moekit.parallel import build_mesh, parallelize
from moekit.parallel.fsdp import full_optimizer_state, full_state, reduce_and_clip_sharded
from moekit.parallel.launch import spawn_local
from moekit.parallel.meta import sharded_transformer

pytestmark = pytest.mark.distributed


def _mesh(ep: int, fsdp: bool):
    return build_mesh(ep, timeout=timedelta(seconds=60), device=torch.device("cpu"), fsdp=fsdp)


def _train_and_save(folder: str) -> None:
    """FSDP x EP 2 on 4 ranks: 2 AdamW steps, then a sharded save; rank 0 also writes the
    gathered weights and moments (the oracle) to reference.safetensors."""
    mesh = _mesh(2, fsdp=True)
    torch.manual_seed(0)
    model = sharded_transformer(sharded_config(), mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    torch.manual_seed(1)
    batches = torch.randint(0, 64, (2, 4, 16))
    rows = slice(mesh.rank, mesh.rank + 1)
    for batch in batches:
        out = model(batch[rows], batch[rows])
        (out.loss + out.aux_loss).backward()
        reduce_and_clip_sharded(model, 1.0, mesh)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    save_sharded_checkpoint(f"{folder}/run", model, optimizer, {"step": 2}, mesh)
    weights, moments = full_state(model), full_optimizer_state(model, optimizer)
    if mesh.rank == 0:
        reference = {f"model.{k}": v.contiguous() for k, v in weights.items()}
        reference |= {f"optimizer.{k}": v for k, v in moments.items()}
        reference.pop("model.lm_head.weight")  # tied: the same tensor as tok_embed.weight
        save_file(reference, f"{folder}/reference.safetensors")


def _assert_equals_reference(folder: str, model, optimizer, owner_rows=None) -> None:
    """Every weight and moment this rank holds is bit-identical to the reference's (its
    EP rows of the experts)."""
    reference = load_file(f"{folder}/reference.safetensors")
    params = dict(model.named_parameters())
    checked = 0
    for key, want in reference.items():
        kind, name = key.split(".", 1)
        if kind == "optimizer":
            name, field = name.rsplit(".", 1)
            got = optimizer.state[params[name]][field]
        else:
            got = params[name] if name in params else model.get_buffer(name)
        got = got.full_tensor() if hasattr(got, "full_tensor") else got.detach()
        module = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if got.dim() and hasattr(module, "first_expert"):
            want = want[module.first_expert : module.first_expert + module.num_experts]
        assert torch.equal(got, want), key
        checked += 1
    assert checked == len(reference) > 20


def _load_at(folder: str, ep: int, fsdp: bool) -> None:
    from moekit.parallel.fsdp import fully_shard_model

    mesh = _mesh(ep, fsdp=fsdp)
    model = parallelize(Transformer(sharded_config()), mesh)
    if fsdp:
        model = fully_shard_model(model, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    state = load_checkpoint(f"{folder}/run", model, optimizer, mesh=mesh)
    assert state["step"] == 2 and state["tensors"] == "sharded"
    _assert_equals_reference(folder, model, optimizer)
    # What each rank wrote: its own shards, one file per rank, none of them whole.
    files = sorted(Path(folder, "run/checkpoint/shards").iterdir())
    assert len(files) == 4, files
    if ep > 1 and not fsdp:  # save again from plain expert parallelism (EP rows, no FSDP)
        save_sharded_checkpoint(f"{folder}/again", model, optimizer, {"step": 2}, mesh)


def test_sharded_checkpoint_resumes_at_other_layouts_bit_identical(tmp_path):
    folder = str(tmp_path)
    spawn_local(_train_and_save, (folder,), world_size=4, timeout_s=240)
    spawn_local(_load_at, (folder, 1, False), world_size=2, timeout_s=180)  # EP 1 x DP 2
    spawn_local(_load_at, (folder, 2, True), world_size=2, timeout_s=180)  # FSDP x EP 2
    spawn_local(_load_at, (folder, 2, False), world_size=2, timeout_s=180)  # EP 2
    # One plain process, no process group: the checkpoint, and EP 2's save of it.
    for run in ("run", "again"):
        model = Transformer(sharded_config())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        load_checkpoint(f"{folder}/{run}", model, optimizer)
        _assert_equals_reference(folder, model, optimizer)
        assert model.lm_head.weight is model.tok_embed.weight
    # No rank wrote a whole expert tensor: each file holds chunks of at most half of it.
    for path in Path(folder, "run/checkpoint/shards").iterdir():
        for key, tensor in load_file(str(path)).items():
            if key == "model.layers.0.ffn.experts.w_up":
                assert tensor.shape[0] < 4


# ---------------------------------------------------------------- atomic saves

_KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from safetensors.torch import save_file
    import moekit.checkpoint.sharded as sharded
    from moekit.checkpoint import save_sharded_checkpoint
    sys.path.insert(0, {tests!r})
    from builders import sharded_config
    from moekit.models import Transformer

    torch.manual_seed(0)
    model = Transformer(sharded_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).loss.backward()
    optimizer.step()
    save_sharded_checkpoint({run!r}, model, optimizer, {{"step": 1}}, None)
    save_file({{k: v.clone() for k, v in model.state_dict().items()}}, {saved!r})

    class DiesMidway(sharded.HuggingFaceStorageWriter):
        def write_data(self, plan, planner):
            future = super().write_data(plan, planner)  # this rank's shard, on disk
            os.kill(os.getpid(), signal.SIGKILL)  # before the rename
            return future

    sharded.HuggingFaceStorageWriter = DiesMidway
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    save_sharded_checkpoint({run!r}, model, optimizer, {{"step": 2}}, None)
    """
)


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    run, saved = tmp_path / "run", tmp_path / "step1.safetensors"
    script = _KILLED_SAVE.format(tests=str(Path(__file__).parent), run=str(run), saved=str(saved))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert any((run / "checkpoint.tmp" / "shards").iterdir())  # the interrupted save's files
    model = Transformer(sharded_config())
    state = load_checkpoint(run, model, torch.optim.AdamW(model.parameters()))
    assert state["step"] == 1
    for name, tensor in load_file(str(saved)).items():
        assert torch.equal(model.state_dict()[name], tensor), name


def _killed_rank_worker(folder: str) -> None:
    """2 ranks under FSDP save step 1; in the save of step 2, rank 1 is killed (SIGKILL)
    once its shard is on disk, before rank 0 could rename anything."""
    import os

    from moekit.checkpoint import sharded

    mesh = build_mesh(1, timeout=timedelta(seconds=10), device=torch.device("cpu"), fsdp=True)
    torch.manual_seed(0)
    model = sharded_transformer(sharded_config(), mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    save_sharded_checkpoint(f"{folder}/run", model, optimizer, {"step": 1}, mesh)
    weights = full_state(model)
    if mesh.rank == 0:
        weights.pop("lm_head.weight")  # tied: the same tensor as tok_embed.weight
        save_file({k: v.contiguous() for k, v in weights.items()}, f"{folder}/step1.safetensors")
    if mesh.rank == 1:

        class DiesMidway(sharded.HuggingFaceStorageWriter):
            def write_data(self, plan, planner):
                future = super().write_data(plan, planner)
                os.kill(os.getpid(), signal.SIGKILL)
                return future

        sharded.HuggingFaceStorageWriter = DiesMidway
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    save_sharded_checkpoint(f"{folder}/run", model, optimizer, {"step": 2}, mesh)


def test_a_rank_killed_during_a_sharded_save_leaves_the_previous_checkpoint(tmp_path):
    # rank 1 dies by SIGKILL (-9); the launcher then kills rank 0 too, as a job's end would
    with pytest.raises(RuntimeError, match=r"exit codes \[-?\d+, -9\]"):
        spawn_local(
            _killed_rank_worker, (str(tmp_path),), world_size=2, timeout_s=120,
            collective_timeout_s=10,
        )  # fmt: skip
    assert any((tmp_path / "run" / "checkpoint.tmp" / "shards").iterdir())  # the cut save
    model = Transformer(sharded_config())
    state = load_checkpoint(tmp_path / "run", model, torch.optim.AdamW(model.parameters()))
    assert state["step"] == 1
    for name, tensor in load_file(str(tmp_path / "step1.safetensors")).items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_a_corrupt_or_foreign_shard_file_is_refused(tmp_path):
    torch.manual_seed(0)
    model = Transformer(sharded_config())
    optimizer = torch.optim.AdamW(model.parameters())
    folder = save_sharded_checkpoint(tmp_path, model, optimizer, {"step": 0}, None)
    assert optimizer_tensors(model, optimizer) == {}  # no state yet: weights only
    (shard,) = (folder / "shards").iterdir()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(tmp_path, Transformer(sharded_config()))
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    load_checkpoint(tmp_path, Transformer(sharded_config()))
    (folder / "shards" / "extra.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not part of the checkpoint"):
        load_checkpoint(tmp_path, Transformer(sharded_config()))


# ---------------------------------------------------------------- meta-device construction


def _big_config() -> ModelConfig:
    # About 110 MB of fp32 weights, the largest single tensor 8 MB: a rank that built the
    # whole model would have to hold the 110 MB at once.
    moe = MoEConfig(d_model=256, d_hidden=256, num_experts=16, top_k=2, router="sigmoid_topk")
    return ModelConfig(
        vocab_size=2048, d_model=256, num_layers=8, num_heads=4, max_seq_len=32, moe=moe
    )


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise AssertionError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> int:
    """Restart the peak resident set size (VmHWM) from the current one; returns it. (Not
    ru_maxrss: after the spawn's exec it still holds the parent's peak.)"""
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")
    return _status_bytes("VmRSS")


def _meta_build_worker(world: int) -> None:
    import moekit.models.transformer as transformer

    mesh = _mesh(1, fsdp=True)
    built_on = []
    original = transformer.Transformer.__init__

    def recording_init(self, config):
        original(self, config)
        built_on.append(self.lm_head.weight.device.type)

    transformer.Transformer.__init__ = recording_init
    config = _big_config()
    with torch.device("meta"):
        sizes = [p.numel() * 4 for p in Transformer(config).parameters()]
    full_bytes, largest = sum(sizes), max(sizes)
    sharded_transformer(sharded_config(), mesh)  # one-time costs (imports, kernels) paid first
    built_on.clear()
    before = _reset_peak_rss()
    torch.manual_seed(0)
    model = sharded_transformer(config, mesh)
    grown = _status_bytes("VmHWM") - before
    assert built_on == ["meta"], built_on  # the only Transformer ever made
    local = sum(p.to_local().numel() * 4 for p in model.parameters())
    assert local <= full_bytes / world + 64 * 1024
    for p in model.parameters():
        assert p.to_local().shape[0] <= -(-p.shape[0] // world), p.shape
    # Peak memory while building: this rank's shards and one full tensor at a time, never
    # the whole model.
    assert grown < local + 2 * largest + 16 * 2**20 < full_bytes, (grown, local, full_bytes)


def test_fsdp_builds_on_meta_and_never_holds_the_whole_model():
    spawn_local(_meta_build_worker, (2,), world_size=2, timeout_s=180)
