"""Everything a report shows, read from a run directory (and the model it trained).

Three kinds of directory:
    comparison   RUN/moe/, RUN/dense/, RUN/comparison.json  (`moekit train`)
    language     RUN/config.json with "model", checkpoint/, metrics.jsonl, routing.jsonl
    task         RUN/config.json with "task", metrics.jsonl, optionally specialisation.json
                 = {"labels": [names], "layers": [{"name", "counts": [[E counts] per label]}]}
Whatever a directory lacks stays empty here, and the report says why its section is missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..train.compare import comparison_runs
from ..train.metrics import ROUTING_FILE, read_metrics
from .routing import (
    TokenRouting,
    domain_expert_counts,
    domain_tokens,
    first_document,
    moe_layers,
    route_tokens,
)

SPECIALISATION_FILE = "specialisation.json"


@dataclass
class ReportData:
    """What the report renders. Empty fields mean "not available for this run".

    kind: "comparison", "language" or "task".
    config: the run's config.json (the MoE run's, for a comparison).
    metrics, twin_metrics: metrics.jsonl records of the run and of its dense twin.
    comparison: comparison.json, or None.
    routing: routing.jsonl records (per-layer statistics over training).
    params: (model, total, active) parameter counts.
    labels: domain or class names of the rows of label_counts.
    label_counts: (layer name, (labels, E) assignment counts) per MoE layer.
    samples: (domain, its routed sample text).
    no_checkpoint: why the model could not be loaded (a run still before its first
        checkpoint): the sections that route text are then left out.
    """

    run_dir: Path
    kind: str
    config: dict
    metrics: list[dict] = field(default_factory=list)
    twin_metrics: list[dict] = field(default_factory=list)
    comparison: dict | None = None
    routing: list[dict] = field(default_factory=list)
    params: list[tuple[str, int, int]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    label_counts: list[tuple[str, np.ndarray]] = field(default_factory=list)
    samples: list[tuple[str, TokenRouting]] = field(default_factory=list)
    no_checkpoint: str | None = None

    @property
    def num_experts(self) -> int | None:
        moe = self.config.get("model", {}).get("moe")
        if moe:
            return moe["num_experts"]
        return self.label_counts[0][1].shape[1] if self.label_counts else None


def gather(
    run_dir: str | Path,
    *,
    tokens_per_domain: int = 4096,
    sample_tokens: int = 64,
    tokenizer: str | Path | None = None,
) -> ReportData:
    """Read a comparison, language-model or task run directory into ReportData.

    Args:
        run_dir: the directory.
        tokens_per_domain: validation tokens per domain routed for the domain x expert table.
        sample_tokens: at most this many tokens of each domain's sample text.
        tokenizer: a tokenizer.json or a folder holding one, instead of the run's own
            (data.tokenizer.run_tokenizer); the validation split is then tokenised with it
            in memory, nothing written into the run.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{str(run_dir)!r} is not a directory")
    runs = comparison_runs(run_dir)
    if runs is not None and runs["dense"].is_dir():
        data = _language(runs["moe"], tokens_per_domain, sample_tokens, tokenizer)
        data.run_dir, data.kind = run_dir, "comparison"
        data.twin_metrics = _metrics(runs["dense"])
        data.params.append(("dense twin", *_param_counts(runs["dense"])))
        path = run_dir / "comparison.json"
        data.comparison = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
        return data
    config = _config(run_dir)
    if "task" in config:
        return _task(run_dir, config)
    return _language(run_dir, tokens_per_domain, sample_tokens, tokenizer)


def _config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{str(run_dir)!r} is not a moekit run or comparison directory (config.json: {error})"
        ) from None


def _metrics(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []


def _param_counts(run_dir: Path) -> tuple[int, int]:
    from ..models import count_parameters
    from ..train import run_configs

    return tuple(count_parameters(run_configs(run_dir)[0]))


def _language(
    run_dir: Path, tokens_per_domain: int, sample_tokens: int, tokenizer: str | Path | None
) -> ReportData:
    from ..data.tokenizer import run_tokenizer
    from ..train import CheckpointError
    from ..train.data import evaluation_data
    from ..train.rundir import load_trained_model, read_run_config

    config = read_run_config(run_dir)
    text_tokenizer = run_tokenizer(run_dir, tokenizer, may_build=True)
    data = ReportData(run_dir=run_dir, kind="language", config=config, metrics=_metrics(run_dir))
    routing_path = run_dir / ROUTING_FILE
    data.routing = read_metrics(routing_path) if routing_path.exists() else []
    data.params.append(("MoE" if config["model"].get("moe") else "dense", *_param_counts(run_dir)))
    try:
        model = load_trained_model(run_dir)
    except CheckpointError as error:
        data.no_checkpoint = str(error)
        return data
    layers = moe_layers(model)
    if not layers:
        return data
    run_data = evaluation_data(
        run_dir, data=config["data"], vocab_size=model.config.vocab_size, tokenizer=text_tokenizer
    )
    validation, tokenizer = run_data.validation, run_data.tokenizer
    per_domain = domain_tokens(validation)
    seq_len = min(config["train"]["seq_len"], model.config.max_seq_len)
    counts = domain_expert_counts(
        model, per_domain, seq_len=seq_len, tokens_per_domain=tokens_per_domain
    )
    data.labels = list(per_domain)
    data.label_counts = [(f"layer {layer}", counts[layer]) for layer in layers]
    max_tokens = min(sample_tokens, model.config.max_seq_len)
    for domain, tokens in per_domain.items():
        ids = first_document(tokens, tokenizer.eot_id, max_tokens)
        if ids:
            data.samples.append((domain, route_tokens(model, tokenizer, ids)))
    return data


def _task(run_dir: Path, config: dict) -> ReportData:
    data = ReportData(run_dir=run_dir, kind="task", config=config, metrics=_metrics(run_dir))
    path = run_dir / SPECIALISATION_FILE
    if path.exists():
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
            data.labels = [str(label) for label in table["labels"]]
            data.label_counts = [
                (str(layer["name"]), np.asarray(layer["counts"], dtype=np.int64))
                for layer in table["layers"]
            ]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{str(path)!r} is not a specialisation table: {error!r}") from None
        for name, counts in data.label_counts:
            if counts.ndim != 2 or counts.shape[0] != len(data.labels):
                raise ValueError(
                    f"{str(path)!r}: layer {name!r} has a counts table of shape {counts.shape}; "
                    f"expected one row per label ({len(data.labels)})"
                )
    return data
