"""`moekit <command>`: a table of commands, each `main(argv) -> exit status` in its package.

A command is imported only when it runs, so `moekit --help` and a quick command stay fast.
Each command's parsing and logic live with its package (docs/architecture.md, "Layers").
"""

from __future__ import annotations

import importlib
import os
import sys

# name: ("module:function", one line of help). `train` goes through tasks/cli.py because
# --task picks between the language model (train/cli.py) and the other tasks.
COMMANDS = {
    "train": (
        "moekit.tasks.cli:train_main",
        "train the tiny MoE and its dense twin and compare them (or one model, or a --task)",
    ),
    "prepare": (
        "moekit.train.cli:prepare_main",
        "tokenise text into .bin token streams for training",
    ),
    "eval": ("moekit.train.cli:eval_main", "validation loss and perplexity of a trained run"),
    "generate": ("moekit.train.cli:generate_main", "generate text with a trained run, streaming"),
    "bench": (
        "moekit.benchmark:main",
        "time the MoE layer against a dense FFN of equal active FLOPs",
    ),
    "routers": ("moekit.train.cli:routers_main", "list the available routers"),
    "inspect": (
        "moekit.interop.cli:inspect_main",
        "total and active parameters of a preset or config.json, by part",
    ),
    "convert": (
        "moekit.interop.cli:convert_main",
        "convert between Hugging Face checkpoints and moekit runs",
    ),
    "finetune": (
        "moekit.finetune.cli:finetune_main",
        "fine-tune a run or Hugging Face model on conversations (full or LoRA; --demo)",
    ),
    "upcycle": (
        "moekit.surgery.cli:upcycle_main",
        "turn a trained dense run into an MoE whose experts copy its FFN",
    ),
    "add-experts": (
        "moekit.surgery.cli:add_experts_main",
        "add experts to a trained MoE run without changing its output",
    ),
    "merge": (
        "moekit.surgery.cli:merge_main",
        "Branch-Train-MiX: merge domain-trained dense models into one MoE",
    ),
    "report": (
        "moekit.report.cli:report_main",
        "write a self-contained HTML report of what the router does in a run",
    ),
    "route": (
        "moekit.report.cli:route_main",
        "colour a text token by token by the expert each layer picks",
    ),
    "routing": (
        "moekit.traces_cli:routing_main",
        "record, diff and convert routing traces: which experts each token took",
    ),
    "doctor": (
        "moekit.doctor.cli:doctor_main",
        "find the silent MoE failures of a checkpoint, run or adapter, with evidence",
    ),
}


def _command(name: str):
    """The function of a command, imported from its "module:function" string."""
    module, _, function = COMMANDS[name][0].partition(":")
    return getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: moekit <command> [options]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:12s} {help_text}")
        print("\n`moekit <command> --help` shows a command's options.")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"moekit {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(
            f"moekit: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    try:
        return _command(argv[0])(argv[1:])
    except BrokenPipeError:
        # The reader went away (e.g. `moekit generate ... | head`): stop quietly, and point
        # stdout at devnull so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
