"""`moekit finetune --demo`: does instruction tuning help the MoE more than its dense twin?

Shen et al. 2023 ("Mixture-of-Experts Meets Instruction Tuning", Flan-MoE) found that
instruction tuning lifts MoE models far more than dense models of equal compute, on tasks
held out of the tuning mix. At the scale of the tiny preset on 2 CPU cores, per seed:
    1. pretrain the tiny MoE and its dense twin on the default corpus (train.compare, a
       small budget), with that seed;
    2. instruction-tune each on the embedded instruction set (instructions.py), same data,
       same steps, full fine-tuning: the MoE with its router trained, the MoE with its
       router frozen, and the dense twin;
    3. before and after, evaluate on the held-out task families: the loss on the answer
       tokens per family, and exact match of the final answer of held-out math problems
       (greedy decoding).
The table (means and standard deviations over seeds) goes to OUT/results.json and stdout.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import Tokenizer
from ..generate import generate
from ..models import Transformer, presets
from ..models.lora import LoRAConfig
from ..train import TrainConfig, compare, default_out_dir, load_trained_model, write_prepared
from .chat import DEFAULT_TEMPLATE, IGNORE, ChatTemplate, Conversation
from .data import encode_all, pad_batch
from .instructions import build_instructions, math_answer
from .job import FinetuneConfig, run_finetune


@dataclass(kw_only=True)
class DemoBudget:
    """Steps and sizes of the demo: about five minutes per seed on 2 shared cores."""

    pretrain_steps: int = 150
    pretrain_batch: int = 16
    finetune_steps: int = 60
    finetune_batch: int = 8
    finetune_lr: float = 1e-3
    eval_per_family: int = 16
    exact_match_per_family: int = 8
    max_new_tokens: int = 48
    seq_len: int = 128


VARIANTS = {  # name: (pretrained run, FinetuneConfig)
    "moe": ("moe", FinetuneConfig(train_router=True)),
    "moe, router frozen": ("moe", FinetuneConfig(train_router=False)),
    "dense": ("dense", FinetuneConfig()),
}


@torch.no_grad()
def answer_losses(model: Transformer, template: ChatTemplate, examples, seq_len: int) -> dict:
    """Mean cross entropy over the answer tokens, per task family (nats per token)."""
    model.eval()
    encoded, _ = encode_all(examples, template, seq_len + 1)
    sums: dict[str, list[float]] = {}
    for start in range(0, len(encoded), 8):
        chunk = encoded[start : start + 8]
        inputs_BL, targets_BL = pad_batch(chunk, template.tokenizer.pad_id)
        logits_BLV = model(inputs_BL).logits.float()
        loss_BL = F.cross_entropy(
            logits_BLV.transpose(1, 2), targets_BL, ignore_index=IGNORE, reduction="none"
        )
        for row, example in enumerate(chunk):
            total, count = sums.setdefault(example.family, [0.0, 0])
            counted = int((targets_BL[row] != IGNORE).sum())
            sums[example.family] = [total + loss_BL[row].sum().item(), count + counted]
    return {family: total / count for family, (total, count) in sorted(sums.items())}


@torch.no_grad()
def exact_match(model: Transformer, template: ChatTemplate, problems, max_new_tokens: int) -> float:
    """Share of math problems whose greedy answer ("Answer: X") equals the worked answer."""
    model.eval()
    tokenizer, correct = template.tokenizer, 0
    for conversation in problems:
        prompt = template.render(conversation.messages[:1], add_generation_prompt=True)
        ids = tokenizer.backend.encode(prompt, add_special_tokens=False).ids
        room = model.config.max_seq_len - len(ids)
        out = generate(
            model,
            torch.tensor([ids]),
            max_new_tokens=min(max_new_tokens, room),
            temperature=0.0,
            eos_token_id=list(tokenizer.eos_ids),
        )
        text = tokenizer.decode(t for t in out.tokens_BN[0].tolist() if t not in tokenizer.eos_ids)
        want = math_answer(conversation.messages[1]["content"])
        correct += math_answer(text) == want
    return correct / max(len(problems), 1)


def _evaluation_sets(held_out: list[Conversation], budget: DemoBudget):
    per_family: dict[str, list[Conversation]] = {}
    for conversation in held_out:
        per_family.setdefault(conversation.family, []).append(conversation)
    losses = [c for group in per_family.values() for c in group[: budget.eval_per_family]]
    math = [
        c
        for family, group in sorted(per_family.items())
        if family.startswith("math-")
        for c in group[: budget.exact_match_per_family]
    ]
    return losses, math


def _scores(model, template, loss_set, math_set, budget: DemoBudget) -> dict:
    losses = answer_losses(model, template, loss_set, budget.seq_len)
    return {
        "answer_loss": statistics.fmean(losses.values()),
        "per_family": losses,
        "exact_match": exact_match(model, template, math_set, budget.max_new_tokens),
    }


def run_demo(
    out: str | Path | None, *, seeds: int = 3, show_progress: bool = True, budget=None
) -> dict:
    """Run the experiment into out (default runs/flan-moe-<time>); returns the results."""
    budget = budget or DemoBudget()
    out = Path(out) if out is not None else default_out_dir("flan-moe")
    train_set, held_out = build_instructions()
    loss_set, math_set = _evaluation_sets(held_out, budget)
    results: dict = {"budget": vars(budget), "seeds": {}}
    # The default corpus, tokenised once for every seed's pretraining.
    corpus = out / "corpus" / "train.bin"
    if not corpus.exists():
        write_prepared(None, corpus.parent, vocab_size=presets.tiny().vocab_size)
    for seed in range(seeds):
        pretrain = out / f"seed{seed}" / "pretrain"
        config = TrainConfig(
            steps=budget.pretrain_steps, batch_size=budget.pretrain_batch, seed=seed
        )
        compare(presets.tiny(), config, pretrain, data=corpus, show_progress=show_progress)
        tokenizer = Tokenizer.load(pretrain / "moe")
        template = ChatTemplate(DEFAULT_TEMPLATE, tokenizer)
        row, before_by_run = {}, {}
        for name, (run, finetune_config) in VARIANTS.items():
            base = load_trained_model(pretrain / run)
            if run not in before_by_run:
                before_by_run[run] = _scores(base, template, loss_set, math_set, budget)
            before = before_by_run[run]
            run_dir = out / f"seed{seed}" / name.replace(", ", "-").replace(" ", "-")
            overrides = {
                "train.steps": str(budget.finetune_steps),
                "train.batch_size": str(budget.finetune_batch),
                "train.lr": str(budget.finetune_lr),
                "train.seq_len": str(budget.seq_len),
                "train.seed": str(seed),
            }
            run_finetune(
                base, tokenizer, train_set, loss_set, run_dir, overrides, LoRAConfig(),
                finetune_config, {"demo": name}, show_progress=show_progress, export=False,
            )  # fmt: skip
            after = _scores(load_trained_model(run_dir), template, loss_set, math_set, budget)
            row[name] = {"before": before, "after": after}
            print(_line(seed, name, before, after), flush=True)
        results["seeds"][seed] = row
    results["table"] = summary_table(results)
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(results["table"])
    return results


def _line(seed: int, name: str, before: dict, after: dict) -> str:
    return (
        f"seed {seed} {name:20s} held-out answer loss {before['answer_loss']:.3f} -> "
        f"{after['answer_loss']:.3f}, math exact match {before['exact_match']:.0%} -> "
        f"{after['exact_match']:.0%}"
    )


def summary_table(results: dict) -> str:
    """Markdown: per variant, mean ± std over seeds of the held-out scores before and after."""
    lines = [
        "| model | answer loss before | answer loss after | gain | exact match before | exact match after |",
        "|---|---|---|---|---|---|",
    ]
    for name in VARIANTS:
        rows = [seed_rows[name] for seed_rows in results["seeds"].values()]
        before = [r["before"]["answer_loss"] for r in rows]
        after = [r["after"]["answer_loss"] for r in rows]
        gain = [b - a for b, a in zip(before, after)]
        em_before = [100 * r["before"]["exact_match"] for r in rows]
        em_after = [100 * r["after"]["exact_match"] for r in rows]
        cells = [_mean_std(v) for v in (before, after, gain)]
        cells += [_mean_std(v, "%") for v in (em_before, em_after)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_std(values: list[float], unit: str = "") -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    digits = 1 if unit else 3
    return f"{statistics.fmean(values):.{digits}f}{unit} ± {spread:.{digits}f}{unit}"
