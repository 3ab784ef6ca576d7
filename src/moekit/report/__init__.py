"""See what the router does: routing statistics, the HTML report, terminal colouring.

    moekit.report.stats     pure functions (label x expert counts, mutual information, CV)
    moekit.report.routing   route tokens through a trained model: experts and weights per token
    moekit.report.gather    everything a report shows, read from a run directory
    moekit.report.plots     the figures (matplotlib, PNG data URIs)
    moekit.report.html      write_report(run_dir) -> report.html, self-contained
    moekit.report.terminal  the token colouring of `moekit route`

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
