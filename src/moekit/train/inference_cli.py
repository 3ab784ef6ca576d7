"""The commands that read a trained language-model run back: `moekit eval` and `moekit
generate`. Each is `NAME_main(argv) -> exit status`, listed in cli.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data.tokenizer import TOKENIZER_HELP
from ..errors import command_error


def eval_main(argv: list[str]) -> int:
    """`moekit eval`: validation loss and perplexity of a run (or both runs of a comparison)."""
    args = _eval_parser().parse_args(argv)
    from .inference import evaluate_run
    from .rundir import check_language_model_run

    try:
        for run in _eval_runs(Path(args.run_dir)):
            check_language_model_run(run, "eval")
            result = evaluate_run(
                run, data=args.data, max_batches=args.max_batches, tokenizer=args.tokenizer
            )
            where = "the run's validation batches" if result.run_batches else args.data
            print(
                f"{run}: validation loss {result.loss:.4f}, perplexity {result.perplexity:.2f} "
                f"({result.num_tokens:,} tokens of {where})"
            )
    except ValueError as error:
        return command_error("eval", error)
    return 0


def _eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit eval",
        description="Print the validation loss and perplexity of a trained run's checkpoint "
        "(both runs of a comparison folder, every run of a --seeds job). Without --data: on "
        "the run's validation batches, the ones training evaluated on (the final loss of "
        "`moekit train` is this number); --data RUN/data/val.bin: the whole validation split.",
    )
    parser.add_argument("run_dir", help="a run folder, or a comparison folder")
    parser.add_argument(
        "--data",
        help="evaluate on this text (.txt, .jsonl, folder), .bin, or a built-in corpus's "
        "validation split (builtin:packages) instead",
    )
    parser.add_argument("--max-batches", type=int, help="evaluate only the first batches")
    parser.add_argument("--tokenizer", metavar="PATH", help=TOKENIZER_HELP + " (not copied)")
    return parser


def _eval_runs(run_dir: Path) -> list[Path]:
    """The runs of a folder: itself, both runs of a comparison, every run of a --seeds job."""
    from .compare import comparison_runs
    from .seeds import SEEDS_FILE, seed_dirs

    folders = [run_dir]
    if (run_dir / SEEDS_FILE).is_file():
        seeds = json.loads((run_dir / SEEDS_FILE).read_text(encoding="utf-8"))["seeds"]
        folders = [f for f in seed_dirs(run_dir, seeds).values() if f.is_dir()]
    runs = []
    for folder in folders:
        comparison = comparison_runs(folder)
        runs += [folder] if comparison is None else list(comparison.values())
    return runs


def generate_main(argv: list[str]) -> int:
    """`moekit generate`: stream a continuation of a prompt from a trained run.

    Every argument (the run, the tokenizer, the sampling settings, the prompt's length) is
    checked before the prompt is echoed, so a mistake prints nothing to stdout.
    """
    args = _generate_parser().parse_args(argv)
    from ..data.tokenizer import run_tokenizer
    from .inference import generate_text
    from .rundir import check_language_model_run

    try:
        # 1. check: the run's kind, then everything generate_text checks as it is called
        check_language_model_run(args.run_dir, "generate")
        tokenizer = run_tokenizer(args.run_dir, args.tokenizer)
        pieces = generate_text(
            args.run_dir,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            show_experts=args.show_experts,
            compile=args.compile,
            tokenizer=tokenizer,
        )
        # 2. stream: the prompt, then each piece as it comes
        print(args.prompt, end="", flush=True)
        shown = []
        for piece in pieces:
            print(piece.text, end="", flush=True)
            shown.append(piece)
        print()
    except ValueError as error:
        return command_error("generate", error)
    if args.show_experts:
        _print_experts(shown, tokenizer)
    return 0


def _generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit generate",
        description="Continue a prompt with a trained run's model, streaming the text.",
    )
    add = parser.add_argument
    add("run_dir", help="a trained run folder (e.g. runs/compare-.../moe)")
    add("--prompt", default="", help='text to continue (default "": a new document)')
    add("--max-new-tokens", type=int, default=200, help="at most this many tokens (default 200)")
    add("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    add("--top-k", type=int, help="sample from the k most likely tokens")
    add("--top-p", type=float, help="nucleus sampling: the smallest set reaching p")
    add("--seed", type=int, default=0, help="sampling seed (default 0)")
    add(
        "--show-experts",
        action="store_true",
        help="after the text, list each token's experts per MoE layer",
    )
    add(
        "--compile",
        action="store_true",
        help="compile the decode step with torch.compile (a one-time cost; faster per token)",
    )
    add("--tokenizer", metavar="PATH", help=TOKENIZER_HELP + " (not copied)")
    return parser


def _print_experts(pieces, tokenizer) -> None:
    print("\ntoken            experts per MoE layer")
    for piece in pieces:
        layers = [
            f"L{i}:{','.join(map(str, ids))}"
            for i, ids in enumerate(piece.expert_ids)
            if ids is not None
        ]
        print(f"{tokenizer.decode([piece.token])!r:16} {' '.join(layers)}")
