"""Run a function on N local CPU processes joined in a gloo group, with a hard time limit.

For tests and experiments on one machine (training itself is launched with torchrun).
The parent never waits forever: when any rank fails the others are terminated, and past
the wall-clock limit every rank is killed.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world_size, folder, timeout_s, fn, args) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{folder}/store",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        fn(*args)
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 (any failure: report it and exit non-zero)
        Path(folder, f"rank{rank}.error").write_text(traceback.format_exc(), encoding="utf-8")
        os._exit(1)


def spawn_local(
    fn,
    args: tuple = (),
    *,
    world_size: int,
    timeout_s: float = 120.0,
    collective_timeout_s: float = 30.0,
) -> None:
    """Call fn(*args) in world_size spawned processes with a gloo process group set up.

    Args:
        fn: a module-level function (it is pickled by name into the children).
        world_size: number of ranks.
        timeout_s: wall-clock limit for the whole run.
        collective_timeout_s: the process group's timeout.
    Raises:
        RuntimeError: a rank failed (its traceback is in the message).
        TimeoutError: the run passed timeout_s; every rank was killed.
    """
    if world_size < 1:
        raise ValueError(f"world_size ({world_size}) must be >= 1")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="moekit-spawn-") as folder:
        procs = [
            ctx.Process(
                target=_entry, args=(rank, world_size, folder, collective_timeout_s, fn, args)
            )
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout_s
        try:
            while any(p.is_alive() for p in procs):
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{world_size} ranks still running after {timeout_s} s; killed"
                    )
                time.sleep(0.05)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                proc.join()
        errors = [
            f"rank {rank}:\n{Path(folder, f'rank{rank}.error').read_text(encoding='utf-8')}"
            for rank in range(world_size)
            if Path(folder, f"rank{rank}.error").exists()
        ]
        codes = [p.exitcode for p in procs]
        if errors or any(codes):
            raise RuntimeError(f"distributed run failed (exit codes {codes})\n" + "\n".join(errors))
