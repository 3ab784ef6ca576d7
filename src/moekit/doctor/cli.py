"""`moekit doctor TARGET [--base BASE] [--data TEXT] [--tokens N] [--json]`.

Exit status: 0 (no error found), 1 (an error found: gate a pipeline on it), 2 (the target
could not be read, or a bad option).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import command_error
from .adapters import check_adapter
from .findings import Report
from .routing import (
    SEQUENCE,
    WINDOW,
    calibration_ids,
    check_routing,
    observe,
    spread_tokens,
)
from .runs import check_hf_config, check_run
from .target import Target, read_target
from .text import CALIBRATION_TEXT
from .weights import check_weights, moe_layers


def doctor_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="moekit doctor",
        description="Look a model over for the silent MoE failures (copied or zero experts, "
        "dead or collapsed routing, losses and biases that never acted, adapters that miss "
        "the experts) and say what is wrong, with evidence. Never changes the target.",
    )
    parser.add_argument(
        "target", help="a moekit run, a Hugging Face model folder, or a PEFT adapter folder"
    )
    parser.add_argument(
        "--base", help="an adapter's base model folder (default: its base_model_name_or_path)"
    )
    parser.add_argument(
        "--data",
        help="a text file of calibration text (default: a run's validation split, else "
        "built-in text of many kinds in the model's own tokenizer)",
    )
    parser.add_argument(
        "--tokens", type=int, default=4096, help="calibration tokens at most (default 4096)"
    )
    parser.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="a tokenizer.json, or a folder holding one, that encodes the calibration text "
        "(default: the target's own; without one, random token ids; not copied)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        if args.tokens < 1:
            raise ValueError(f"--tokens ({args.tokens}) must be a positive integer")
        text = _read_text(args.data)
        report = examine(read_target(args.target, args.base, args.tokenizer), text, args.tokens)
    except ValueError as error:
        return command_error("doctor", error)
    print(report.dumps() if args.json else report.text())
    return report.exit_status


def _read_text(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--data {path!r}: {error}") from None


def examine(target: Target, text: str | None = None, num_tokens: int = 4096) -> Report:
    """Every check that applies to the target, in one Report."""
    report = Report(str(target.path), target.kind)
    report.facts["architecture"] = target.architecture
    report.add(target.load_findings)
    if target.adapter is not None:
        report.checks.append("adapter")
        report.add(check_adapter(target.adapter, report.facts))
    model = target.model
    if model is None:
        return report
    layers = moe_layers(model)
    report.facts["moe layers"] = len(layers)
    if layers:
        moe = layers[0][1]
        report.facts["experts"] = f"{moe.config.num_experts}, top-{moe.config.top_k}"
    report.facts["dtype"] = str(target.dtype).removeprefix("torch.")
    report.checks.append("weights")
    report.add(check_weights(model))
    if layers:
        report.checks.append("routing")
        report.add(_routing(model, target, text, num_tokens, report))
    if target.kind == "hf":
        report.add(check_hf_config(target.hf_config, model))
    if target.kind == "run":
        report.checks.append("run")
        report.add(check_run(target.path, model, target.run_config, report.facts))
    return report


def _routing(model, target: Target, text: str | None, num_tokens: int, report: Report):
    if text is not None and target.encode is None:
        raise ValueError(
            f"--data: {str(target.path)!r} has no tokenizer.json to encode it with; pass "
            "--tokenizer PATH"
        )
    row = SEQUENCE
    if text is None and target.own_tokens is not None:
        ids, row = spread_tokens(target.own_tokens, num_tokens), WINDOW
        report.facts["calibration"] = f"{len(ids)} tokens (the run's validation split)"
    else:
        source = "--data" if text is not None else "built-in text"
        ids, what = calibration_ids(
            target.encode, text or CALIBRATION_TEXT, num_tokens, model.config.vocab_size
        )
        report.facts["calibration"] = f"{what} ({source})" if target.encode else what
    with torch.inference_mode():
        seen = observe(model.float(), ids, target.dtype, row)
    return check_routing(seen, moe_layers(model)[0][1].config.top_k)
