"""`moekit finetune`: supervised fine-tuning (full or LoRA), and the Flan-MoE demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..data.tokenizer import TOKENIZER_HELP
from ..errors import command_error

DESCRIPTION = """\
Fine-tune a model on conversations: loss on the assistant tokens only, the MoE's aux and z
losses kept, the run resumable, then exported for transformers (OUT/hf with the chat
template in tokenizer_config.json) and, with adapters, for PEFT (OUT/adapter, OUT/merged).

BASE is a moekit run (e.g. runs/compare-.../moe) or a Hugging Face folder moekit loads,
with its tokenizer.json (or --tokenizer PATH: a run converted from a folder without one).
The exports are checked before the first step: one the base cannot express stops the run
there, saying why (--no-export fine-tunes without them). --data is jsonl, one example a line:
  {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}
  {"prompt": ..., "response": ...}

Settings are dotted overrides as in `moekit train`:
  --train.FIELD   steps, batch_size, seq_len (longest example), lr, ... (defaults: 100
                  steps of 16 examples, lr 3e-4, or 1e-3 with adapters)
  --model.FIELD   settings of the base that keep its weights' shapes, e.g.
                  --model.balance_loss_coef 0.001
  --lora.FIELD    rank (0 = full fine-tuning, the default), alpha, dropout, targets
                  (attention, experts, shared, router; default attention,experts)
  --finetune.FIELD  train_router, aux_losses, eval_fraction, template (a Jinja file)

--demo runs the Flan-MoE experiment instead (docs/finetune.md): pretrain the tiny MoE and
its dense twin, instruction-tune both on the embedded instruction set, and compare them on
held-out task families; --demo.FIELD sets its budget (pretrain_steps, pretrain_batch,
finetune_steps, finetune_batch, finetune_lr, eval_per_family, exact_match_per_family).
"""


def finetune_main(argv: list[str]) -> int:
    """`moekit finetune BASE --data FILE --out DIR`, `--resume --out DIR` or `--demo`."""
    argv, settings = _split_settings(argv)
    args, extra = _parser().parse_known_args(argv)
    extra += settings
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.demo:
            from .demo import run_demo

            budget = _demo_budget(extra)
            run_demo(args.out, seeds=args.seeds, show_progress=not args.no_progress, budget=budget)
            return 0
        return _finetune(args, extra)
    except ValueError as error:
        return command_error("finetune", error)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; continue with `moekit finetune --resume --out {args.out}`",
            file=sys.stderr,
        )
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit finetune",
        description=DESCRIPTION,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("base", nargs="?", help="a moekit run or a Hugging Face folder")
    parser.add_argument("--data", help="jsonl of messages or prompt/response lines")
    parser.add_argument("--out", help="the new run folder (or the one to --resume)")
    parser.add_argument("--steps", type=int, help="optimizer steps (= --train.steps)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--demo", action="store_true", help="run the Flan-MoE experiment")
    parser.add_argument("--seeds", type=int, default=3, help="demo: seeds (default 3)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument(
        "--tokenizer",
        metavar="PATH",
        help=TOKENIZER_HELP + " (copied into OUT, as the base's own is)",
    )
    parser.add_argument(
        "--no-export",
        action="store_true",
        help="write no Hugging Face export (OUT/hf, adapter, merged), and do not check it",
    )
    parser.add_argument(
        "--routing.replay",
        dest="routing_replay",
        metavar="TRACE",
        help="fine-tune on a routing trace's sequences (instead of --data), each token sent "
        "to the trace's experts (docs/traces.md)",
    )
    parser.add_argument(
        "--routing.replay_mode",
        dest="routing_replay_mode",
        choices=["ids", "ids+weights"],
        default="ids",
        help="ids: weights recomputed by the router; ids+weights: both from the trace",
    )
    return parser


# Dotted settings (--routing.replay is an option of its own).
SETTING_PREFIXES = ("--model.", "--train.", "--lora.", "--finetune.", "--demo.")


def _split_settings(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the other arguments, the dotted settings with their values), split before argparse
    sees them: it would give a setting's value to BASE (`--demo --demo.pretrain_steps 2`)."""
    rest, settings, i = [], [], 0
    while i < len(argv):
        take = 1 if "=" in argv[i] or not argv[i].startswith(SETTING_PREFIXES) else 2
        (settings if argv[i].startswith(SETTING_PREFIXES) else rest).extend(argv[i : i + take])
        i += take
    return rest, settings


def _demo_budget(extra: list[str]):
    """The demo's DemoBudget with --demo.FIELD overrides (e.g. --demo.pretrain_steps 600)."""
    from ..train.overrides import parse_overrides, parse_setting
    from .demo import DemoBudget

    changes = {}
    for key, raw in parse_overrides(extra).items():
        section, _, name = key.partition(".")
        if section != "demo":
            raise ValueError(f"--demo takes --demo.FIELD settings (DemoBudget), not --{key}")
        changes[name] = parse_setting(DemoBudget, name, raw, key)
    return DemoBudget(**changes)


def _finetune(args: argparse.Namespace, extra: list[str]) -> int:
    from ..train.overrides import parse_overrides
    from .job import finetune
    from .replay import replay_source

    overrides = parse_overrides(extra)
    if args.steps is not None:
        overrides["train.steps"] = str(args.steps)
    if args.out is None:
        raise ValueError("--out DIR is required (the new run folder)")
    if args.routing_replay or (args.resume and replay_source(args.out) is not None):
        return _finetune_replayed(args, overrides)
    if args.resume:
        if overrides or args.base or args.data or args.tokenizer:
            raise ValueError("--resume uses the settings saved in --out; drop the other settings")
    elif args.base is None or args.data is None:
        raise ValueError("give BASE and --data FILE.jsonl (or --resume, or --demo)")
    result = finetune(
        args.base,
        args.data,
        args.out,
        overrides,
        resume=args.resume,
        show_progress=not args.no_progress,
        tokenizer=args.tokenizer,
        export=not args.no_export,
    )
    _print_finetune(result, args.out)
    return 0


def _finetune_replayed(args: argparse.Namespace, overrides: dict) -> int:
    if args.resume and (
        overrides or args.base or args.data or args.routing_replay or args.tokenizer
    ):
        raise ValueError("--resume uses the settings saved in --out; drop the other settings")
    if not args.resume and (args.base is None or args.data is not None):
        raise ValueError("--routing.replay needs BASE and takes the trace's tokens: drop --data")
    from .replay import finetune_replayed

    result = finetune_replayed(
        args.base,
        args.routing_replay,
        args.out,
        overrides,
        args.routing_replay_mode,
        resume=args.resume,
        show_progress=not args.no_progress,
        tokenizer=args.tokenizer,
        export=not args.no_export,
    )
    _print_finetune(result, args.out)
    return 0


def _print_finetune(result, out) -> None:
    train = result.train
    print(
        f"{train.steps} steps on {result.num_train} examples ({result.num_truncated} cut to "
        f"train.seq_len), validation loss on the answers {train.final_val_loss:.4f} "
        f"({result.num_validation} examples); run directory {out}"
    )
    for name in result.exported:
        config = Path(out) / name / "config.json"
        if config.is_file():  # a Hugging Face folder: name its architecture
            model_type = json.loads(config.read_text(encoding="utf-8"))["model_type"]
            print(f"wrote {out}/{name} (architecture {model_type})")
        else:
            print(f"wrote {out}/{name}")
    for note in result.notes:
        print(note)
