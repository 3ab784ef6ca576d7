"""`moekit inspect` and `moekit convert`: argparse, one library call, printing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import command_error

INSPECT_DESCRIPTION = """\
Total and active-per-token parameters by part (embeddings, attention, router, routed
experts, shared experts, dense FFN layers, norms, other), counted from the config on the
meta device (nothing is allocated), and the KV cache's bytes per token (bf16). TARGET is
  a published MoE: {famous}
  a moekit preset: {presets}
  a moekit run directory or its config.json, or a Hugging Face config.json
  ({architectures}).
"""


def inspect_main(argv: list[str]) -> int:
    from ..models import PRESETS
    from .architectures import ARCHITECTURES
    from .famous import FAMOUS

    parser = argparse.ArgumentParser(
        prog="moekit inspect",
        description=INSPECT_DESCRIPTION.format(
            famous=", ".join(FAMOUS),
            presets=", ".join(PRESETS),
            architectures=", ".join(ARCHITECTURES),
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", help="a preset name, a run directory or a config.json")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    args = parser.parse_args(argv)
    from .inspect import inspect_target

    try:
        report = inspect_target(args.target)
    except ValueError as error:
        return command_error("inspect", error)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def _human(count: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f}"


def format_report(report: dict) -> str:
    """The table `moekit inspect` prints."""
    lines = [
        f"{report['name']}  ({report['kind']})",
        f"{'part':16s} {'total':>19s} {'active/token':>19s}",
    ]
    for part, counts in report["parts"].items():
        if part == "mtp" and not counts["total"]:
            continue  # a model without multi-token prediction
        lines.append(f"{part:16s} {counts['total']:>19,} {counts['active']:>19,}")
    total, active = report["total"], report["active"]
    lines.append(f"{'sum':16s} {total:>19,} {active:>19,}   ({_human(total)} / {_human(active)})")
    if report["input_embedding"]:
        without = report["active_without_input_embedding"]
        lines.append(f"active without the input-embedding lookup: {without:,} ({_human(without)})")
    kv = report.get("kv_cache_bytes_per_token")
    if kv:
        lines.append(
            f"KV cache per token (bf16): {kv['per_layer']:,} bytes per layer, "
            f"{kv['total']:,} bytes in all {kv['layers']} layers"
        )
    published = report.get("published")
    if published:
        shown = [
            f"{name} {_human(published[name])} ({published[name + '_error']:+.2%})"
            for name in ("total", "active")
            if published.get(name) is not None
        ]
        lines.append(f"published: {', '.join(shown) or 'no figures'}; {published['source']}")
        if published["active_without_input_embedding"]:
            lines.append("  (the published active figure leaves out the input-embedding lookup)")
    for name, count in report["excluded"].items():
        lines.append(f"not included: {name} {count:,} ({_human(count)})")
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)


def convert_main(argv: list[str]) -> int:
    from .architectures import ARCHITECTURES

    parser = argparse.ArgumentParser(
        prog="moekit convert",
        description="Convert a Hugging Face folder (config.json + safetensors) into a moekit run "
        "directory that `moekit eval` / `moekit generate` read, or a trained run directory into "
        "a Hugging Face folder that transformers' from_pretrained reads. The direction follows "
        "SRC's config.json. A source without tokenizer.json still converts (with a note); "
        "the run's text commands then need --tokenizer PATH.",
    )
    parser.add_argument("src", help="a Hugging Face model folder or a moekit run directory")
    parser.add_argument("dst", help="the folder to create (must not exist, or be empty)")
    parser.add_argument(
        "--architecture",
        choices=tuple(ARCHITECTURES),
        help="run -> Hugging Face: the architecture to write (default: chosen from the config)",
    )
    parser.add_argument(
        "--mtp",
        action="store_true",
        help="Hugging Face -> run: keep DeepSeek-V3's multi-token-prediction layers (to train "
        "with them; skipped by default, as transformers skips them)",
    )
    args = parser.parse_args(argv)
    from .convert import convert

    try:
        direction = convert(args.src, args.dst, architecture=args.architecture, mtp=args.mtp)
    except ValueError as error:
        return command_error("convert", error)
    if direction == "hf-to-run":
        print(f"wrote moekit run directory {Path(args.dst)}")
    else:
        written = json.loads((Path(args.dst) / "config.json").read_text(encoding="utf-8"))
        chosen = "" if args.architecture else ", the closest to the model's config"
        print(
            f"wrote Hugging Face folder {Path(args.dst)} "
            f"(architecture {written['model_type']}{chosen})"
        )
    if direction == "hf-to-run" and not (Path(args.src) / "tokenizer.json").is_file():
        print(
            f"note: {args.src} has no tokenizer.json: eval/generate on {args.dst} need "
            "--tokenizer PATH"
        )
    return 0
