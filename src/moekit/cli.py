"""`moekit <command>`: a table of commands, each `main(argv) -> exit status` in its package.

A command is imported only when it runs, so `moekit --help` and a quick command stay fast.
Each command's parsing and logic live with its package (docs/architecture.md, "Layers").
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name: ("module:function", one line of help). A two-word name is a sub-command
# (`moekit bench comm`). `train` is dispatched here (train_main below): its --task picks
# the language model (train/cli.py) or one of the tasks the tasks package declares.
COMMANDS = {
    "train": (
        "moekit.cli:train_main",
        "train the tiny MoE and its dense twin and compare them (or one model, or a --task)",
    ),
    "prepare": (
        "moekit.train.cli:prepare_main",
        "tokenise text into .bin token streams for training",
    ),
    "eval": (
        "moekit.train.inference_cli:eval_main",
        "validation loss and perplexity of a trained run",
    ),
    "generate": (
        "moekit.train.inference_cli:generate_main",
        "generate text with a trained run, streaming",
    ),
    "bench": (
        "moekit.benchmark:main",
        "time the MoE layer against a dense FFN of equal active FLOPs",
    ),
    "bench comm": (
        "moekit.parallel.comm:main",
        "bytes and time of expert-parallel communication per step, for each EP size",
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


def _split(argv: list[str]) -> tuple[str, list[str]]:
    """The command argv names (a sub-command when its first two words are one) and the
    arguments that follow it. `bench --comm` is the old spelling of `bench comm`."""
    if len(argv) > 1 and f"{argv[0]} {argv[1]}" in COMMANDS:
        return f"{argv[0]} {argv[1]}", argv[2:]
    if argv[0] == "bench" and "--comm" in argv:
        print("moekit bench --comm is deprecated; use `moekit bench comm`", file=sys.stderr)
        return "bench comm", [arg for arg in argv[1:] if arg != "--comm"]
    return argv[0], argv[1:]


def train_main(argv: list[str]) -> int:
    """`moekit train [--task NAME] ...`: the language model (train/cli.py) or a task
    (tasks/cli.py). --task is read here, once; every other argument, --help included, goes
    to the chosen trainer's own parser."""
    from .tasks.cli import TASKS
    from .tasks.cli import main as task_main
    from .train.cli import train_main as lm_train_main

    picker = argparse.ArgumentParser(prog="moekit train", add_help=False, allow_abbrev=False)
    picker.add_argument("--task", choices=("lm", *TASKS), default="lm")
    picked, rest = picker.parse_known_args(argv)
    if picked.task == "lm":
        return lm_train_main(rest, tasks=TASKS)
    return task_main(picked.task, rest)


def _print_commands() -> None:
    print("usage: moekit <command> [options]\n\ncommands:")
    for name, (_, help_text) in COMMANDS.items():
        print(f"  {name:12s} {help_text}")
    print("\n`moekit <command> --help` shows a command's options.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        _print_commands()
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"moekit {__version__}")
        return 0
    name, args = _split(argv)
    if name not in COMMANDS:
        commands = ", ".join(command for command in COMMANDS if " " not in command)
        print(f"moekit: unknown command {argv[0]!r}; choose one of {commands}", file=sys.stderr)
        return 2
    try:
        return _command(name)(args)
    except BrokenPipeError:
        # The reader went away (e.g. `moekit generate ... | head`): stop quietly, and point
        # stdout at devnull so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
