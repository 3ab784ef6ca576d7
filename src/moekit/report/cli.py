"""`moekit report` and `moekit route`: thin entry points into moekit.report."""

from __future__ import annotations

import argparse
import os
import sys

from ..data.tokenizer import TOKENIZER_HELP
from ..errors import command_error


def _one_thread() -> None:
    # Small forward passes: one thread is as fast, and busy-waiting threads slow down
    # sharply when other processes share the cores.
    import torch

    torch.set_num_threads(1)


def report_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="moekit report",
        description="Write a self-contained HTML report (no network needed to view it) of "
        "what the router does in a run: tokens coloured by expert, expert load and its "
        "evolution, the domain x expert matrix with mutual information, loss curves of "
        "the MoE and its dense twin, parameters and configuration.",
    )
    parser.add_argument(
        "run_dir",
        help="a comparison folder (moekit train), a run folder, or a task run",
    )
    parser.add_argument("--out", help="the HTML file (default RUN_DIR/report.html)")
    parser.add_argument(
        "--tokens-per-domain",
        type=int,
        default=4096,
        help="validation tokens per domain for the specialisation matrix (default 4096)",
    )
    parser.add_argument(
        "--sample-tokens",
        type=int,
        default=64,
        help="tokens of each domain's coloured sample (default 64)",
    )
    parser.add_argument("--tokenizer", metavar="PATH", help=TOKENIZER_HELP + " (not copied)")
    args = parser.parse_args(argv)
    for flag in ("tokens_per_domain", "sample_tokens"):
        if getattr(args, flag) < 1:
            return command_error(
                "report",
                ValueError(f"--{flag.replace('_', '-')} ({getattr(args, flag)}) must be >= 1"),
            )
    _one_thread()
    from .html import write_report
    from .trace_diff import saved_diff_sections

    try:
        path = write_report(
            args.run_dir,
            args.out,
            extra_sections=saved_diff_sections(args.run_dir),
            tokens_per_domain=args.tokens_per_domain,
            sample_tokens=args.sample_tokens,
            tokenizer=args.tokenizer,
        )
    except ValueError as error:
        return command_error("report", error)
    print(f"wrote {path}")
    return 0


def route_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="moekit route",
        description="Print a text coloured token by token by the expert each MoE layer picks "
        "(its top-1), one line per layer. Without a terminal, or with NO_COLOR set, each "
        "token is followed by its expert id in brackets.",
    )
    parser.add_argument("run_dir", help="a trained run folder (for a comparison folder, its moe/)")
    parser.add_argument("--text", required=True, help="the text to route")
    parser.add_argument(
        "--layer",
        type=int,
        action="append",
        help="show only this layer (repeat for several; default every MoE layer)",
    )
    parser.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="auto: colours on a terminal unless NO_COLOR is set (default)",
    )
    parser.add_argument("--tokenizer", metavar="PATH", help=TOKENIZER_HELP + " (not copied)")
    args = parser.parse_args(argv)
    _one_thread()
    from pathlib import Path

    from ..train.compare import comparison_runs

    comparison = comparison_runs(args.run_dir)
    run_dir = Path(args.run_dir) if comparison is None else comparison["moe"]
    try:
        text = _route(run_dir, args.text, args.layer, _use_colour(args.color), args.tokenizer)
    except ValueError as error:
        return command_error("route", error)
    print(text)
    return 0


def _use_colour(choice: str) -> bool:
    if choice != "auto":
        return choice == "always"
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _route(run_dir, text: str, layers: list[int] | None, colour: bool, tokenizer_path) -> str:
    from ..data.tokenizer import run_tokenizer
    from ..train.rundir import check_language_model_run, load_trained_model
    from .routing import moe_layers, route_tokens
    from .terminal import format_routing

    check_language_model_run(run_dir, "route")
    tokenizer = run_tokenizer(run_dir, tokenizer_path)
    model = load_trained_model(run_dir)
    available = moe_layers(model)
    if not available:
        raise ValueError(
            f"{str(run_dir)!r} has no layers with per-token experts (a dense or Soft MoE model)"
        )
    for layer in layers or []:
        if layer not in available:
            raise ValueError(f"--layer {layer} is not an MoE layer; choose from {available}")
    # As the model reads text: with the bos token first when its tokenizer adds one.
    ids = tokenizer.encode_prompt(text) if text else []
    routing = route_tokens(model, tokenizer, ids)
    return format_routing(routing, model.config.moe.num_experts, colour=colour, layers=layers)
