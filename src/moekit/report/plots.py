"""The report's figures, drawn with matplotlib (Agg) and returned as PNG data URIs.

# L MoE layers, E experts, D domains (or labels), S logged steps

A data URI keeps report.html one self-contained file: no image files beside it and
nothing for a browser to fetch.
"""

from __future__ import annotations

import base64
import io

import numpy as np

from .stats import mutual_information, normalised_rows

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def to_data_uri(figure) -> str:
    """The figure as a PNG data URI; closes the figure."""
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def curves(
    series: list[tuple[str, list[tuple[int, float]]]],
    *,
    ylabel: str,
    title: str,
    marker: tuple[float, str] | None = None,
    hline: float | None = None,
) -> str:
    """Line plot of (label, [(step, value)]) series; an optional vertical marker (step, text)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7.5, 4), dpi=100)
    for (label, points), colour in zip(series, COLOURS * 4):
        if points:
            steps, values = zip(*points)
            style = (
                {"linewidth": 0.8, "alpha": 0.45}
                if label.endswith("(train)")
                else {"marker": "o", "markersize": 3}
            )
            axes.plot(steps, values, label=label, color=colour, **style)
    if hline is not None:
        axes.axhline(hline, color="grey", linestyle=":", linewidth=1)
    if marker is not None:
        step, text = marker
        axes.axvline(step, color="black", linestyle="--", linewidth=1)
        axes.annotate(
            text,
            xy=(step, 0.93),
            xycoords=("data", "axes fraction"),
            xytext=(6, 0),
            textcoords="offset points",
            fontsize=9,
            va="top",
        )
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return to_data_uri(figure)


def load_heatmap(loads_LE: np.ndarray, layer_names: list[str], title: str) -> str:
    """Layer x expert heatmap of each expert's share of its layer's assignments."""
    plt = _pyplot()
    share_LE = normalised_rows(loads_LE) * 100
    L, E = share_LE.shape
    figure, axes = plt.subplots(figsize=(min(1.2 + 0.45 * E, 14), 1.2 + 0.42 * L), dpi=100)
    image = _percent_heatmap(axes, share_LE, layer_names, "viridis")
    axes.set_title(f"{title} (% of the layer's assignments; uniform = {100 / E:.1f}%)", fontsize=10)
    figure.colorbar(image, ax=axes, fraction=0.03)
    figure.tight_layout()
    return to_data_uri(figure)


def load_evolution(steps_S: list[int], loads_LSE: list[np.ndarray], layer_names: list[str]) -> str:
    """One step x expert heatmap per layer: how each expert's share moved during training."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    L = len(loads_LSE)
    columns = min(L, 4)
    rows = -(-L // columns)
    figure, grid = plt.subplots(
        rows, columns, figsize=(3.2 * columns + 0.8, 2.8 * rows), dpi=100, squeeze=False
    )
    # Rows centred on their steps: half a logging interval above and below.
    half = (steps_S[-1] - steps_S[0]) / (2 * (len(steps_S) - 1)) if len(steps_S) > 1 else 0.5
    vmax = max(float((normalised_rows(loads) * 100).max()) for loads in loads_LSE)
    for axes, loads_SE, name in zip(grid.flat, loads_LSE, layer_names):
        share_SE = normalised_rows(loads_SE) * 100
        image = axes.imshow(
            share_SE,
            cmap="viridis",
            aspect="auto",
            vmin=0,
            vmax=vmax,
            extent=(
                -0.5,
                share_SE.shape[1] - 0.5,
                steps_S[-1] + half,
                steps_S[0] - half,
            ),
        )
        axes.set_title(name, fontsize=9)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("expert", fontsize=8)
        axes.set_ylabel("step", fontsize=8)
        axes.tick_params(labelsize=7)
    for axes in list(grid.flat)[L:]:
        axes.axis("off")
    figure.colorbar(image, ax=grid.ravel().tolist(), fraction=0.02, label="% of assignments")
    return to_data_uri(figure)


def layer_metrics(panels: list[tuple[str, dict[str, list[tuple[int, float]]]]]) -> str:
    """Small multiples: per panel (title, {layer name: [(step, value)]})."""
    plt = _pyplot()
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    figure, grid = plt.subplots(
        rows, columns, figsize=(4 * columns, 2.9 * rows), dpi=100, squeeze=False
    )
    for axes, (title, per_layer) in zip(grid.flat, panels):
        for (name, points), colour in zip(per_layer.items(), COLOURS * 8):
            if points:
                steps, values = zip(*points)
                axes.plot(steps, values, label=name, color=colour, linewidth=1.2)
        axes.set_title(title, fontsize=9)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
    for axes in list(grid.flat)[len(panels) :]:
        axes.axis("off")
    grid.flat[0].legend(fontsize=7)
    figure.tight_layout()
    return to_data_uri(figure)


def specialisation(
    counts_DE: np.ndarray, labels: list[str], title: str, word: str = "label"
) -> str:
    """Label x expert heatmap: each label's share of assignments per expert, with the MI."""
    plt = _pyplot()
    share_DE = normalised_rows(counts_DE) * 100
    D, E = share_DE.shape
    figure, axes = plt.subplots(figsize=(min(1.8 + 0.42 * E, 14), 1.0 + 0.38 * D), dpi=100)
    image = _percent_heatmap(axes, share_DE, labels, "magma")
    bits = mutual_information(counts_DE)
    axes.set_title(f"{title}: I({word}; expert) = {bits:.3f} bits", fontsize=10)
    figure.colorbar(image, ax=axes, fraction=0.03, label="% of the row")
    figure.tight_layout()
    return to_data_uri(figure)


def _percent_heatmap(axes, share_RE: np.ndarray, row_names: list[str], cmap: str):
    """Rows x experts of percentages, each cell written in when there are <= 32 experts."""
    R, E = share_RE.shape
    image = axes.imshow(share_RE, cmap=cmap, aspect="auto", vmin=0)
    if E <= 32:
        for (i, j), value in np.ndenumerate(share_RE):
            axes.text(
                j,
                i,
                f"{value:.0f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if value < share_RE.max() * 0.6 else "black",
            )
    axes.set_xticks(range(E), [str(e) for e in range(E)], fontsize=8)
    axes.set_yticks(range(R), row_names, fontsize=8)
    axes.set_xlabel("expert")
    return image
