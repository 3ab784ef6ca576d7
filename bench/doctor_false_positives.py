"""How often `moekit doctor` (and the trainer's routing warnings) flag healthy models.

    python bench/doctor_false_positives.py --out runs/doctor-fp            # everything
    python bench/doctor_false_positives.py --out runs/doctor-fp --skip-presets  # no preset runs

Healthy models, four groups:
- hf: tiny random checkpoints of the seven families moekit converts (8 experts, top-2),
  --seeds each, their routers balanced as a balance loss would leave them (tests/
  doctor_builders.py: `balance`), calibrated on random token ids;
- init: the moekit presets (tiny, deepseek_v3_tiny, gpt_oss_tiny) at initialisation,
  written as runs;
- micro: micro runs (4 experts, top-2; softmax, sigmoid with bias balancing, capacity 2.0)
  trained 12 steps, --seeds each, calibrated on the built-in text in their own tokenizer;
- presets: `moekit train --preset P --no-compare --steps N` on the default corpus; the
  trainer's routing warnings are counted, then the doctor examines the run;
- trained: runs given with --runs (the default job's runs, say), examined read-only.
A false positive is an error or a warning on one of these; notes are counted apart. The
table gives, per check, the models it flagged out of those examined.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import platform
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import doctor_builders as builders  # noqa: E402

from moekit import MoEConfig  # noqa: E402
from moekit.doctor.cli import examine  # noqa: E402
from moekit.doctor.target import read_target  # noqa: E402
from moekit.interop.convert import write_run  # noqa: E402
from moekit.models import ModelConfig, Transformer, presets  # noqa: E402
from moekit.train import TrainConfig, Trainer, prepare_run_data  # noqa: E402
from moekit.train.health import routing_health  # noqa: E402

PRESETS = ("tiny", "deepseek_v3_tiny", "gpt_oss_tiny")
MICRO = {
    "softmax": {},
    # bias balancing with the default balance loss beside it: with bias balancing alone,
    # 12 steps leave layer 1 starved or collapsed in most seeds (docs/doctor.md)
    "sigmoid": dict(router="sigmoid_topk"),
    "capacity": dict(capacity_factor=2.0),
}


def hf_models(root: Path, seeds: int):
    for arch in builders.ALL_ARCHS:
        for seed in range(seeds):
            model = builders.build(arch, seed)
            builders.balance(model)
            folder = root / f"{arch}-{seed}"
            builders.save(model, folder)
            yield "hf", f"{arch}-{seed}", folder


def init_runs(root: Path, seeds: int):
    for name in PRESETS:
        for seed in range(seeds):
            torch.manual_seed(seed)
            folder = root / f"init-{name}-{seed}"
            folder.mkdir()
            write_run(Transformer(getattr(presets, name)()), folder, source=f"preset {name}")
            yield "init", f"{name}-{seed}", folder


def micro_runs(root: Path, seeds: int):
    text = root / "text.txt"
    text.write_text(inspect.getsource(json.decoder) + inspect.getsource(textwrap), "utf-8")
    for name, moe in MICRO.items():
        for seed in range(seeds):
            model = ModelConfig(
                vocab_size=384, d_model=32, num_layers=2, num_heads=2, max_seq_len=64,
                moe=MoEConfig(**({"d_model": 32, "d_hidden": 32, "num_experts": 4, "top_k": 2} | moe)),
            )  # fmt: skip
            folder = root / f"micro-{name}-{seed}"
            data = prepare_run_data(folder, data=text, vocab_size=384)
            config = TrainConfig(
                steps=12, batch_size=8, seq_len=64, eval_every=6, eval_batches=2, seed=seed
            )
            Trainer(model, config, folder, data=data, show_progress=False).train()
            yield "micro", f"{name}-{seed}", folder


def preset_runs(root: Path, steps: int, warnings: dict):
    for name in PRESETS:
        folder = root / f"preset-{name}"
        command = [sys.executable, "-m", "moekit", "train", "--preset", name, "--no-compare",
                   "--steps", str(steps), "--eval-every", str(max(steps // 4, 1)),
                   "--no-progress", "--out", str(folder)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        warnings[name] = [line for line in done.stdout.splitlines() if "warning:" in line]
        yield "presets", name, folder


def replayed_warnings(run: Path) -> list[str]:
    """The routing warnings the trainer gives (train/health.py's RoutingWatch), replayed
    from a run's routing.jsonl: the counts of the steps between evaluations, judged at each
    evaluation, each condition once."""
    config = json.loads((run / "config.json").read_text())
    moe, every = config["model"].get("moe"), config["train"]["eval_every"]
    if not moe or not (run / "routing.jsonl").is_file():
        return []
    lines, warned, counts = [], set(), {}
    for line in (run / "routing.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] != "train":
            continue
        for layer in record["layers"]:
            added = torch.tensor(layer["tokens_per_expert"], dtype=torch.float64)
            counts[layer["layer"]] = counts.get(layer["layer"], 0) + added
        if record["step"] % every == 0 or record["step"] == config["train"]["steps"]:
            for layer, layer_counts in counts.items():
                for issue in routing_health(layer_counts, moe["top_k"], layer):
                    if (issue.kind, layer) not in warned:
                        warned.add((issue.kind, layer))
                        lines.append(f"step {record['step']}: {issue.text}")
            counts = {}
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="where the models go (a temp dir)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--preset-steps", type=int, default=60)
    parser.add_argument("--skip-presets", action="store_true")
    parser.add_argument("--groups", default="hf,init,micro", help="of hf, init, micro")
    parser.add_argument(
        "--runs", nargs="*", default=[], type=Path, help="trained runs to examine too (read only)"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = args.out or Path(tempfile.mkdtemp(prefix="doctor-fp-"))
    root.mkdir(parents=True, exist_ok=True)
    trainer_warnings: dict[str, list[str]] = {}
    groups = {
        "hf": lambda: hf_models(root, args.seeds),
        "init": lambda: init_runs(root, min(args.seeds, 2)),
        "micro": lambda: micro_runs(root, args.seeds),
    }
    sources = [groups[name]() for name in args.groups.split(",") if name]
    sources.append(("trained", str(run), run) for run in args.runs)
    if not args.skip_presets:
        sources.append(preset_runs(root, args.preset_steps, trainer_warnings))
    examined = collections.Counter()
    flagged: dict[tuple[str, str], set] = collections.defaultdict(set)
    noted: dict[tuple[str, str], set] = collections.defaultdict(set)
    for source in sources:
        for group, name, folder in source:
            try:
                report = examine(read_target(folder))
            except ValueError as error:  # not a finished run, say: not examined
                print(f"  {group} {name}: not examined: {error}")
                continue
            examined[group] += 1
            if group in ("micro", "trained"):
                trainer_warnings[f"{group} {name}"] = replayed_warnings(folder)
            for finding in report.findings:
                bucket = noted if finding.severity == "note" else flagged
                bucket[(group, finding.check)].add(name)
                if finding.severity != "note":
                    print(f"  {group} {name}: {finding.severity}: {finding.message}")
    print(f"\nmoekit doctor false positives ({platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.seeds} seeds)")  # fmt: skip
    print("| group | models | errors or warnings | checks that flagged (models) | notes (models) |")
    print("|---|---|---|---|---|")
    for group, count in examined.items():
        bad = {c: len(n) for (g, c), n in flagged.items() if g == group}
        notes = {c: len(n) for (g, c), n in noted.items() if g == group}
        models = len(set().union(*[n for (g, _), n in flagged.items() if g == group] or [set()]))
        print(f"| {group} | {count} | {models} | {bad or '-'} | {notes or '-'} |")
    warned = {name: lines for name, lines in trainer_warnings.items() if lines}
    print(f"\ntrainer routing warnings (replayed from routing.jsonl for micro and trained "
          f"runs): {len(warned)} of {len(trainer_warnings)} runs")  # fmt: skip
    for name, lines in warned.items():
        for line in lines:
            print(f"  {name}: {line}")


if __name__ == "__main__":
    main()
