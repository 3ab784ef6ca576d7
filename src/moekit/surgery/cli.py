"""`moekit upcycle`, `moekit add-experts`, `moekit merge`: argparse, one library call, print."""

from __future__ import annotations

import argparse
import time

from ..config import ROUTERS
from ..errors import command_error
from ..train.config import TrainConfig
from ..train.overrides import parse_overrides, parse_setting


def _train_changes(extra: list[str]) -> dict:
    """--train.FIELD VALUE overrides for the new run's TrainConfig."""
    changes = {}
    for key, raw in parse_overrides(extra).items():
        section, _, name = key.partition(".")
        if section != "train":
            raise ValueError(f"unknown setting --{key}; only --train.FIELD overrides apply here")
        changes[name] = parse_setting(TrainConfig, name, raw, key)
    return changes


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="the new run directory")
    parser.add_argument(
        "--steps", type=int,
        help="train this many steps now (default: only write the run at step 0, with the "
        "source run's step budget; `moekit train --resume --out OUT` trains it)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _print_run(out: str, trainer, result) -> None:
    if result is None:
        print(f"wrote {out} at step 0; train it with `moekit train --resume --out {out}`")
    else:
        print(
            f"{result.steps} steps, final validation loss {result.final_val_loss:.4f}; "
            f"run directory {out}"
        )


UPCYCLE_DESCRIPTION = """\
Turn a trained dense run into an MoE run (sparse upcycling, Komatsuzaki et al. 2022):
every expert starts as a copy of its layer's dense FFN, routers start small and random,
the optimizer starts fresh. With the default softmax_topk router (renormalised) and no
capacity limit the new model computes exactly the dense model's function; settings that
change it (switch, --no-renormalize, a capacity factor, ...) are named when used.
Training settings are the dense run's; change them with --train.FIELD VALUE.
"""


def upcycle_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="moekit upcycle", description=UPCYCLE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
    )  # fmt: skip
    parser.add_argument("run", help="the trained dense run directory")
    _common(parser)
    parser.add_argument(
        "--num-experts", type=int, default=8, help="experts per MoE layer (default 8)"
    )
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument(
        "--router", default="softmax_topk", choices=ROUTERS, help="default softmax_topk"
    )
    parser.add_argument("--capacity-factor", type=float, help="default: dropless")
    parser.add_argument("--no-renormalize", action="store_true", help="keep raw top-k gate values")
    parser.add_argument(
        "--moe-every", type=int, default=1, help="every n-th layer is MoE (default 1)"
    )
    parser.add_argument(
        "--first-dense-layers", type=int, default=0, help="leading layers kept dense"
    )
    parser.add_argument("--seed", type=int, default=0, help="router init seed (default 0)")
    argv, extra = _dotted(argv)
    args = parser.parse_args(argv)
    from .runs import upcycle_run
    from .upcycle import upcycle_changes_function

    _threads(args.threads)
    try:
        trainer, result = upcycle_run(
            args.run, args.out, steps=args.steps, train_changes=_train_changes(extra),
            seed=args.seed, show_progress=not args.no_progress, num_experts=args.num_experts,
            top_k=args.top_k, router=args.router, capacity_factor=args.capacity_factor,
            renormalize=not args.no_renormalize, moe_every=args.moe_every,
            first_dense_layers=args.first_dense_layers,
        )  # fmt: skip
    except ValueError as error:
        return command_error("upcycle", error)
    reason = upcycle_changes_function(trainer.model_config.moe)
    print("at step 0 the MoE computes the dense model's function" if reason is None
          else f"note: at step 0 the MoE differs from the dense model: {reason}")  # fmt: skip
    _print_run(args.out, trainer, result)
    return 0


ADD_DESCRIPTION = """\
Add experts to every MoE layer of a trained run; at step 0 the output is unchanged.
--method offset (sigmoid_topk routers): NUM new experts copy old ones, and a selection bias
below every old expert keeps them unused until the aux-loss-free balancing raises it (about
1 / bias_update_rate steps; set it with --bias-update-rate). --method split (softmax_topk,
noisy_topk, dense, sigmoid_topk): every expert splits into parts of its hidden units, top_k
grows as much: NUM must be a multiple of the experts, parameters stay the same.
--method grow (the same routers): split, then every part is widened back to the old width
with new units whose output weights start at zero: parameters and FLOPs grow as top_k.
See docs/surgery.md for why other routers cannot be extended exactly.
"""


def add_experts_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="moekit add-experts", description=ADD_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
    )  # fmt: skip
    parser.add_argument("run", help="the trained MoE run directory")
    _common(parser)
    parser.add_argument("--num", type=int, required=True, help="experts to add per MoE layer")
    parser.add_argument("--method", choices=("offset", "split", "grow"),
                        help="default: offset for sigmoid_topk, else split")  # fmt: skip
    parser.add_argument("--bias-update-rate", type=float, help="sigmoid_topk balancing step size")
    parser.add_argument("--seed", type=int, default=0, help="init seed of grow's new units")
    argv, extra = _dotted(argv)
    args = parser.parse_args(argv)
    from .runs import add_experts_run

    _threads(args.threads)
    moe_changes = (
        {} if args.bias_update_rate is None else {"bias_update_rate": args.bias_update_rate}
    )
    try:
        trainer, result = add_experts_run(
            args.run, args.out, args.num, method=args.method, steps=args.steps,
            train_changes=_train_changes(extra), moe_changes=moe_changes, seed=args.seed,
            show_progress=not args.no_progress,
        )  # fmt: skip
    except ValueError as error:
        return command_error("add-experts", error)
    moe = trainer.model_config.moe
    print(f"now {moe.num_experts} experts per MoE layer, top_k {moe.top_k}, width {moe.d_hidden}")
    _print_run(args.out, trainer, result)
    return 0


MERGE_DESCRIPTION = """\
Branch-Train-MiX (Sukhbaatar et al. 2024): merge dense runs that share a parent (each
trained on one domain) into one MoE. Layer i's expert k is run k's FFN; embeddings,
attention and norms are averaged; routers are new. Stage 1 trains the routers only
(--router-steps), stage 2 everything (--joint-steps), on the --parent run's data.

--demo runs the whole experiment on the built-in corpus: a parent (tiny_dense) on every
domain, one branch per domain, the merge and both stages, and a baseline that trains the
parent for the same number of extra steps; then it prints validation loss per domain and
the domain x expert routing of each layer, and writes OUT/btx.json. --domains picks the
branches (default all five); --preset NAME and --model.FIELD VALUE / --train.FIELD VALUE
overrides change the parent model and the training settings (as in `moekit train`).
"""


def merge_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="moekit merge", description=MERGE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
    )  # fmt: skip
    parser.add_argument("runs", nargs="*", help="the dense domain runs to merge (expert k = run k)")
    parser.add_argument("--demo", action="store_true", help="run the whole experiment")
    parser.add_argument("--parent", help="the run whose data and settings the stages use")
    parser.add_argument("--out", help="output folder (--demo default: runs/btx-<time>)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument(
        "--router", default="softmax_topk", choices=ROUTERS, help="default softmax_topk"
    )
    parser.add_argument("--router-steps", type=int, help="stage 1 steps (demo default 40)")
    parser.add_argument("--joint-steps", type=int, help="stage 2 steps (demo default 80)")
    parser.add_argument("--parent-steps", type=int, help="demo: parent steps (default 200)")
    parser.add_argument("--branch-steps", type=int, help="demo: steps per branch (default 60)")
    parser.add_argument(
        "--domains", help="demo: comma-separated domains to branch on (default all)"
    )
    parser.add_argument(
        "--preset", default="tiny_dense", help="demo: parent model (default tiny_dense)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="demo: sequences per step (default 16)"
    )
    parser.add_argument(
        "--seq-len", type=int, default=128, help="demo: tokens per sequence (default 128)"
    )
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    argv, extra = _dotted(argv)
    args = parser.parse_args(argv)
    _threads(args.threads)
    try:
        if args.demo:
            return _demo(args, parse_overrides(extra))
        if extra:
            raise ValueError(f"unrecognised arguments {extra} (overrides apply to --demo only)")
        return _merge(args)
    except ValueError as error:
        return command_error("merge", error)


def _merge(args: argparse.Namespace) -> int:
    from .btx import merge_runs

    if len(args.runs) < 2 or args.parent is None or args.out is None:
        raise ValueError("give two or more runs, --parent RUN and --out DIR (or --demo)")
    last = merge_runs(
        args.runs, args.parent, args.out, router_steps=args.router_steps or 0,
        joint_steps=args.joint_steps or 0, top_k=args.top_k, router=args.router,
        show_progress=not args.no_progress,
    )  # fmt: skip
    print(f"merged {len(args.runs)} runs; the MoE run is {last}")
    return 0


def _demo(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from ..data import DOMAINS
    from ..train import default_out_dir
    from ..train.overrides import build_configs
    from .btx import BTXSettings, branch_train_mix, format_btx

    if args.runs or args.parent:
        raise ValueError("--demo trains its own runs; drop the run arguments and --parent")
    overrides.setdefault("train.batch_size", str(args.batch_size))
    overrides.setdefault("train.seq_len", str(args.seq_len))
    overrides.setdefault("train.eval_every", "50")
    model_config, train_config = build_configs(args.preset, overrides)
    if model_config.moe is not None:
        raise ValueError(f"preset {args.preset!r} is an MoE; the branches are dense models")
    given = {
        "parent_steps": args.parent_steps, "branch_steps": args.branch_steps,
        "router_steps": args.router_steps, "joint_steps": args.joint_steps,
        "domains": tuple(args.domains.split(",")) if args.domains else None,
    }  # fmt: skip
    settings = BTXSettings(
        top_k=args.top_k, router=args.router, **{k: v for k, v in given.items() if v is not None}
    )
    unknown = sorted(set(settings.domains) - set(DOMAINS))
    if unknown or len(settings.domains) < 2:
        raise ValueError(
            f"--domains: choose two or more of {', '.join(DOMAINS)}; got {args.domains!r}"
        )
    out = args.out or str(default_out_dir("btx"))
    start = time.perf_counter()
    result = branch_train_mix(
        out, model_config, train_config, settings, show_progress=not args.no_progress
    )
    print(format_btx(result))
    print(f"\nwrote {out}/btx.json ({time.perf_counter() - start:.0f} s)")
    return 0


def _dotted(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split `--model.X V` / `--train.X V` overrides from the rest, before argparse sees
    them (it would take their values for the positional run arguments)."""
    rest, dotted, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(("--model.", "--train.")):
            take = 1 if "=" in arg else 2
            dotted.extend(argv[i : i + take])
            i += take
        else:
            rest.append(arg)
            i += 1
    return rest, dotted


def _threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
