"""Search the MoE recipe (and tune its dense twin) on the validation split.

Every candidate is one model trained alone for the default budget on the same tokens:
the data is tokenised once into OUT/data/ and copied into each run. Dense candidates tune
the settings the dense twin has (learning rate, warmup, schedule); MoE candidates vary
what the literature names (experts and their granularity, top-k, shared experts, which
layers are MoE, balance and z losses, bias balancing, learning rate). The table ranks the
MoEs by final validation loss and gives, for each, the steps it needs to reach the best
dense candidate's final loss (interpolated between evaluations, as `moekit train` does).

    python bench/recipe_search.py --out runs/search               # every candidate
    python bench/recipe_search.py --out runs/search --only moe_base,dense_lr2e-3
    python bench/recipe_search.py --out runs/search --jobs 2 --threads 1
    python bench/recipe_search.py --out runs/search-2x --steps 450  # twice the budget
    python bench/recipe_search.py --list

Finished candidates are read back from OUT/<name>/result.json, so a stopped search
continues where it was. Losses do not depend on --jobs or --threads beyond rounding;
timings do (candidates running side by side share the cores), so the search reports
losses and steps only: `moekit train` measures the stopwatch.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import time
from pathlib import Path

# Candidate name -> (preset, overrides). Every MoE spends 512 hidden units per token in
# its MoE layers (top_k * d_hidden + shared), so one dense twin (width 512) serves all.
# Every candidate names its learning rate, so the table does not move with the defaults;
# the architecture variants ran at 2e-3, the learning rate of the recipe they started from.
DENSE = {
    "dense_lr1e-3": {"train.lr": "1e-3"},
    "dense_lr2e-3": {"train.lr": "2e-3"},
    "dense_lr3e-3": {"train.lr": "3e-3"},
    "dense_lr5e-3": {"train.lr": "5e-3"},
    "dense_lr1.5e-3": {"train.lr": "1.5e-3"},
    "dense_lr2e-3_warm10": {"train.lr": "2e-3", "train.warmup_steps": "23"},
    "dense_lr3e-3_warm10": {"train.lr": "3e-3", "train.warmup_steps": "23"},
    "dense_lr3e-3_min0": {"train.lr": "3e-3", "train.min_lr_ratio": "0.0"},
}
MOE = {
    # tiny(): 16 experts of width 128, top 2, one shared expert of width 256
    "moe_base": {"train.lr": "2e-3"},
    "moe_lr1e-3": {"train.lr": "1e-3"},
    "moe_lr3e-3": {"train.lr": "3e-3"},
    "moe_lr2.5e-3": {"train.lr": "2.5e-3"},
    "moe_lr4e-3": {"train.lr": "4e-3"},
    "moe_lr5e-3": {"train.lr": "5e-3"},
    "moe_lr3e-3_warm10": {"train.lr": "3e-3", "train.warmup_steps": "23"},
    "moe_lr3e-3_64x128": {"train.lr": "3e-3", "model.moe.num_experts": "64"},
    "moe_lr3e-3_32x128": {"train.lr": "3e-3", "model.moe.num_experts": "32"},
    "moe_lr3e-3_balance1e-3": {"train.lr": "3e-3", "model.moe.balance_loss_coef": "1e-3"},
    # granularity at the same active width (DeepSeekMoE): finer experts, larger top_k
    "moe_32x64_top4": {
        "train.lr": "2e-3",
        "model.moe.num_experts": "32",
        "model.moe.d_hidden": "64",
        "model.moe.top_k": "4",
    },
    "moe_8x128_top2": {"train.lr": "2e-3", "model.moe.num_experts": "8"},
    "moe_32x128_top2": {"train.lr": "2e-3", "model.moe.num_experts": "32"},
    "moe_64x128_top2": {"train.lr": "2e-3", "model.moe.num_experts": "64"},
    # no shared expert: the routed experts carry the whole width
    "moe_16x128_top4_noshared": {
        "train.lr": "2e-3",
        "model.moe.top_k": "4",
        "model.moe.num_shared_experts": "0",
    },
    "moe_16x256_top2_noshared": {
        "train.lr": "2e-3",
        "model.moe.d_hidden": "256",
        "model.moe.num_shared_experts": "0",
    },
    # top-1 routing with a wider expert (Switch-like) beside the shared one
    "moe_16x256_top1": {"train.lr": "2e-3", "model.moe.d_hidden": "256", "model.moe.top_k": "1"},
    # MoE in every other layer (GShard, Switch), the dense layers at the twin's width
    "moe_every2_32x128": {
        "train.lr": "2e-3",
        "model.moe_every": "2",
        "model.d_hidden": "512",
        "model.moe.num_experts": "32",
    },
    "moe_first_dense": {
        "train.lr": "2e-3",
        "model.first_dense_layers": "1",
        "model.d_hidden": "512",
    },
    # balancing
    "moe_balance1e-3": {"train.lr": "2e-3", "model.moe.balance_loss_coef": "1e-3"},
    "moe_balance0.05": {"train.lr": "2e-3", "model.moe.balance_loss_coef": "0.05"},
    "moe_no_zloss": {"train.lr": "2e-3", "model.moe.z_loss_coef": "0"},
    "moe_sigmoid_bias": {
        "train.lr": "2e-3",
        "model.moe.router": "sigmoid_topk",
        "model.moe.bias_update_rate": "1e-3",
        "model.moe.balance_loss_coef": "0",
    },
    # capacity: a token past its expert's room is dropped (it keeps the residual)
    "moe_capacity1.25": {
        "train.lr": "2e-3",
        "model.moe.capacity_factor": "1.25",
        "model.moe.overflow": "drop",
    },
}


def candidates() -> dict[str, tuple[str, dict[str, str]]]:
    """Every candidate: name -> (preset, overrides)."""
    table = {name: ("tiny_dense", overrides) for name, overrides in DENSE.items()}
    table.update({name: ("tiny", overrides) for name, overrides in MOE.items()})
    return table


def prepare(out: Path, data: str | None) -> Path:
    """Tokenise the data once (the tokenizer is trained on its training split)."""
    from moekit.train.data import prepare_run_data

    data_dir = out / "data"
    prepare_run_data(data_dir, data=data, vocab_size=4096)
    return data_dir


def train_candidate(args: tuple) -> dict:
    """Train one candidate in OUT/<name>/ and write its result.json (a worker process)."""
    name, preset, overrides, out, data_dir, steps, threads, seed = args
    import torch

    from moekit.runtime import keep_freed_memory
    from moekit.train.data import copy_run_data, prepare_run_data
    from moekit.train.overrides import build_configs
    from moekit.train.trainer import Trainer

    torch.set_num_threads(threads)
    keep_freed_memory()
    # Eager: losses only, and a compile would cost more than it saves at these speeds.
    settings = {"train.compile": "false"} | dict(overrides)
    settings |= {"train.steps": str(steps), "train.seed": str(seed)}
    model_config, train_config = build_configs(preset, settings)
    run_dir = Path(out) / name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished run: start it again
    run_dir.mkdir(parents=True)
    copy_run_data(data_dir, run_dir)
    run_data = prepare_run_data(run_dir, vocab_size=model_config.vocab_size)
    trainer = Trainer(model_config, train_config, run_dir, data=run_data, show_progress=False)
    start = time.perf_counter()
    result = trainer.train()
    record = {
        "name": name,
        "preset": preset,
        "overrides": overrides,
        "final_val_loss": result.final_val_loss,
        "evals": result.evals,
        "tokens_per_s": result.tokens_per_s,
        "seconds": time.perf_counter() - start,
        "threads": threads,
    }
    (run_dir / "result.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    print(f"{name}: final val loss {result.final_val_loss:.4f}", flush=True)
    return record


def steps_to_reach(evals: list, target: float) -> float | None:
    from moekit.train.compare import steps_to_reach as reach

    return reach([tuple(e) for e in evals], target)


def table(results: dict[str, dict], steps: int) -> str:
    """Markdown: dense candidates, then MoEs by final loss with their step speed-up."""
    dense = {n: r for n, r in results.items() if r["preset"] == "tiny_dense"}
    moe = {n: r for n, r in results.items() if r["preset"] != "tiny_dense"}
    lines = [
        "| candidate | settings | final val loss | steps to best dense | speed-up (steps) | gap (nats) |"
    ]
    lines.append("|---|---|---|---|---|---|")
    best_dense = min(dense.values(), key=lambda r: r["final_val_loss"]) if dense else None
    for name, r in sorted(dense.items(), key=lambda item: item[1]["final_val_loss"]):
        mark = " (best)" if r is best_dense else ""
        lines.append(f"| {name}{mark} | {_settings(r)} | {r['final_val_loss']:.4f} | {steps} | | |")
    for name, r in sorted(moe.items(), key=lambda item: item[1]["final_val_loss"]):
        reached = speedup = gap = ""
        if best_dense is not None:
            step = steps_to_reach(r["evals"], best_dense["final_val_loss"])
            reached = "not reached" if step is None else f"{step:.0f}"
            speedup = "" if step is None else f"{steps / step:.2f}x"
            gap = f"{best_dense['final_val_loss'] - r['final_val_loss']:.3f}"
        lines.append(
            f"| {name} | {_settings(r)} | {r['final_val_loss']:.4f} | {reached} | {speedup} | {gap} |"
        )
    return "\n".join(lines)


def _settings(record: dict) -> str:
    return (
        ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in record["overrides"].items()) or "preset"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/recipe-search", help="output folder")
    parser.add_argument("--data", help="training text instead of the default corpus")
    parser.add_argument("--only", help="comma-separated candidate names")
    parser.add_argument("--steps", type=int, default=225, help="optimizer steps (default 225)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    parser.add_argument("--jobs", type=int, default=1, help="candidates trained side by side")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per candidate")
    parser.add_argument("--list", action="store_true", help="print the candidates and stop")
    args = parser.parse_args(argv)
    table_of = candidates()
    if args.list:
        for name, (preset, overrides) in table_of.items():
            print(f"{name:<28} {preset:<11} {overrides}")
        return 0
    names = list(table_of) if args.only is None else args.only.split(",")
    unknown = [n for n in names if n not in table_of]
    if unknown:
        print(f"unknown candidates {unknown}; --list shows them", file=sys.stderr)
        return 2
    import torch

    from moekit.benchmark import machine_summary

    threads = args.threads or max(1, torch.get_num_threads() // args.jobs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(machine_summary())
    data_dir = prepare(out, args.data)
    results, todo = {}, []
    for name in names:
        done = out / name / "result.json"
        record = json.loads(done.read_text()) if done.exists() else None
        if record is not None and record["evals"] and record["evals"][-1][0] == args.steps:
            results[name] = record
        else:
            preset, overrides = table_of[name]
            todo.append(
                (name, preset, overrides, str(out), data_dir, args.steps, threads, args.seed)
            )
    if todo:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            for record in pool.imap_unordered(train_candidate, todo):
                results[record["name"]] = record
    markdown = table(results, args.steps)
    (out / "table.md").write_text(markdown + "\n", encoding="utf-8")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
