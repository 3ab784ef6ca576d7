"""The jobs behind `moekit train`: one model, the MoE-versus-dense comparison, and resuming."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ..data import copy_tokenizer
from ..data.tokenizer import TOKENIZER_FILE
from ..models import ModelConfig
from ..parallel import ParallelMesh
from .builder import build_job
from .compare import Comparison, compare, comparison_runs
from .config import TrainConfig
from .console import print_line
from .lockstep import train_in_lockstep
from .overrides import apply_overrides
from .run import run_on
from .rundir import CONFIG_FILE, checkpoint_dir, load_trained_model, run_configs
from .seeds import SEEDS_FILE, SeedsSummary, resume_seeds
from .trainer import Trainer, TrainResult

# The one model setting a run started from another may change (a loss weight, not a weight).
_LOSS_WEIGHT = "model.mtp_loss_weight"


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
    """Train one model in run_dir (tokenising its data there first if needed), with one
    printed line per evaluation.

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
    job = build_job(
        model_config,
        train_config,
        run_dir,
        data=data,
        mesh=mesh,
        resume=resume,
        show_progress=show_progress,
    )
    return train_reporting(job.trainer)


def train_reporting(trainer: Trainer) -> TrainResult:
    """trainer.train(), with a line on stdout per evaluation (step, val loss, tokens/s)."""
    return train_in_lockstep({"run": trainer})["run"]


def resume_job(
    out_dir: str | Path,
    *,
    show_progress: bool = True,
    log=print_line,
    mesh: ParallelMesh | None = None,
) -> TrainResult | Comparison | SeedsSummary:
    """Continue a stopped `moekit train` job with the config saved in out_dir.

    A seeds job (seeds.json inside) continues its unfinished seeds; a comparison directory
    (moe/ and dense/ inside) resumes both runs; a run directory resumes that run.
    """
    out_dir = Path(out_dir)
    if (out_dir / SEEDS_FILE).exists():
        return resume_seeds(out_dir, show_progress=show_progress, log=log, mesh=mesh)
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


def train_from(
    source: str | Path,
    run_dir: str | Path,
    *,
    overrides: dict[str, str] | None = None,
    data: str | Path | None = None,
    show_progress: bool = True,
    mesh: ParallelMesh | None = None,
) -> TrainResult:
    """`moekit train --init-from SOURCE`: a new run that starts from SOURCE's weights.

    SOURCE is a trained run or one `moekit convert` wrote from a Hugging Face checkpoint.
    The new run keeps SOURCE's model config and tokenizer (with its special ids): data is
    tokenised with that tokenizer, never a new one, so the model's token ids keep their
    meaning. Its TrainConfig is SOURCE's with the train.* overrides (warmup derived again
    from the new step budget unless given); its optimizer starts fresh, at step 0.
    `moekit train --resume --out RUN_DIR` continues it like any other run.

    Args:
        source: the run to start from (it must hold a checkpoint and a tokenizer.json).
        run_dir: the new run directory (must not hold a run yet).
        overrides: {"train.FIELD": raw value}; model.* settings are refused (the weights
            fix the model), but for model.mtp_loss_weight (DeepSeek-V3 lowers lambda from
            0.3 to 0.1 late in training).
        data: see prepare_run_data (None = the default corpus).
        show_progress: a tqdm bar.
        mesh: the ranks to train on (None = this process).
    Returns:
        The TrainResult.
    """
    source, run_dir = Path(source), Path(run_dir)
    if checkpoint_dir(source) is None:
        raise ValueError(f"--init-from {str(source)!r}: no checkpoint to start from")
    if not (source / TOKENIZER_FILE).is_file():
        raise ValueError(f"--init-from {str(source)!r}: no {TOKENIZER_FILE} to tokenise with")
    if checkpoint_dir(run_dir) is not None:
        raise ValueError(f"{str(run_dir)!r} already holds a trained run; choose another --out")
    overrides = dict(overrides or {})
    fixed = sorted(k for k in overrides if not k.startswith("train.") and k != _LOSS_WEIGHT)
    if fixed:
        raise ValueError(
            f"--init-from keeps {str(source)!r}'s model; drop --{', --'.join(fixed)} (of its "
            f"settings only --{_LOSS_WEIGHT} may change)"
        )
    model_config, train_config, _ = run_configs(source)
    defaults = dataclasses.asdict(train_config) | {"warmup_steps": None, "trainable": None}
    model_config, train_config = apply_overrides(model_config, overrides, train_defaults=defaults)
    model = load_trained_model(source).train()  # loaded in eval mode
    model.config = model_config  # the same but for a new mtp_loss_weight
    with run_on(mesh).main_first():
        if not (run_dir / TOKENIZER_FILE).exists():
            copy_tokenizer(source, run_dir)
    job = build_job(model, train_config, run_dir, data=data, mesh=mesh, show_progress=show_progress)
    return train_reporting(job.trainer)
