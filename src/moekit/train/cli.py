"""The language-model commands: `moekit train` (when --task is lm, its default), `prepare`
and `routers`. Each is `NAME_main(argv) -> exit status`, listed in cli.py; `eval` and
`generate`, which read a trained run back, are in inference_cli.py."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

from ..errors import command_error

TRAIN_DESCRIPTION = """\
Train a model. With no arguments: train the `tiny` MoE preset and its dense twin on the
same tokens, batches and step budget, then print a table (parameters, final validation
loss, steps for the MoE to reach the dense model's final loss, tokens/s) and write
comparison.json and loss.png into the output folder (default runs/compare-<time>).
The two models train in lockstep (eval_every steps each in turn, so both are timed under
the same conditions); each evaluation prints a line with both validation losses, their
gap and each model's tokens/s. --seeds N runs the comparison for seeds 0..N-1 (OUT/seed0/,
...) and prints each figure as mean +- std over the seeds (OUT/summary.json).
--no-compare trains the preset alone (default folder runs/<preset>-<time>).

Settings: --preset NAME plus dotted overrides, e.g.
  --model.num_experts 16 --model.top_k 1 --model.moe.d_hidden 128 --train.lr 3e-4
(model.FIELD: ModelConfig, or an MoEConfig field it lacks; model.moe.FIELD: MoEConfig;
train.FIELD: TrainConfig). Ctrl-C saves a checkpoint; --resume --out DIR continues.

--init-from RUN trains one model that starts from RUN's weights (a trained run, or a
Hugging Face checkpoint made a run by `moekit convert`): RUN's model, tokenizer (and its
special tokens) and train settings, with --data, --steps and train.* overrides.
"""


def train_main(argv: list[str], tasks: tuple[str, ...] = ()) -> int:
    """`moekit train` for the language model: one run, or the MoE-versus-dense comparison.

    cli.py reads --task and calls this for the language model; tasks (the other choices
    of --task) only go into the help.
    """
    from ..parallel import training_mesh
    from ..runtime import keep_freed_memory

    args, extra = _train_parser(tasks).parse_known_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    # Reused memory instead of fresh pages each step: expert gradients are large.
    keep_freed_memory()
    mesh = None
    try:
        fsdp = args.parallel_fsdp == "true"
        with training_mesh(
            args.parallel_ep, args.parallel_timeout, fsdp, args.checkpoint_format
        ) as mesh:
            return _run_train(args, extra, mesh)
    except ValueError as error:
        return command_error("train", error)
    except RuntimeError as error:
        if mesh is None:
            raise
        _stop_rank(mesh, error, args.parallel_timeout)
    except KeyboardInterrupt:
        print(
            "\ninterrupted; continue from the last checkpoint with "
            f"`moekit train --resume --out {args.out}`",
            file=sys.stderr,
        )
        return 130


def _stop_rank(mesh, error: RuntimeError, timeout_s: float) -> None:
    """A dead or hung rank surfaces as a failed collective (after the timeout): say which
    rank stopped, then leave at once, since the broken process group's teardown at
    interpreter exit can abort the process (gloo's background threads), turning exit
    status 1 into a SIGABRT after the message was printed."""
    print(
        f"moekit train: rank {mesh.rank} of {mesh.world_size} stopped: {error}\n"
        "(a rank that dies or hangs makes the others' collectives fail within "
        f"--parallel.timeout {timeout_s:g} s)",
        file=sys.stderr,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _train_parser(tasks: tuple[str, ...]) -> argparse.ArgumentParser:
    from ..models import PRESETS

    description = TRAIN_DESCRIPTION
    if tasks:
        task_help = (
            f"--task picks what to train: lm (this, the default), {', '.join(tasks)}; "
            "`moekit train --task NAME --help` shows that task's options."
        )
        description += "\n" + textwrap.fill(task_help, 88) + "\n"
    parser = argparse.ArgumentParser(
        prog="moekit train",
        usage="moekit train [--task NAME] [options] [--model.FIELD VALUE ...]",
        description=description,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--preset", help=f"model preset: {', '.join(PRESETS)} (default tiny)")
    add("--no-compare", action="store_true", help="train the preset alone, no dense twin")
    add("--out", help="output folder (a run, or a comparison of two runs)")
    add("--resume", action="store_true", help="continue the stopped job in --out")
    add(
        "--seeds",
        type=int,
        help="run the comparison for seeds 0..N-1 (train.seed onwards) in OUT/seed{i}/ and "
        "print mean +- std over them (default 1: one comparison in OUT/moe, OUT/dense)",
    )
    add(
        "--init-from",
        metavar="RUN",
        help="start from this run's weights, model and tokenizer (e.g. a converted checkpoint)",
    )
    add(
        "--data",
        help="training text (.txt, .jsonl, folder), a prepared train.bin, or a built-in "
        "corpus (builtin:default, the default; builtin:packages, the held-out corpus of "
        "installed packages' docstrings and READMEs)",
    )
    add("--steps", type=int, help="optimizer steps (= --train.steps)")
    add("--batch-size", type=int, help="sequences per step (= --train.batch_size)")
    add("--seq-len", type=int, help="tokens per sequence (= --train.seq_len)")
    add("--eval-every", type=int, help="steps between evaluations (= --train.eval_every)")
    add("--no-progress", action="store_true", help="no progress bar")
    add(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's choice, one per core); use 1 when other "
        "processes share the cores, since busy-waiting threads then slow down sharply",
    )
    _parallel_options(parser)
    _replay_options(parser)
    return parser


def _parallel_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--parallel.ep",
        dest="parallel_ep",
        type=int,
        help="expert-parallel size under torchrun (the rest is data parallel; default 1)",
    )
    add(
        "--parallel.fsdp",
        dest="parallel_fsdp",
        choices=["true", "false"],
        default="false",
        help="shard weights, gradients and optimizer state with FSDP2 under torchrun "
        "(composes with --parallel.ep; default false)",
    )
    add(
        "--checkpoint.format",
        dest="checkpoint_format",
        choices=["sharded", "consolidated"],
        help="under torchrun: sharded (every rank writes its own shards with "
        "torch.distributed.checkpoint) or consolidated (rank 0 writes every tensor whole); "
        "default sharded with --parallel.fsdp true, else consolidated. Both resume at any "
        "layout and load in one process",
    )
    add(
        "--parallel.timeout",
        dest="parallel_timeout",
        type=float,
        default=300.0,
        help="seconds a rank waits in a collective before it stops with an error (default 300)",
    )


def _replay_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--routing.replay",
        dest="routing_replay",
        metavar="TRACE",
        help="train on a routing trace's sequences, each token sent to the trace's experts "
        "(moekit routing record; docs/traces.md); one run, eager",
    )
    add(
        "--routing.replay_mode",
        dest="routing_replay_mode",
        choices=["ids", "ids+weights"],
        default="ids",
        help="ids: weights recomputed by the router (its gradient flows); ids+weights: both "
        "from the trace (default ids)",
    )


def _run_train(args: argparse.Namespace, extra: list[str], mesh) -> int:
    """The job the arguments ask for: resume, start from a run, replay, one run or the
    comparison (over one seed or several)."""
    from .overrides import parse_overrides

    overrides = parse_overrides(extra)
    for flag in ("steps", "batch_size", "seq_len", "eval_every"):
        if getattr(args, flag) is not None:
            overrides[f"train.{flag}"] = str(getattr(args, flag))
    if args.resume:
        return _resume(args, overrides, mesh)
    seeds = 1 if args.seeds is None else args.seeds
    if seeds < 1:
        raise ValueError(f"--seeds ({seeds}) must be >= 1")
    if seeds > 1 and (args.no_compare or args.init_from):
        raise ValueError("--seeds runs the comparison; drop --no-compare and --init-from")
    if args.init_from:
        return _train_from(args, overrides, mesh)
    args.preset = args.preset or "tiny"
    if args.routing_replay:
        return _train_replayed(args, overrides, mesh)
    return _train_preset(args, overrides, seeds, mesh)


def _resume(args: argparse.Namespace, overrides: dict, mesh) -> int:
    from .. import train

    if args.out is None:
        raise ValueError("--resume needs --out DIR, the folder of the job to continue")
    if overrides or args.data or args.seeds is not None:
        raise ValueError("--resume uses the settings saved in --out; drop the other settings")
    if args.init_from:
        raise ValueError("--resume continues --out; drop --init-from")
    if _replay_source(args.out) is not None:
        return _train_replayed(args, overrides, mesh, resume=True)
    result = train.resume_job(args.out, show_progress=not args.no_progress, mesh=mesh)
    if isinstance(result, train.SeedsSummary):
        _print_summary(result, args.out)
    elif isinstance(result, train.Comparison):
        print(train.format_table(result))
    else:
        _print_result(result, args.out)
    return 0


def _train_from(args: argparse.Namespace, overrides: dict, mesh) -> int:
    from .. import train

    if args.preset:
        raise ValueError("--init-from trains the model of that run; drop --preset")
    out = args.out = args.out or str(train.default_out_dir(Path(args.init_from).name))
    result = train.train_from(
        args.init_from,
        out,
        overrides=overrides,
        data=args.data,
        show_progress=not args.no_progress,
        mesh=mesh,
    )
    _print_result(result, out)
    return 0


def _train_preset(args: argparse.Namespace, overrides: dict, seeds: int, mesh) -> int:
    """The preset alone (--no-compare), or the MoE-versus-dense comparison."""
    from .. import train
    from .overrides import build_configs

    progress = not args.no_progress
    model_config, train_config = build_configs(args.preset, overrides)
    if args.no_compare:
        out = args.out = args.out or str(train.default_out_dir(args.preset))
        result = train.train_one(
            model_config, train_config, out, data=args.data, show_progress=progress, mesh=mesh
        )
        _print_result(result, out)
        return 0
    if model_config.moe is None:
        raise ValueError(
            f"preset {args.preset!r} is dense; compare needs an MoE preset (or add --no-compare)"
        )
    out = args.out = args.out or str(train.default_out_dir("compare"))
    if seeds > 1:
        summary = train.compare_seeds(
            model_config, train_config, out, seeds, data=args.data, show_progress=progress,
            mesh=mesh,
        )  # fmt: skip
        _print_summary(summary, out)
        return 0
    comparison = train.compare(
        model_config, train_config, out, data=args.data, show_progress=progress, mesh=mesh
    )
    print(train.format_table(comparison))
    print(f"wrote {out}/comparison.json and {out}/loss.png")
    return 0


def _replay_source(out: str) -> dict | None:
    """The saved {"routing_replay": TRACE, "mode": ...} of a replayed run in out, or None."""
    config = Path(out) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text(encoding="utf-8")).get("data")
    return data if isinstance(data, dict) and "routing_replay" in data else None


def _train_replayed(args: argparse.Namespace, overrides: dict, mesh, resume: bool = False) -> int:
    """One run on a routing trace's sequences with its experts replayed (eager: the hooks
    change every step); resume continues such a run with its saved settings."""
    from ..traces import load_trace
    from ..traces.training import Replay, ReplayData
    from .builder import build_job
    from .jobs import train_reporting
    from .overrides import build_configs
    from .rundir import run_configs

    if resume:
        model_config, train_config, source = run_configs(args.out)
        out = args.out
    else:
        if args.data or args.seeds is not None or args.init_from:
            raise ValueError(
                "--routing.replay trains on the trace's tokens; drop --data, --seeds, --init-from"
            )
        if overrides.get("train.compile", "false") not in ("false", "auto"):
            raise ValueError("--routing.replay runs eager; drop --train.compile")
        overrides["train.compile"] = "false"
        model_config, train_config = build_configs(args.preset, overrides)
        source = {"routing_replay": str(args.routing_replay), "mode": args.routing_replay_mode}
        default = Path("runs") / f"replay-{Path(args.routing_replay).name}"
        out = args.out = args.out or str(default)
    trace = load_trace(source["routing_replay"])
    replay = Replay(trace, source["mode"])
    job = build_job(
        model_config, train_config, out, prepared=ReplayData(trace), data_source=source,
        mesh=mesh, resume=resume, show_progress=not args.no_progress, replay=replay,
    )  # fmt: skip
    _print_result(train_reporting(job.trainer), out)
    return 0


def _print_summary(summary, out) -> None:
    from .seeds import format_summary

    print(format_summary(summary))
    print(f"wrote {out}/summary.json (and a comparison folder per seed)")


def _print_result(result, out) -> None:
    print(
        f"{result.steps} steps, final validation loss {result.final_val_loss:.4f}, "
        f"{result.tokens_per_s:,.0f} tokens/s; run directory {out}"
    )


def prepare_main(argv: list[str]) -> int:
    """`moekit prepare`: tokenise text into train.bin / val.bin and a tokenizer."""
    parser = argparse.ArgumentParser(
        prog="moekit prepare",
        description="Train a tokenizer and write token streams (OUT/train.bin, OUT/val.bin, "
        "OUT/tokenizer.json) for `moekit train --data OUT/train.bin`.",
    )
    parser.add_argument(
        "data",
        nargs="?",
        help="text: .txt, .jsonl or a folder (default: the built-in corpus)",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=4096,
        help="tokenizer vocabulary (default 4096)",
    )
    args = parser.parse_args(argv)
    from .data import write_prepared

    try:
        path = write_prepared(args.data, args.out, vocab_size=args.vocab_size)
    except ValueError as error:
        return command_error("prepare", error)
    print(f"wrote {path} (and val.bin, tokenizer.json beside it)")
    return 0


def routers_main(argv: list[str]) -> int:
    """`moekit routers`: one line per router."""
    parser = argparse.ArgumentParser(prog="moekit routers", description="List the routers.")
    parser.parse_args(argv)
    from ..routing import ROUTER_CLASSES

    for name, cls in ROUTER_CLASSES.items():
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:14s} {summary}")
    return 0
