"""The metrics log: one JSON object per line in `metrics.jsonl`, appended as training runs.

Training records: {"split": "train", "step", "loss", "aux_loss", "lr", "grad_norm",
"tokens_per_s", "dropped_fraction", "load_cv", "time"}; evaluation records:
{"split": "val", "step", "loss", "perplexity"}. `step` counts optimizer steps taken.
"""

from __future__ import annotations

import json
from pathlib import Path

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
