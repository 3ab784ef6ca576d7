"""`report.html`: one self-contained page about a run's router, for a browser offline.

No scripts, no fonts, no stylesheets or images from elsewhere: figures are PNG data URIs,
the layer tabs are radio buttons styled with CSS, the expert weights are `title` tooltips.
Each section has an id (summary, tokens, load, specialisation, curves, params, config); a
section whose data the run lacks says why in one line instead of failing.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np

from . import plots
from .gather import ReportData, gather
from .routing import TokenRouting
from .stats import entropy_bits, load_cv, mutual_information

REPORT_FILE = "report.html"

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
section { margin-bottom: 2.5em; }
table { border-collapse: collapse; font-size: .9em; }
td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: .6em 0; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .8em; }
.note { color: #666; font-style: italic; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: .5em; }
.tabs > input { display: none; }
.tabs > label { display: inline-block; padding: .3em .9em; border: 1px solid #ccc;
                border-bottom: none; cursor: pointer; background: #f4f4f4; margin-right: 2px; }
.tabs > input:checked + label { background: #fff; font-weight: bold; }
.panel { display: none; border: 1px solid #ccc; padding: .8em; }
.sample { font-family: ui-monospace, monospace; white-space: pre-wrap; font-size: .85em;
          line-height: 1.7; margin: .3em 0 1em; }
.sample span { border-radius: 2px; }
.sample span:hover { outline: 1px solid #000; }
.legend span { display: inline-block; font-family: ui-monospace, monospace; font-size: .8em;
               padding: 0 .4em; margin: 1px; border-radius: 2px; }
"""


def expert_colour(expert: int, num_experts: int) -> str:
    """A light background colour for an expert: hues spread around the circle."""
    if expert < 0:
        return "#ffffff"
    hue = (expert * 360 / max(num_experts, 1) + (expert % 2) * 180 / max(num_experts, 1)) % 360
    lightness = 78 if expert % 2 else 86
    return f"hsl({hue:.0f}, 70%, {lightness}%)"


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    extra_sections: tuple[str, ...] = (),
    **gather_options,
) -> Path:
    """Write the report of a run or comparison directory.

    Args:
        run_dir: the directory (see moekit.report.gather).
        out: the HTML file (default RUN_DIR/report.html).
        extra_sections: more sections' HTML, after the others (the routing diff).
        gather_options: tokens_per_domain, sample_tokens, tokenizer (see gather).
    Returns:
        The path written.
    """
    data = gather(run_dir, **gather_options)
    path = Path(out) if out is not None else Path(run_dir) / REPORT_FILE
    text = render(data, extra_sections)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def render(data: ReportData, extra_sections: tuple[str, ...] = ()) -> str:
    """The whole page for the gathered data (and any extra sections' HTML)."""
    body = "\n".join(
        [
            _section(name, title, builder(data))
            for name, (title, builder) in SECTION_BUILDERS.items()
        ]
        + list(extra_sections)
    )
    title = f"moekit report: {data.run_dir.name}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}{_tab_css(data)}</style></head>\n"
        f"<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def _section(name: str, title: str, content: str) -> str:
    return f'<section id="{name}"><h2>{html.escape(title)}</h2>\n{content}\n</section>'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _table(header: list[str] | None, rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header or [])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table>{f'<tr>{head}</tr>' if head else ''}{body}</table>"


def _summary(data: ReportData) -> str:
    rows = [["directory", str(data.run_dir)], ["kind", data.kind]]
    model = data.config.get("model", {})
    moe = model.get("moe")
    if moe:
        rows.append(
            [
                "experts",
                (
                    f"{moe['num_experts']} routed, top-{moe['top_k']} ({moe['router']}), "
                    f"{moe.get('num_shared_experts', 0)} shared"
                ),
            ]
        )
        rows.append(["MoE layers", f"{len(data.label_counts) or '?'} of {model['num_layers']}"])
    if "task" in data.config:
        rows.append(["task", str(data.config["task"])])
    val = [r for r in data.metrics if r.get("split") == "val"]
    if val:
        rows.append(["final validation loss", f"{val[-1]['loss']:.4f} (step {val[-1]['step']})"])
        if "accuracy" in val[-1]:
            rows.append(["final validation accuracy", f"{val[-1]['accuracy']:.4f}"])
    if data.comparison:
        dense_loss = data.comparison["dense"].get("final_val_loss")
        if dense_loss is not None:
            rows.append(["dense twin's final validation loss", f"{dense_loss:.4f}"])
        speedup = data.comparison.get("speedup")
        rows.append(
            [
                "speed-up over the dense twin",
                "not reached"
                if speedup is None
                else f"{speedup:.2f}x (dense steps / MoE steps to its loss)",
            ]
        )
    if data.label_counts:
        mis = [f"{mutual_information(c):.3f}" for _, c in data.label_counts]
        label = "label" if data.kind == "task" else "domain"
        rows.append([f"I({label}; expert) per layer, bits", ", ".join(mis)])
    return _table(None, rows)


def _tab_css(data: ReportData) -> str:
    return "".join(
        f"#tab-{i}:checked ~ #panel-{i} {{ display: block; }}"
        for i in range(len(_sample_layers(data)))
    )


def _sample_layers(data: ReportData) -> list[int]:
    return data.samples[0][1].layers if data.samples else []


def _tokens(data: ReportData) -> str:
    if not data.samples:
        return _note(_why_no_routing(data, "per-token routing"))
    E = data.num_experts
    layers = _sample_layers(data)
    radios, panels = [], []
    for i, layer in enumerate(layers):
        checked = " checked" if i == 0 else ""
        radios.append(
            f'<input type="radio" name="layer-tab" id="tab-{i}"{checked}>'
            f'<label for="tab-{i}">layer {layer}</label>'
        )
        samples = "".join(
            f'<h3>{html.escape(domain)}</h3><div class="sample">{_coloured(routing, i, E)}</div>'
            for domain, routing in data.samples
        )
        panels.append(f'<div class="panel" id="panel-{i}">{_legend(E)}{samples}</div>')
    intro = _note(
        "Each token's background is the expert with the largest weight in the chosen "
        "layer; hover a token for all its experts and weights."
    )
    return intro + '<div class="tabs">' + "".join(radios) + "".join(panels) + "</div>"


def _legend(num_experts: int) -> str:
    chips = "".join(
        f'<span style="background:{expert_colour(e, num_experts)}">expert {e}</span>'
        for e in range(num_experts)
    )
    return f'<div class="legend">{chips}</div>'


def _coloured(routing: TokenRouting, position: int, num_experts: int) -> str:
    top1_T = routing.top1(position)
    ids_TK, weights_TK = routing.ids[position], routing.weights[position]
    spans = []
    for t, piece in enumerate(routing.pieces):
        chosen = [f"expert {e}: {w:.2f}" for e, w in zip(ids_TK[t], weights_TK[t]) if e >= 0]
        tip = f"{piece!r} layer {routing.layers[position]}: " + ", ".join(chosen)
        colour = expert_colour(int(top1_T[t]), num_experts)
        spans.append(
            f'<span style="background:{colour}" title="{html.escape(tip)}">{html.escape(piece)}</span>'
        )
    return "".join(spans)


def _why_no_routing(data: ReportData, what: str) -> str:
    if data.kind == "task":
        return f"No {what}: this {data.config.get('task')} run stores no per-token routing."
    moe = data.config.get("model", {}).get("moe")
    if not moe:
        return f"No {what}: this is a dense model (no MoE layers)."
    if data.no_checkpoint:
        return f"No {what}: {data.no_checkpoint}."
    if moe.get("router") == "soft":
        return f"No {what}: a Soft MoE router mixes every token into every expert."
    return f"No {what} for this run."


def _load(data: ReportData) -> str:
    parts = []
    if data.label_counts:
        names = [name for name, _ in data.label_counts]
        loads_LE = np.stack([counts.sum(axis=0) for _, counts in data.label_counts])
        source = "the report's validation sample" if data.kind != "task" else "the evaluation data"
        parts.append(
            _img(
                plots.load_heatmap(loads_LE, names, f"Load on {source}"),
                "expert load heatmap",
            )
        )
        rows = [
            [
                name,
                f"{load_cv(load):.3f}",
                f"{entropy_bits(load):.2f} of {math.log2(len(load)):.2f}",
            ]
            for name, load in zip(names, loads_LE)
        ]
        parts.append(_table(["layer", "load CV", "load entropy (bits)"], rows))
    train = [r for r in data.routing if r.get("split") == "train"]
    if train:
        parts.append("<h3>Over training</h3>")
        parts.append(_load_evolution(train))
    elif data.kind != "task" and data.config.get("model", {}).get("moe"):
        parts.append(
            _note(
                "No statistics over training: this run has no routing.jsonl "
                "(it was trained before moekit logged routing statistics)."
            )
        )
    return "".join(parts) or _note(_why_no_routing(data, "expert load"))


def _load_evolution(train: list[dict]) -> str:
    layers = [layer["layer"] for layer in train[0]["layers"]]
    names = [f"layer {layer}" for layer in layers]
    steps = [r["step"] for r in train]
    loads = [
        np.array([r["layers"][i]["tokens_per_expert"] for r in train]) for i in range(len(layers))
    ]
    panels = []
    for key, title in (
        ("load_cv", "load CV (per step, mean)"),
        ("router_entropy", "router entropy (nats)"),
        ("dropped_fraction", "dropped fraction"),
        ("balance_loss", "balance loss (unweighted)"),
        ("z_loss", "router z-loss (unweighted)"),
    ):
        panels.append(
            (
                title,
                {
                    name: [(r["step"], r["layers"][i][key]) for r in train]
                    for i, name in enumerate(names)
                },
            )
        )
    return _img(plots.load_evolution(steps, loads, names), "expert load over training") + _img(
        plots.layer_metrics(panels), "routing statistics over training"
    )


def _specialisation(data: ReportData) -> str:
    if not data.label_counts:
        if data.kind == "task":
            return _note("No specialisation table: this run has no specialisation.json.")
        return _note(_why_no_routing(data, "specialisation table"))
    D = len(data.labels)
    bound = math.log2(min(D, data.label_counts[0][1].shape[1])) if D > 1 else 0.0
    parts = [
        _note(
            f"Rows: {'domains' if data.kind != 'task' else 'labels'}; each row is that "
            f"label's share of its top-k assignments per expert. Mutual information in bits "
            f"(0 = experts ignore the label; at most {bound:.2f} bits here)."
        )
    ]
    word = "label" if data.kind == "task" else "domain"
    figures = [
        _img(
            plots.specialisation(counts, data.labels, name, word),
            f"specialisation {name}",
        )
        for name, counts in data.label_counts
    ]
    parts.append('<div class="grid">' + "".join(figures) + "</div>")
    val = [r for r in data.routing if r.get("split") == "val" and r.get("layers")]
    if len(val) > 1:
        series = {}
        for record in val:
            for layer in record["layers"]:
                counts = np.array(layer["domain_expert_counts"])
                series.setdefault(f"layer {layer['layer']}", []).append(
                    (record["step"], mutual_information(counts))
                )
        parts.append("<h3>Mutual information over training (the evaluation batches)</h3>")
        parts.append(
            _img(
                plots.curves(
                    list(series.items()),
                    ylabel="I(domain; expert), bits",
                    title="Specialisation during training",
                ),
                "mutual information over training",
            )
        )
    return "".join(parts)


def _points(metrics: list[dict], split: str, key: str) -> list[tuple[int, float]]:
    return [
        (r["step"], r[key]) for r in metrics if r.get("split") == split and r.get(key) is not None
    ]


def _curves(data: ReportData) -> str:
    if not data.metrics:
        return _note("No training curves: this run has no metrics.jsonl.")
    main = "MoE" if data.kind == "comparison" else "model"
    series = [
        (f"{main} (validation)", _points(data.metrics, "val", "loss")),
        (f"{main} (train)", _points(data.metrics, "train", "loss")),
    ]
    marker = hline = None
    if data.twin_metrics:
        series[1:1] = [("dense twin (validation)", _points(data.twin_metrics, "val", "loss"))]
        series.append(("dense twin (train)", _points(data.twin_metrics, "train", "loss")))
    if data.comparison:
        hline = data.comparison["dense"]["final_val_loss"]
        reached, speedup = (
            data.comparison.get("steps_to_dense_loss"),
            data.comparison.get("speedup"),
        )
        if reached is not None and speedup is not None:
            marker = (
                reached,
                f"MoE reaches the dense final loss\nat step {reached:.0f}: {speedup:.2f}x speed-up",
            )
    parts = [
        _img(
            plots.curves(series, ylabel="loss (nats)", title="Loss", marker=marker, hline=hline),
            "loss curves",
        )
    ]
    accuracy = [
        ("validation", _points(data.metrics, "val", "accuracy")),
        ("train", _points(data.metrics, "train", "accuracy")),
    ]
    if any(points for _, points in accuracy):
        parts.append(
            _img(
                plots.curves(accuracy, ylabel="accuracy", title="Accuracy"),
                "accuracy curves",
            )
        )
    return "".join(parts)


def _params(data: ReportData) -> str:
    if not data.params:
        return _note("No parameter table: the run's config has no language-model section.")
    rows = [
        [name, f"{total:,}", f"{active:,}", f"{active / total:.1%}"]
        for name, total, active in data.params
    ]
    return _table(["model", "total parameters", "active per token", "active share"], rows)


def _config(data: ReportData) -> str:
    return f"<pre>{html.escape(json.dumps(data.config, indent=1))}</pre>"


# Section id: (heading, builder); the ids are the page's anchors and what the tests check.
SECTION_BUILDERS = {
    "summary": ("Summary", _summary),
    "tokens": ("Tokens coloured by their top-1 expert", _tokens),
    "load": ("Expert load", _load),
    "specialisation": (
        "Specialisation: which experts serve which domain",
        _specialisation,
    ),
    "curves": ("Training curves", _curves),
    "params": ("Parameters", _params),
    "config": ("Configuration", _config),
}
SECTIONS = tuple(SECTION_BUILDERS)
