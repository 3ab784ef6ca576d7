"""The jobs behind `moekit train`: one model, the MoE-versus-dense comparison, and resuming."""

from __future__ import annotations

import time
from pathlib import Path

from ..models import ModelConfig
from ..parallel import ParallelMesh
from .compare import Comparison, compare, comparison_runs
from .config import TrainConfig
from .data import prepare_run_data
from .trainer import CONFIG_FILE, Trainer, TrainResult, run_configs


def default_out_dir(kind: str) -> Path:
    """runs/<kind>-<local time>, e.g. runs/compare-20250101-120000."""
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def train_one(
    model_config: ModelConfig,
    train_config: TrainConfig,
    run_dir: str | Path,
    *,
    data: str | Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
    mesh: ParallelMesh | None = None,
) -> TrainResult:
    """Train one model in run_dir (tokenising its data there first if needed).

    Args:
        model_config, train_config: what to train and how.
        run_dir: the run directory.
        data: see prepare_run_data (None = the default corpus).
        resume: continue from run_dir's checkpoint.
        show_progress: a tqdm bar.
        mesh: the ranks to train on (None = this process).
    Returns:
        The TrainResult.
    """
    run_data = prepare_run_data(run_dir, data=data, vocab_size=model_config.vocab_size, mesh=mesh)
    trainer = Trainer(
        model_config,
        train_config,
        run_dir,
        data=run_data,
        mesh=mesh,
        resume=resume,
        show_progress=show_progress,
        data_source=None if data is None else str(data),
    )
    return trainer.train()


def resume_job(
    out_dir: str | Path,
    *,
    show_progress: bool = True,
    log=print,
    mesh: ParallelMesh | None = None,
) -> TrainResult | Comparison:
    """Continue a stopped `moekit train` job with the config saved in out_dir.

    A comparison directory (moe/ and dense/ inside) resumes both runs; a run directory
    resumes that run.
    """
    out_dir = Path(out_dir)
    runs = comparison_runs(out_dir)
    if runs is not None:
        model_config, train_config, data = run_configs(runs["moe"])
        return compare(
            model_config,
            train_config,
            out_dir,
            data=data,
            resume=True,
            show_progress=show_progress,
            log=log,
            mesh=mesh,
        )
    if (out_dir / CONFIG_FILE).exists():
        model_config, train_config, data = run_configs(out_dir)
        return train_one(
            model_config,
            train_config,
            out_dir,
            data=data,
            resume=True,
            show_progress=show_progress,
            mesh=mesh,
        )
    raise ValueError(f"--resume: {str(out_dir)!r} holds no moekit run (no {CONFIG_FILE})")
