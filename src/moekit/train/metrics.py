"""The metrics log: one JSON object per line in `metrics.jsonl`, appended as training runs.

Training records: {"split": "train", "step", "loss", "aux_loss", "lr", "grad_norm",
"tokens_per_s", "dropped_fraction", "load_cv", "time"} (plus "mtp_loss", the weighted
multi-token-prediction loss, when the model has mtp_depth > 0); evaluation records:
{"split": "val", "step", "loss", "perplexity"} (the main model's loss alone). `step` counts optimizer steps taken.
MoE runs also keep per-layer routing statistics in `routing.jsonl` (RoutingLog).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..models.expert_ids import label_expert_counts

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends records to run_dir/metrics.jsonl, flushing each line (readable while training).

    Args:
        run_dir: the run directory.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / METRICS_FILE

    def append(self, record: dict) -> None:
        """Write one record as a line of JSON."""
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past `step`: a resumed run redoes those steps and logs them again."""
        if not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(self.path)


def read_metrics(path: str | Path, split: str | None = None) -> list[dict]:
    """Records of a metrics.jsonl file (or of a run directory), optionally of one split.

    A last line cut short by a crash is skipped.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if split is None or record.get("split") == split:
            records.append(record)
    return records


ROUTING_FILE = "routing.jsonl"
ROUTING_SCALARS = ("dropped_fraction", "load_cv", "router_entropy", "balance_loss", "z_loss")


class RoutingLog(MetricsLog):
    """Per-layer routing statistics of the MoE layers in run_dir/routing.jsonl.

    Training records, every `every` steps and at the last one, cover the steps since the
    previous record: {"split": "train", "step", "steps", "layers": [{"layer",
    "tokens_per_expert": [E counts summed over the steps], "dropped_fraction", "load_cv",
    "router_entropy" (nats), "balance_loss", "z_loss" (means over the steps)}]}.
    Evaluation records: {"split": "val", "step", "domains": [names], "layers": [{"layer",
    "domain_expert_counts": [[E counts] per domain]}]}, the validation tokens' top-k
    assignments by the domain of the token being predicted.
    Steps only add tensors (no device sync); a record costs one sync, so this stays on.

    Args:
        run_dir: the run directory.
        every: steps per training record; 0 turns the log off.
    """

    def __init__(self, run_dir: str | Path, every: int = 10):
        self.path = Path(run_dir) / ROUTING_FILE
        self.every = every
        self._sums: dict[int, tuple] = {}
        self._steps = 0
        self._eval_counts: dict[int, object] = {}

    def add(self, stats: list) -> None:
        """Accumulate one training step's per-layer MoEStats (None for dense layers)."""
        if not self.every:
            return
        for layer, layer_stats in enumerate(stats):
            if layer_stats is None:
                continue
            scalars = torch.stack([getattr(layer_stats, name).float() for name in ROUTING_SCALARS])
            # A copy, never the layer's own tensor: the sums must not alias its state.
            counts_E = layer_stats.tokens_per_expert.clone()
            if layer in self._sums:
                old_counts, old_scalars = self._sums[layer]
                counts_E, scalars = old_counts + counts_E, old_scalars + scalars
            self._sums[layer] = (counts_E, scalars)
        self._steps += 1

    def flush(self, step: int) -> dict | None:
        """Write the accumulated training record for the steps up to `step` (if any) and
        return it."""
        if not self._sums:
            return None
        layers = []
        for layer, (counts_E, scalars) in sorted(self._sums.items()):
            means = (scalars / self._steps).tolist()
            layers.append(
                {"layer": layer, "tokens_per_expert": counts_E.tolist()}
                | dict(zip(ROUTING_SCALARS, means, strict=True))
            )
        record = {"split": "train", "step": step, "steps": self._steps, "layers": layers}
        self.append(record)
        self._sums, self._steps = {}, 0
        return record

    def eval_observer(self, domains_per_batch: list, num_domains: int, num_experts: int):
        """A callback for `evaluate(..., observe=)`: counts batch i's assignments by domain.

        Args:
            domains_per_batch: per evaluation batch, (B, L) domain ids of its target tokens.
            num_domains, num_experts: the sizes of the count table.
        Returns:
            observe(i, model_output), or None when the log is off.
        """
        if not self.every:
            return None
        self._eval_counts = {}

        def observe(i: int, out) -> None:
            for layer, ids_BLK in enumerate(out.expert_ids):
                if ids_BLK is not None:
                    counts = label_expert_counts(
                        ids_BLK, domains_per_batch[i], num_domains, num_experts
                    )
                    previous = self._eval_counts.get(layer)
                    self._eval_counts[layer] = counts if previous is None else previous + counts

        return observe

    def write_eval(self, step: int, domains: tuple[str, ...]) -> None:
        """Write the evaluation record the observer counted (nothing for a dense model)."""
        if not self._eval_counts:
            return
        layers = [
            {"layer": layer, "domain_expert_counts": counts.tolist()}
            for layer, counts in sorted(self._eval_counts.items())
        ]
        self.append({"split": "val", "step": step, "domains": list(domains), "layers": layers})
        self._eval_counts = {}
