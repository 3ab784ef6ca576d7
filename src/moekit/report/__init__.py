"""See what the router does: routing statistics, the HTML report, terminal colouring.

    moekit.report.stats     pure functions (label x expert counts, mutual information, CV)
    moekit.report.html      write_report(run_dir) -> report.html, self-contained
    moekit.report.route     route_text(run_dir, text): per-token experts, for `moekit route`

Only the statistics are imported here: the trainer uses them, and the other modules load
trained runs through moekit.train.
"""

from .stats import (
    entropy_bits,
    label_expert_counts,
    load_cv,
    mutual_information,
    normalised_rows,
)

__all__ = [
    "entropy_bits",
    "label_expert_counts",
    "load_cv",
    "mutual_information",
    "normalised_rows",
]
