"""`moekit train --seeds N`: the comparison once per seed, and a mean +- std summary.

    OUT/seeds.json         the job: seeds, model and train config, data source (for --resume)
    OUT/seed{s}/           one comparison folder per seed s (moe/, dense/, comparison.json)
    OUT/summary.json       each seed's figures, their mean, std and count, and the claim

The seed (TrainConfig.seed) sets both the initialisation and the data order (the loader's
shuffle); every seed trains on the same tokens (seed folders after the first copy its
tokenizer and streams). The claim checked in every seed: the MoE reaches the dense
model's final validation loss sooner in steps AND on the wall clock, and ends below it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from ..models import ModelConfig
from ..parallel import ParallelMesh
from .compare import (
    COMPARISON_FILE,
    Comparison,
    claim_holds,
    compare,
    format_table,
    peak_memory_gb,
    read_comparison,
)
from .config import (
    TrainConfig,
    model_config_from_dict,
    model_config_to_dict,
    train_config_from_dict,
)
from .console import print_line
from .data import copy_run_data
from .run import run_on

SEEDS_FILE = "seeds.json"
SUMMARY_FILE = "summary.json"

# (key in summary.json, row label, format) of each figure, from a Comparison.
FIGURES = (
    ("moe_final_val_loss", "final validation loss, MoE", ".4f"),
    ("dense_final_val_loss", "final validation loss, dense", ".4f"),
    ("loss_gap", "loss gap (dense - MoE), nats", "+.4f"),
    ("steps_to_dense_loss", "MoE steps to dense final loss", ".1f"),
    ("speedup", "speed-up in steps", ".2f"),
    ("moe_tokens_per_s", "training tokens/s, MoE", ",.0f"),
    ("dense_tokens_per_s", "training tokens/s, dense", ",.0f"),
    ("tokens_per_s_ratio", "tokens/s ratio MoE / dense", ".3f"),
    ("wall_clock_speedup", "wall-clock speed-up", ".2f"),
    ("moe_train_seconds", "training time MoE (s)", ".1f"),
    ("dense_train_seconds", "training time dense (s)", ".1f"),
)


@dataclass
class SeedsSummary:
    """Per-seed figures and their aggregate (FIGURES' keys; None where a seed has none).

    aggregate[key] = {"mean", "std", "n"}: over the n seeds with a value; std is the
    sample standard deviation (n - 1), 0 for one value, None for none.
    """

    seeds: list[int]
    per_seed: dict[int, dict[str, float | None]]
    aggregate: dict[str, dict[str, float | int | None]]
    claim_fails: list[int]
    job_seconds: float
    peak_memory_gb: float


def seed_dirs(out_dir: str | Path, seeds: list[int]) -> dict[int, Path]:
    """{seed: OUT/seed{seed}}."""
    return {seed: Path(out_dir) / f"seed{seed}" for seed in seeds}


def compare_seeds(
    moe_config: ModelConfig,
    train_config: TrainConfig,
    out_dir: str | Path,
    num_seeds: int,
    *,
    data: str | Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
    log=print_line,
    mesh: ParallelMesh | None = None,
) -> SeedsSummary:
    """Run the comparison for seeds train_config.seed + 0 .. num_seeds - 1, then summarise.

    Args:
        moe_config, train_config: as compare(); train_config.seed is the first seed.
        out_dir: the job folder (seed folders inside).
        num_seeds: how many seeds (>= 2; one seed is a plain comparison).
        data: see prepare_run_data (None = the default corpus).
        resume: continue the job in out_dir: finished seeds are read back, the others
            continue from their checkpoints or start.
        show_progress, log, mesh: as compare().
    Returns:
        The SeedsSummary (also in out_dir/summary.json).
    """
    if num_seeds < 2:
        raise ValueError(f"--seeds ({num_seeds}) must be >= 2 here (1 is a plain comparison)")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    seeds = [train_config.seed + i for i in range(num_seeds)]
    run = run_on(mesh)
    if not resume:
        if (out_dir / SEEDS_FILE).exists():
            raise ValueError(
                f"{str(out_dir)!r} already holds a seeds job; resume it or choose another --out"
            )
        if run.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            job = {
                "seeds": seeds,
                "model": model_config_to_dict(moe_config),
                "train": dataclasses.asdict(train_config),
                "data": None if data is None else str(data),
            }
            (out_dir / SEEDS_FILE).write_text(json.dumps(job, indent=1), encoding="utf-8")
    comparisons = {}
    folders = seed_dirs(out_dir, seeds)
    for seed, folder in folders.items():
        if resume and (folder / COMPARISON_FILE).exists():
            comparisons[seed] = read_comparison(folder)  # finished before
            continue
        first = folders[seeds[0]]
        prepared = data is not None and Path(data).suffix == ".bin"
        if folder != first and not prepared and not (folder / "moe" / "tokenizer.json").exists():
            if run.is_main:  # the first seed's tokens, no second tokenizer training
                copy_run_data(first / "moe", folder / "moe")
        if run.is_main:
            log(f"seed {seed} ({len(comparisons) + 1} of {num_seeds})")
        comparisons[seed] = compare(
            moe_config,
            dataclasses.replace(train_config, seed=seed),
            folder,
            data=data,
            resume=resume,
            show_progress=show_progress,
            log=log,
            mesh=mesh,
        )
        if run.is_main:
            log(format_table(comparisons[seed]))
    summary = summarize_seeds(comparisons)
    summary.job_seconds = time.perf_counter() - started
    summary.peak_memory_gb = peak_memory_gb()
    if run.is_main:
        data_out = dataclasses.asdict(summary)
        (out_dir / SUMMARY_FILE).write_text(json.dumps(data_out, indent=1), encoding="utf-8")
    return summary


def resume_seeds(
    out_dir: str | Path,
    *,
    show_progress: bool = True,
    log=print_line,
    mesh: ParallelMesh | None = None,
) -> SeedsSummary:
    """Continue a stopped seeds job with the settings saved in out_dir/seeds.json."""
    job = json.loads((Path(out_dir) / SEEDS_FILE).read_text(encoding="utf-8"))
    train_config = train_config_from_dict(job["train"])
    return compare_seeds(
        model_config_from_dict(job["model"]),
        train_config,
        out_dir,
        len(job["seeds"]),
        data=job["data"],
        resume=True,
        show_progress=show_progress,
        log=log,
        mesh=mesh,
    )


def figures(comparison: Comparison) -> dict[str, float | None]:
    """One seed's FIGURES from its Comparison (None where it has no value)."""
    moe, dense = comparison.moe, comparison.dense
    values = {
        "moe_final_val_loss": moe.final_val_loss,
        "dense_final_val_loss": dense.final_val_loss,
        "loss_gap": comparison.loss_gap,
        "steps_to_dense_loss": comparison.steps_to_dense_loss,
        "speedup": comparison.speedup,
        "moe_tokens_per_s": moe.tokens_per_s,
        "dense_tokens_per_s": dense.tokens_per_s,
        "tokens_per_s_ratio": moe.tokens_per_s / dense.tokens_per_s,
        "wall_clock_speedup": comparison.wall_clock_speedup,
        "moe_train_seconds": moe.train_seconds,
        "dense_train_seconds": dense.train_seconds,
    }
    return {k: None if v is None or math.isnan(v) else v for k, v in values.items()}


def summarize_seeds(comparisons: dict[int, Comparison]) -> SeedsSummary:
    """Each seed's figures, their mean +- std, and the seeds where the claim fails."""
    per_seed = {seed: figures(comparison) for seed, comparison in comparisons.items()}
    aggregate = {}
    for key, _, _ in FIGURES:
        values = [f[key] for f in per_seed.values() if f[key] is not None]
        aggregate[key] = {
            "mean": statistics.mean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else (0.0 if values else None),
            "n": len(values),
        }
    fails = [seed for seed, comparison in comparisons.items() if not claim_holds(comparison)]
    return SeedsSummary(
        seeds=list(comparisons),
        per_seed=per_seed,
        aggregate=aggregate,
        claim_fails=fails,
        job_seconds=math.nan,
        peak_memory_gb=math.nan,
    )


def format_summary(summary: SeedsSummary) -> str:
    """The summary as a plain-text table: mean +- std over the seeds, then the claim."""
    num_seeds = len(summary.seeds)
    seeds = ", ".join(map(str, summary.seeds))
    lines = [f"over {num_seeds} seeds ({seeds}): mean +- std (sample std, n - 1)"]
    for key, label, spec in FIGURES:
        stats = summary.aggregate[key]
        if stats["n"] == 0:
            lines.append(f"{label:<34}none")
            continue
        text = f"{format(stats['mean'], spec)} +- {format(stats['std'], spec.lstrip('+'))}"
        if stats["n"] < num_seeds:
            text += f"  ({stats['n']} of {num_seeds} seeds)"
        lines.append(f"{label:<34}{text}")
    claim = (
        "claim (the MoE reaches the dense final loss sooner in steps and on the wall clock, "
        "and ends below it): "
    )
    if summary.claim_fails:
        failed = ", ".join(map(str, summary.claim_fails))
        lines.append(claim + f"fails in seed{'s' * (len(summary.claim_fails) > 1)} {failed}")
    else:
        lines.append(claim + "holds in every seed")
    lines.append(
        f"whole job: {summary.job_seconds:.0f} s wall time, peak memory "
        f"{summary.peak_memory_gb:.2f} GB"
    )
    return "\n".join(lines)
