"""`moekit train` with expert parallelism on 2 CPU processes: torchrun end to end, a
resume bit-identical to the uninterrupted run, loading the EP 2 checkpoint at EP 1, and a
killed rank that makes the other stop with a clear error instead of hanging."""

from __future__ import annotations

import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from moekit.cli import main
from moekit.parallel import init_parallel
from moekit.parallel.launch import spawn_local

pytestmark = pytest.mark.distributed

MICRO = [
    "--model.vocab_size", "384", "--model.d_model", "32", "--model.num_layers", "2",
    "--model.num_heads", "2", "--model.num_kv_heads", "1", "--model.max_seq_len", "32",
    "--model.moe.d_hidden", "32", "--model.num_experts", "4",
    "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--eval-every", "2",
    "--train.eval_batches", "2", "--no-progress", "--threads", "1",
]  # fmt: skip
HARD_LIMIT_S = 240


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "source.txt"
    path.write_text(inspect.getsource(json.decoder) + inspect.getsource(textwrap), encoding="utf-8")
    return path


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "moekit", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=HARD_LIMIT_S, check=False)


def test_torchrun_trains_resumes_and_the_checkpoint_loads_at_ep1(tmp_path, text_file, capsys):
    out = tmp_path / "job"
    done = torchrun("train", "--parallel.ep", "2", "--data", str(text_file), "--out", str(out), *MICRO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("training moe in") == 1, done.stdout  # rank 0 reports alone
    assert done.stdout.count("comparison.json") == 1, done.stdout
    assert (out / "moe" / "rank1" / "metrics.jsonl").exists()
    experts = load_file(out / "moe" / "checkpoint" / "model.safetensors")["layers.0.ffn.experts.w_up"]
    assert experts.shape[0] == 4  # consolidated: every expert, not rank 0's half

    again = torchrun("train", "--resume", "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]

    # The same job in one process sees the same global batches: the losses agree.
    single = tmp_path / "single"
    assert main(["train", "--data", str(text_file), "--out", str(single), *MICRO]) == 0
    for run in ("moe", "dense"):
        ep_losses = [r["loss"] for r in _records(out / run)]
        one_losses = [r["loss"] for r in _records(single / run)]
        assert len(ep_losses) == len(one_losses) == 4 + 3
        assert ep_losses == pytest.approx(one_losses, rel=1e-4)  # summation order differs

    capsys.readouterr()
    assert main(["eval", str(out / "moe")]) == 0
    assert "validation loss" in capsys.readouterr().out
    assert main(["generate", str(out / "moe"), "--prompt", "def", "--max-new-tokens", "4"]) == 0


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def resume_worker(folder: str, text: str) -> None:
    """Uninterrupted run vs stopped after 2 steps and resumed: bit-identical weights."""
    from moekit.cli_args import build_configs
    from moekit.train import Trainer
    from moekit.train.data import prepare_run_data

    init_parallel(2, timeout_s=30, device=torch.device("cpu"))
    model_flags = MICRO[: MICRO.index("--steps")]
    overrides = {key.removeprefix("--"): value for key, value in zip(model_flags[::2], model_flags[1::2])}
    overrides.update({"train.steps": "4", "train.batch_size": "4", "train.seq_len": "32",
                      "train.eval_every": "2", "train.eval_batches": "2", "train.checkpoint_every": "2"})
    model_config, train_config = build_configs("tiny", overrides)

    def trainer(run, resume=False):
        data = prepare_run_data(f"{folder}/{run}", data=text, vocab_size=384)
        return Trainer(model_config, train_config, f"{folder}/{run}", data=data, resume=resume,
                       show_progress=False)

    trainer("whole").train()
    trainer("stopped").train(stop_at=2)
    resumed_trainer = trainer("stopped", resume=True)
    assert resumed_trainer.step == 2  # it continues, it does not start over
    resumed_trainer.train()
    whole = load_file(f"{folder}/whole/checkpoint/model.safetensors")
    resumed = load_file(f"{folder}/stopped/checkpoint/model.safetensors")
    for name, tensor in whole.items():
        assert torch.equal(tensor, resumed[name]), name


def test_resume_under_ep_is_bit_identical(tmp_path, text_file):
    spawn_local(resume_worker, (str(tmp_path), str(text_file)), world_size=2, timeout_s=HARD_LIMIT_S)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "stop_signal",
    # SIGKILL: gloo sees the closed connection at once; SIGSTOP: a hung rank, the timeout.
    [signal.SIGKILL, pytest.param(signal.SIGSTOP, marks=pytest.mark.slow)],
    ids=["killed", "hung"],
)
def test_failed_rank_makes_the_other_exit_with_a_clear_error(tmp_path, text_file, stop_signal):
    out = tmp_path / "run"
    env_base = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                             "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}  # fmt: skip
    args = ["train", "--parallel.ep", "2", "--parallel.timeout", "20", "--no-compare",
            "--data", str(text_file), "--out", str(out), *MICRO, "--steps", "1000"]  # fmt: skip
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "moekit", *args],
            env=env_base | {"RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in range(2)
    ]
    try:
        deadline = time.monotonic() + HARD_LIMIT_S
        log = out / "rank1" / "metrics.jsonl"
        while not (log.exists() and '"train"' in log.read_text()):
            assert time.monotonic() < deadline and ranks[0].poll() is None, "training never started"
            time.sleep(0.2)
        ranks[1].send_signal(stop_signal)
        # within the 20 s --parallel.timeout (plus start-up slack), not torch's 30 minutes
        _, stderr = ranks[0].communicate(timeout=60)
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()
    assert ranks[0].returncode == 1, stderr[-2000:]
    assert "moekit train: rank 0 of 2 stopped" in stderr, stderr[-2000:]
