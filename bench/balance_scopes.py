"""The balance scopes on the default job: validation loss against the dense twin, domain x
expert mutual information and load CV, mean +- std over seeds.

    python bench/balance_scopes.py --out runs/scopes              # 3 seeds, every variant
    python bench/balance_scopes.py --out runs/scopes --only sequence --seeds 2
    python bench/balance_scopes.py --out runs/scopes --only default,global_x4:1  # seed 0 only

The dense twins and the default scope come from one `moekit train --seeds N` job
(OUT/default/); every other variant trains the MoE alone (`--no-compare`) with the same
seeds, data and budget, and is compared with the same seed's dense twin. Each variant is
a balance_scope and a grad_accum: the default job's 48 rows per step in 4 micro-batches of
12 rows is how a machine with a quarter of the memory trains it. There, the micro_batch
scope balances each 12-row micro-batch, the global scope the step's 48 rows (the same
loss as the default job's micro_batch scope at grad_accum 1, where the one forward is
the step), the sequence scope each 128-token row (whatever grad_accum is).

Compilation is off (train.compile false) so every variant runs the same kernels. The
figures come from the runs' files: the final validation loss (metrics.jsonl), and the
last evaluation's domain x expert counts (routing.jsonl), per MoE layer: the mutual
information I(domain; expert) in bits and the load CV of the expert totals, averaged over
the layers; and the median training step's tokens/s over the seeds (a timing: compare
it only between variants that ran with the cores otherwise idle). Finished runs are read
back, so a stopped measurement continues.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from moekit.report.stats import load_cv, mutual_information

# name -> (balance_scope, grad_accum)
VARIANTS = {
    "default": ("micro_batch", 1),
    "micro_batch_x4": ("micro_batch", 4),
    "sequence": ("sequence", 1),
    "global_x4": ("global", 4),
}
FIXED = ["--no-progress", "--train.compile", "false"]


def run(args: list[str], log: Path) -> None:
    command = [sys.executable, "-m", "moekit", "train", *args, *FIXED]
    print("$ moekit train " + " ".join(args + FIXED), flush=True)
    with log.open("w", encoding="utf-8") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}); see {log}")


def final_val_loss(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return [r for r in records if r.get("split") == "val"][-1]["loss"]


def median_tokens_per_s(run_dir: Path) -> float:
    """The median training step's tokens/s (metrics.jsonl; the whole batch per step)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return statistics.median(r["tokens_per_s"] for r in records if r.get("split") == "train")


def routing_figures(run_dir: Path) -> tuple[float, float]:
    """(mean over MoE layers of I(domain; expert) in bits, of the load CV), last evaluation."""
    records = [json.loads(line) for line in (run_dir / "routing.jsonl").open()]
    last = [r for r in records if r.get("split") == "val" and r.get("layers")][-1]
    mis, cvs = [], []
    for layer in last["layers"]:
        counts = layer["domain_expert_counts"]
        mis.append(mutual_information(counts))
        cvs.append(load_cv([sum(column) for column in zip(*counts, strict=True)]))
    return statistics.mean(mis), statistics.mean(cvs)


def variant_dirs(out: Path, name: str, seeds: list[int]) -> dict[int, Path]:
    if name == "default":
        return {seed: out / "default" / f"seed{seed}" / "moe" for seed in seeds}
    return {seed: out / name / f"seed{seed}" for seed in seeds}


def measure(out: Path, names: dict[str, list[int]], seeds: list[int], steps: int | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    budget = ["--steps", str(steps)] if steps else []
    if not (out / "default" / "summary.json").exists():
        run(
            ["--seeds", str(len(seeds)), "--out", str(out / "default"), *budget],
            out / "default.log",
        )
    table = {}
    for name, variant_seeds in names.items():
        scope, grad_accum = VARIANTS[name]
        for seed, folder in variant_dirs(out, name, variant_seeds).items():
            if name != "default" and not (folder / "checkpoint").exists():
                folder.parent.mkdir(parents=True, exist_ok=True)
                run(
                    ["--no-compare", "--out", str(folder), "--train.seed", str(seed),
                     "--model.moe.balance_scope", scope, "--train.grad_accum", str(grad_accum),
                     *budget],
                    folder.parent / f"seed{seed}.log",
                )  # fmt: skip
        rows = []
        for seed, folder in variant_dirs(out, name, variant_seeds).items():
            dense = final_val_loss(out / "default" / f"seed{seed}" / "dense")
            loss = final_val_loss(folder)
            mi, cv = routing_figures(folder)
            rows.append(
                {"seed": seed, "val_loss": loss, "gap": dense - loss, "mi": mi, "cv": cv,
                 "tokens_per_s": median_tokens_per_s(folder)}
            )  # fmt: skip
        table[name] = rows
    return table


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="default: the job's budget")
    parser.add_argument(
        "--only",
        default=",".join(VARIANTS),
        help="comma-separated variants, each NAME or NAME:N (its first N seeds only)",
    )
    args = parser.parse_args()
    names = {}
    for item in filter(None, (n.strip() for n in args.only.split(","))):
        name, _, count = item.partition(":")
        names[name] = list(range(int(count) if count else args.seeds))
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    flags = sorted(
        f for f in Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split()
        if f.startswith(("avx", "amx"))
    ) if Path("/proc/cpuinfo").exists() else []  # fmt: skip
    print(f"cpu: {platform.processor() or platform.machine()}, flags {' '.join(flags)}")
    table = measure(args.out, names, list(range(args.seeds)), args.steps)
    (args.out / "scopes.json").write_text(json.dumps(table, indent=1), encoding="utf-8")
    print(f"\n{'variant':16s} {'scope':12s} {'accum':>5s} {'seeds':>5s}  {'val loss':>17s}  "
          f"{'gap to dense (nats)':>19s}  {'I(domain;expert) bits':>21s}  {'load CV':>17s}  "
          f"{'tokens/s':>8s}")  # fmt: skip
    for name, rows in table.items():
        scope, grad_accum = VARIANTS[name]
        cols = [mean_std([r[k] for r in rows]) for k in ("val_loss", "gap", "mi", "cv")]
        speed = statistics.median(r["tokens_per_s"] for r in rows)
        print(f"{name:16s} {scope:12s} {grad_accum:5d} {len(rows):5d}  {cols[0]:>17s}  {cols[1]:>19s}  "
              f"{cols[2]:>21s}  {cols[3]:>17s}  {speed:8,.0f}")  # fmt: skip
    print(f"wrote {args.out / 'scopes.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
