"""`moekit train` with expert parallelism on 2 CPU processes: torchrun end to end with the
losses of one process, the EP 2 checkpoint loaded at EP 1, resume (slow; the bit-identical
resume runs in test_parallel_checkpoint.py's 4-rank world), and a killed or hung rank that
makes the other stop with a clear error instead of hanging."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import HARD_LIMIT_S, torchrun, write_text
from safetensors.torch import load_file

from moekit.cli import main

pytestmark = pytest.mark.distributed

MICRO = [
    "--model.vocab_size", "384", "--model.d_model", "32", "--model.num_layers", "2",
    "--model.num_heads", "2", "--model.num_kv_heads", "1", "--model.max_seq_len", "32",
    "--model.moe.d_hidden", "32", "--model.num_experts", "4",
    "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--eval-every", "2",
    "--train.eval_batches", "2", "--no-progress", "--threads", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "source.txt")


@pytest.fixture(scope="module")
def torchrun_job(tmp_path_factory, text_file):
    """The literal command: the MoE-versus-dense comparison at EP 2 on 2 CPU processes."""
    out = tmp_path_factory.mktemp("torchrun") / "job"
    done = torchrun(
        "train", "--parallel.ep", "2", "--data", str(text_file), "--out", str(out), *MICRO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def test_torchrun_trains_and_the_checkpoint_loads_at_ep1(torchrun_job, tmp_path, text_file, capsys):
    out, stdout = torchrun_job
    assert stdout.count("training moe in") == 1, stdout  # rank 0 reports alone
    assert stdout.count("comparison.json") == 1, stdout
    assert (out / "moe" / "rank1" / "metrics.jsonl").exists()
    experts = load_file(out / "moe" / "checkpoint" / "model.safetensors")[
        "layers.0.ffn.experts.w_up"
    ]
    assert experts.shape[0] == 4  # consolidated: every expert, not rank 0's half

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


@pytest.mark.slow
def test_torchrun_resume_reads_the_consolidated_checkpoint(torchrun_job):
    out, _ = torchrun_job
    again = torchrun("train", "--resume", "--out", str(out), "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("final validation loss") == 1, again.stdout  # the table, once


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


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
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
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
