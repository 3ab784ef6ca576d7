"""MoE versus its dense twin: the same tokens, batches, seed and step budget.

    RUN/moe/, RUN/dense/   two ordinary run directories (moekit eval / generate work on them)
    RUN/comparison.json    the numbers of the table
    RUN/loss.png           both validation curves

The speed-up is dense steps / MoE steps to the same validation loss: the steps the MoE
needs to reach the dense model's final validation loss, interpolated linearly between
evaluations, against the dense model's full budget. The wall-clock speed-up is the same
race on a stopwatch: the dense model's training time over the MoE's training time up to
that step (the sum of its measured step times; evaluation excluded for both). The two
models train in lockstep, eval_every steps at a time each (train/lockstep.py), so both
stopwatches run under the same machine conditions.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data import CorpusConfig
from ..models import ModelConfig, count_parameters, dense_twin
from ..parallel import ParallelMesh
from .builder import build_job
from .compiling import CompileDecision
from .config import TrainConfig, for_dense_twin
from .console import discard_line, print_line
from .data import copy_run_data
from .lockstep import train_in_lockstep
from .run import run_on
from .rundir import CONFIG_FILE, checkpoint_dir
from .trainer import TrainResult

COMPARISON_FILE = "comparison.json"
PLOT_FILE = "loss.png"
RUN_NAMES = ("moe", "dense")


def comparison_runs(path: str | Path) -> dict[str, Path] | None:
    """{"moe": RUN/moe, "dense": RUN/dense} when path is a comparison folder, else None.

    A comparison folder holds moe/ and no config.json of its own (a run directory has
    one); dense/ appears once the MoE run has trained. The one place that knows the layout.
    """
    path = Path(path)
    if not (path / RUN_NAMES[0]).is_dir() or (path / CONFIG_FILE).exists():
        return None
    return {name: path / name for name in RUN_NAMES}


@dataclass
class ModelSummary:
    """One column of the comparison table."""

    name: str
    total_params: int
    active_params: int
    final_val_loss: float
    tokens_per_s: float
    train_seconds: float
    evals: list[tuple[int, float]]


@dataclass
class Comparison:
    """The comparison's numbers. steps_to_dense_loss is None when the MoE never got there."""

    moe: ModelSummary
    dense: ModelSummary
    steps: int
    tokens_per_step: int
    steps_to_dense_loss: float | None
    speedup: float | None
    seconds_to_dense_loss: float | None = None
    wall_clock_speedup: float | None = None
    # dense final - MoE final validation loss, in nats (positive: the MoE ended below)
    loss_gap: float = math.nan
    # this process's peak resident memory (GB) and the whole job's wall time (s); a
    # resumed job counts the resumed part only
    peak_memory_gb: float | None = None
    job_seconds: float | None = None


def compare(
    moe_config: ModelConfig,
    train_config: TrainConfig,
    out_dir: str | Path,
    *,
    data: str | Path | None = None,
    corpus_config: CorpusConfig | None = None,
    resume: bool = False,
    show_progress: bool = True,
    log=print_line,
    mesh: ParallelMesh | None = None,
) -> Comparison:
    """Train moe_config and dense_twin(moe_config) in lockstep, then write the table's files.

    The two models train alternately, eval_every steps at a time (train/lockstep.py), so
    both are timed under the same machine conditions; each gets the results it gets
    trained alone. One line per evaluation goes to `log` as the job runs.

    Args:
        moe_config: the MoE model (e.g. presets.tiny()).
        train_config: training settings of both runs (the dense twin trains at dense_lr).
        out_dir: the comparison directory (two run directories go inside).
        data: see prepare_run_data (None = the default corpus).
        corpus_config: a smaller default corpus.
        resume: continue runs that have a checkpoint (a finished one trains no further).
        show_progress: tqdm bars.
        log: where progress lines go.
        mesh: the ranks to train on (None = this process); rank 0 writes the files.
    Returns:
        The Comparison (also in out_dir/comparison.json).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    run = run_on(mesh)
    moe_name, dense_name = RUN_NAMES
    runs = {moe_name: moe_config, dense_name: dense_twin(moe_config)}
    train_configs = {moe_name: train_config, dense_name: for_dense_twin(train_config)}
    prepared = data is not None and Path(data).suffix == ".bin"
    trainers = {}
    # One decision for both: the MoE and its twin compile, or stay eager, alike.
    compile_decision = CompileDecision(
        train_config.compile, log=log if run.is_main else discard_line
    )
    for name, model_config in runs.items():
        run_dir = out_dir / name
        if name == dense_name and not prepared and not (run_dir / "tokenizer.json").exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            if run.is_main:  # same tokens, no second tokenizer training
                copy_run_data(out_dir / moe_name, run_dir)
        job = build_job(
            model_config,
            train_configs[name],
            run_dir,
            data=data,
            corpus_config=corpus_config,
            mesh=mesh,
            resume=resume and checkpoint_dir(run_dir) is not None,
            show_progress=show_progress,
            label=name,
            compile_decision=compile_decision,
        )
        trainers[name] = job.trainer
    if run.is_main:
        log(
            f"training {moe_name} in {out_dir / moe_name} and {dense_name} in "
            f"{out_dir / dense_name}, alternating every {train_config.eval_every} steps"
        )
    results = train_in_lockstep(trainers, log=log)
    params = {name: count_parameters(trainer.model) for name, trainer in trainers.items()}
    comparison = summarize(
        {name: (results[name], params[name]) for name in RUN_NAMES}, train_config
    )
    comparison.peak_memory_gb = peak_memory_gb()
    comparison.job_seconds = time.perf_counter() - started
    if run.is_main:
        write_outputs(comparison, out_dir)
    return comparison


def peak_memory_gb() -> float:
    """This process's peak resident memory so far (getrusage maxrss), in GB (1e9 bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024) / 1e9  # Linux counts KiB


def claim_holds(comparison: Comparison) -> bool:
    """Whether the MoE reached the dense final loss sooner in steps and on the wall clock,
    and ended below it."""
    return (
        comparison.speedup is not None
        and comparison.speedup > 1
        and comparison.wall_clock_speedup is not None
        and comparison.wall_clock_speedup > 1
        and comparison.moe.final_val_loss < comparison.dense.final_val_loss
    )


def read_comparison(out_dir: str | Path) -> Comparison:
    """The Comparison a finished comparison wrote into out_dir/comparison.json."""
    data = json.loads((Path(out_dir) / COMPARISON_FILE).read_text(encoding="utf-8"))
    for name in RUN_NAMES:
        summary = _none_to_nan(data[name], ("final_val_loss", "tokens_per_s"))
        data[name] = ModelSummary(**summary | {"evals": [tuple(e) for e in summary["evals"]]})
    return Comparison(**_none_to_nan(data, ("loss_gap",)))


def summarize(results: dict[str, tuple[TrainResult, object]], config: TrainConfig) -> Comparison:
    """Build the Comparison from the two runs' results and parameter counts."""
    summaries = {}
    for name, (result, params) in results.items():
        summaries[name] = ModelSummary(
            name=name,
            total_params=params.total,
            active_params=params.active,
            final_val_loss=result.final_val_loss,
            tokens_per_s=result.tokens_per_s,
            train_seconds=result.train_seconds,
            evals=result.evals,
        )
    moe, dense = (summaries[name] for name in RUN_NAMES)
    reached = steps_to_reach(moe.evals, dense.final_val_loss)
    dense_steps = dense.evals[-1][0] if dense.evals else 0
    seconds = None
    if reached is not None:
        seconds = seconds_at_step(results["moe"][0].step_seconds, reached)
    return Comparison(
        moe=moe,
        dense=dense,
        steps=dense_steps,
        tokens_per_step=config.batch_size * config.seq_len,
        steps_to_dense_loss=reached,
        speedup=dense_steps / reached if reached else None,
        seconds_to_dense_loss=seconds,
        wall_clock_speedup=dense.train_seconds / seconds if seconds else None,
        loss_gap=dense.final_val_loss - moe.final_val_loss,
    )


def seconds_at_step(step_seconds: list[float], step: float) -> float | None:
    """Training time when `step` (fractional: part of the next step) steps are done, from
    the per-step times; None when the log holds fewer steps."""
    whole = math.floor(step)
    if whole > len(step_seconds) or (step > whole and whole >= len(step_seconds)):
        return None
    partial = (step - whole) * step_seconds[whole] if step > whole else 0.0
    return sum(step_seconds[:whole]) + partial


def steps_to_reach(evals: list[tuple[int, float]], target: float) -> float | None:
    """First (linearly interpolated) step at which the loss curve reaches target, or None.

    Args:
        evals: (step, loss) pairs in step order.
        target: the loss to reach.
    Returns:
        The step, or None when no evaluation got to target.
    """
    for i, (step, loss) in enumerate(evals):
        if loss <= target:
            if i == 0:
                return float(step)
            prev_step, prev_loss = evals[i - 1]
            # Between two evaluations the loss is taken to fall linearly.
            return prev_step + (step - prev_step) * (prev_loss - target) / (prev_loss - loss)
    return None


def format_table(comparison: Comparison) -> str:
    """The comparison as a plain-text table."""
    moe, dense = comparison.moe, comparison.dense
    reached = comparison.steps_to_dense_loss

    def row(label, moe_value, dense_value):
        return f"{label:<32}{moe_value:>14}{dense_value:>14}"

    lines = [
        row("", "MoE", "dense"),
        row(
            "total parameters",
            f"{moe.total_params / 1e6:.2f} M",
            f"{dense.total_params / 1e6:.2f} M",
        ),
        row(
            "active parameters per token",
            f"{moe.active_params / 1e6:.2f} M",
            f"{dense.active_params / 1e6:.2f} M",
        ),
        row(
            "final validation loss",
            f"{moe.final_val_loss:.4f}",
            f"{dense.final_val_loss:.4f}",
        ),
        f"{'loss gap (dense - MoE final)':<32}{comparison.loss_gap:>+14.4f} nats",
        row(
            "steps to dense final val loss",
            "not reached" if reached is None else f"{reached:.0f}",
            f"{comparison.steps}",
        ),
        row(
            "training tokens/s",
            f"{moe.tokens_per_s:,.0f}",
            f"{dense.tokens_per_s:,.0f}",
        ),
        row(
            "training time",
            f"{moe.train_seconds:.0f} s",
            f"{dense.train_seconds:.0f} s",
        ),
    ]
    if comparison.speedup is None:
        lines.append(f"speed-up: the MoE did not reach the dense loss in {comparison.steps} steps")
    else:
        lines.append(
            f"speed-up (dense steps / MoE steps to the same loss): {comparison.speedup:.2f}x"
        )
    if comparison.wall_clock_speedup is not None:
        lines.append(
            "wall-clock speed-up (dense training time / MoE time to the same loss): "
            f"{comparison.wall_clock_speedup:.2f}x "
            f"({dense.train_seconds:.0f} s / {comparison.seconds_to_dense_loss:.0f} s)"
        )
    if comparison.job_seconds is not None:
        lines.append(
            f"whole job: {comparison.job_seconds:.0f} s wall time (evaluations, data and "
            f"checkpoints included), peak memory {comparison.peak_memory_gb:.2f} GB"
        )
    return "\n".join(lines)


def write_outputs(comparison: Comparison, out_dir: str | Path) -> None:
    """Write comparison.json and loss.png into out_dir."""
    out_dir = Path(out_dir)
    data = _nan_to_none(asdict(comparison))
    for key in RUN_NAMES:
        data[key] = _nan_to_none(data[key])
    (out_dir / COMPARISON_FILE).write_text(json.dumps(data, indent=1), encoding="utf-8")
    plot_curves(comparison, out_dir / PLOT_FILE)


def _nan_to_none(data: dict) -> dict:
    """JSON has no NaN: a missing number is null."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in data.items()}


def _none_to_nan(data: dict, keys: tuple[str, ...]) -> dict:
    return data | {k: math.nan for k in keys if data.get(k) is None}


def plot_curves(comparison: Comparison, path: str | Path) -> None:
    """Both validation-loss curves against training tokens, saved as a PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for summary, label in ((comparison.moe, "MoE"), (comparison.dense, "dense twin")):
        steps = [s for s, _ in summary.evals]
        axes.plot(
            steps,
            [loss for _, loss in summary.evals],
            marker="o",
            markersize=3,
            label=f"{label} ({summary.total_params / 1e6:.2f} M total, "
            f"{summary.active_params / 1e6:.2f} M active)",
        )
    axes.axhline(comparison.dense.final_val_loss, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel(f"step ({comparison.tokens_per_step:,} tokens each)")
    axes.set_ylabel("validation loss (nats/token)")
    axes.set_title("MoE versus its dense twin")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
