"""The routing-diff section: how two engines' traces of the same tokens differ
(moekit.traces.diff), as HTML in the report's style: a page of its own (`moekit routing
diff --html`), or a section of a run's report.html when the run holds routing-diff.json
(`moekit routing diff --save RUN`)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from ..traces import TraceDiff
from .html import CSS, _note, _section, _table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _bin(lo: float, hi: float) -> str:
    return f"[{lo:g}, {'inf' if hi == float('inf') else f'{hi:g}'})"


def diff_section(diff: TraceDiff) -> str:
    """Per-layer flip rates and weight gaps; flips against the router's margin (measured
    and predicted); flips by position in the sequence."""
    layers = [
        [d.layer, str(d.tokens), _pct(d.top1), _pct(d.set), _pct(d.order),
         _num(d.weight_mean), _num(d.weight_max), _pct(d.predicted), _pct(d.rounding)]
        for d in diff.layers
    ]  # fmt: skip
    header = ["layer", "tokens", "top-1", "set", "order", "weight mean", "weight max"]
    header += ["predicted", "rounding only"]
    parts = [
        _note(f"a: {diff.a}; b: {diff.b}. Fractions of the tokens both traces routed."),
        _table(header, layers),
        "<h3>Flips against the router's margin (K-th minus (K+1)-th logit)</h3>",
        _table(
            ["layer", "margin", "tokens", "measured", "predicted", "rounding only"],
            [
                [
                    d.layer,
                    _bin(r["lo"], r["hi"]),
                    str(r["tokens"]),
                    _pct(r["measured"]),
                    _pct(r["predicted"]),
                    _pct(r["rounding"]),
                ]
                for d in diff.layers
                for r in d.margins
                if r["tokens"]
            ],  # fmt: skip
        ),
        "<h3>Set flips by position in the sequence</h3>",
        _table(
            ["layer", "positions", "tokens", "set flips"],
            [
                [d.layer, _bin(r["lo"], r["hi"]), str(r["tokens"]), _pct(r["set"])]
                for d in diff.layers
                for r in d.positions
            ],
        ),
    ]
    return _section("routing-diff", "Routing diff", "\n".join(parts))


DIFF_FILE = "routing-diff.json"


def saved_diff_sections(run_dir: str | Path) -> tuple[str, ...]:
    """The routing-diff section of RUN/routing-diff.json (`moekit routing diff A B --save
    RUN`), or nothing when the run has none."""
    path = Path(run_dir) / DIFF_FILE
    if not path.is_file():
        return ()
    try:
        diff = TraceDiff.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a routing diff: {error}") from None
    return (diff_section(diff),)


def write_diff_page(diff: TraceDiff, path: str | Path) -> Path:
    """A self-contained page holding the routing-diff section."""
    path = Path(path)
    title = f"moekit routing diff: {diff.a} / {diff.b}"
    text = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n"
        f"<body><h1>{html.escape(title)}</h1>\n{diff_section(diff)}\n</body></html>\n"
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
