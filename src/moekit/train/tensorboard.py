"""TensorBoard event files beside metrics.jsonl, for `--train.tensorboard true`.

    RUN/tensorboard/events.out.tfevents.*

Scalars: train/loss, train/aux_loss, train/lr, train/grad_norm, train/tokens_per_s,
train/dropped_fraction, train/load_cv (and train/mtp_loss with mtp_depth > 0); val/loss, val/perplexity. Per MoE layer, at each
routing record (every `routing_stats_every` steps): routing/layer{i}/{load_cv,
dropped_fraction, router_entropy} and the histogram routing/layer{i}/expert_load (one bucket
per expert, the tokens it processed since the previous record). The JSON logs stay the
source of truth (the report reads them); these files are for watching a run live.
tensorboard is an optional dependency: `pip install 'moekit[tensorboard]'`.
"""

from __future__ import annotations

from pathlib import Path

TENSORBOARD_DIR = "tensorboard"
TRAIN_SCALARS = (
    "loss",
    "aux_loss",
    "mtp_loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "dropped_fraction",
    "load_cv",
)
VAL_SCALARS = ("loss", "perplexity")
ROUTING_SCALARS = ("load_cv", "dropped_fraction", "router_entropy")


class TensorBoardLog:
    """Writes the metrics and routing records of a run as TensorBoard events.

    Args:
        run_dir: the run directory; events go to run_dir/tensorboard/.
        purge_step: on resume, the first step the run redoes: TensorBoard hides the
            events already written from that step on (as metrics.jsonl drops them).
    """

    def __init__(self, run_dir: str | Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ValueError(
                "--train.tensorboard true needs the tensorboard package: "
                "pip install 'moekit[tensorboard]'"
            ) from error
        self.writer = SummaryWriter(
            log_dir=str(Path(run_dir) / TENSORBOARD_DIR), purge_step=purge_step
        )

    def record(self, record: dict) -> None:
        """One metrics.jsonl record (a training step or an evaluation)."""
        split, step = record["split"], record["step"]
        names = TRAIN_SCALARS if split == "train" else VAL_SCALARS
        for name in names:
            if name in record:
                self.writer.add_scalar(f"{split}/{name}", record[name], step)

    def routing(self, record: dict | None) -> None:
        """One routing.jsonl training record: per-layer scalars and the expert loads."""
        if record is None or record.get("split") != "train":
            return
        step = record["step"]
        for layer in record["layers"]:
            prefix = f"routing/layer{layer['layer']}"
            for name in ROUTING_SCALARS:
                self.writer.add_scalar(f"{prefix}/{name}", layer[name], step)
            counts = layer["tokens_per_expert"]
            total = sum(counts)
            if total == 0:
                continue
            experts = range(len(counts))
            self.writer.add_histogram_raw(
                f"{prefix}/expert_load",
                min=0,
                max=len(counts) - 1,
                num=total,
                sum=sum(e * c for e, c in zip(experts, counts)),
                sum_squares=sum(e * e * c for e, c in zip(experts, counts)),
                bucket_limits=[e + 0.5 for e in experts],
                bucket_counts=counts,
                global_step=step,
            )
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
