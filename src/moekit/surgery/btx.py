"""Branch-Train-MiX on run directories, and the experiment behind `moekit merge --demo`.

# B batch, L sequence length, K top_k, E experts, G domains

    OUT/parent             dense model trained on every domain
    OUT/branch-DOMAIN      the parent trained on one domain (same tokenizer)
    OUT/mix/stage1         merged MoE, routers trained, everything else frozen
    OUT/mix/stage2         then every parameter trained
    OUT/baseline           the parent trained on every domain for as many more steps as
                           the branches and both stages together
    OUT/btx.json           validation loss per domain of every model, routing matrices
Every folder is an ordinary run: `moekit eval`, `moekit generate`, `moekit train --resume`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import CorpusConfig, TokenStream, sequential_batches
from ..models import ModelConfig, Transformer
from ..models.expert_ids import label_expert_counts
from ..train import (
    TrainConfig,
    load_trained_model,
    prepare_run_data,
    run_configs,
)
from ..train.builder import build_job
from .merge import ROUTERS_ONLY, merge_dense_models
from .runs import derived_run, domain_run_data, start_run


@dataclass(kw_only=True)
class BTXSettings:
    """Step budgets and the merged MoE's routing for one Branch-Train-MiX experiment."""

    domains: tuple[str, ...] = ("code", "prose", "math", "dialogue", "multilingual")
    parent_steps: int = 200
    branch_steps: int = 60
    router_steps: int = 40  # stage 1: routers only
    joint_steps: int = 80  # stage 2: every parameter
    top_k: int = 2
    router: str = "softmax_topk"

    @property
    def extra_steps(self) -> int:
        """Training steps after the parent: all branches plus both stages (the baseline's)."""
        return len(self.domains) * self.branch_steps + self.router_steps + self.joint_steps


@dataclass
class DomainEval:
    """Validation loss per domain and overall; for an MoE, per-layer domain x expert counts.

    routing: one (G, E) int array per MoE layer: assignments of each domain's tokens to each
    expert (K per token), or None for a dense model.
    """

    losses: dict[str, float]
    tokens: dict[str, int]
    routing: list[np.ndarray] | None = field(default=None)


@torch.no_grad()
def evaluate_by_domain(
    model: Transformer, stream: TokenStream, *, batch_size: int, seq_len: int
) -> DomainEval:
    """Next-token cross entropy on a whole stream, by the domain of each target token.

    The routing counts use the same domain labels (a token's own domain and its target's
    differ only at document boundaries).
    """
    was_training = model.training
    model.eval()
    num_domains = len(stream.domains)
    loss_sum_G = torch.zeros(num_domains, dtype=torch.float64)
    count_G = torch.zeros(num_domains, dtype=torch.float64)
    moe_layers = model.config.moe_layers
    num_experts = model.config.moe.num_experts if model.config.moe else 0
    routing = [torch.zeros(num_domains, num_experts, dtype=torch.int64) for _ in moe_layers]
    batches = sequential_batches(
        stream, batch_size=batch_size, seq_len=seq_len, return_domains=True
    )
    for inputs_BL, targets_BL, domains_BL in batches:
        out = model(inputs_BL, return_expert_ids=bool(moe_layers))
        losses_BL = F.cross_entropy(
            out.logits.flatten(0, 1).float(), targets_BL.flatten(), reduction="none"
        )
        domains_N = domains_BL.flatten().long()
        loss_sum_G += torch.bincount(domains_N, weights=losses_BL.double(), minlength=num_domains)
        count_G += torch.bincount(domains_N, minlength=num_domains).double()
        for counts_GE, layer in zip(routing, moe_layers):
            counts_GE += label_expert_counts(
                out.expert_ids[layer], domains_BL, num_domains, num_experts
            )
    model.train(was_training)
    present = [g for g in range(num_domains) if count_G[g] > 0]
    losses = {stream.domains[g]: (loss_sum_G[g] / count_G[g]).item() for g in present}
    losses["all"] = (loss_sum_G.sum() / count_G.sum()).item()
    tokens = {stream.domains[g]: int(count_G[g]) for g in present}
    tokens["all"] = int(count_G.sum())
    matrices = [m[present].numpy() for m in routing] if moe_layers else None
    return DomainEval(losses=losses, tokens=tokens, routing=matrices)


def merge_runs(
    branch_runs: list[str | Path],
    union_run: str | Path,
    out: str | Path,
    *,
    router_steps: int,
    joint_steps: int,
    show_progress: bool = True,
    **moe_options,
) -> Path:
    """`moekit merge`: merge dense runs into an MoE, then train it in two stages.

    Args:
        branch_runs: K dense runs with one config (e.g. a parent trained on K domains).
        union_run: the run whose data and training settings the stages use (the parent).
        out: OUT/stage1 (routers only) and OUT/stage2 (everything) are written.
        router_steps, joint_steps: the two stages' steps (0 skips a stage).
        moe_options: top_k, router, ... of the merged MoE layers.
    Returns:
        The folder of the last stage's run.
    """
    merged = merge_dense_models([load_trained_model(run) for run in branch_runs], **moe_options)
    out = Path(out)
    last = out / "stage0"
    stages = (("stage1", router_steps, {"trainable": ROUTERS_ONLY}), ("stage2", joint_steps, {}))
    for name, steps, changes in stages:
        if steps == 0:
            continue
        trainer, _ = derived_run(
            union_run,
            out / name,
            merged,
            steps=steps,
            train_changes=changes,
            show_progress=show_progress,
        )
        merged, last = trainer.model, out / name
    if last.name == "stage0":  # no training: the merged weights as a run at step 0
        derived_run(union_run, last, merged, show_progress=show_progress)
    return last


def branch_train_mix(
    out: str | Path,
    model_config: ModelConfig,
    train_config: TrainConfig,
    settings: BTXSettings,
    *,
    corpus_config: CorpusConfig | None = None,
    show_progress: bool = True,
    log=print,
) -> dict:
    """The whole experiment (see the module docstring); returns what it writes to btx.json.

    Args:
        out: the experiment folder.
        model_config: the dense parent's config.
        train_config: batch, sequence length, optimizer; steps come from settings.
        settings: step budgets and routing.
        corpus_config: a smaller default corpus (tests).
    """
    out = Path(out)
    parent_dir = out / "parent"
    log(f"parent: {settings.parent_steps} steps on all domains")
    parent_train = dataclasses.replace(train_config, steps=settings.parent_steps, warmup_steps=None)
    job = build_job(
        model_config,
        parent_train,
        parent_dir,
        corpus_config=corpus_config,
        show_progress=show_progress,
    )
    job.trainer.train()
    parent = load_trained_model(parent_dir)
    branch_dirs = [out / f"branch-{domain}" for domain in settings.domains]
    branch_train = dataclasses.replace(parent_train, steps=settings.branch_steps, warmup_steps=None)
    for domain, branch_dir in zip(settings.domains, branch_dirs):
        log(f"branch {domain}: {settings.branch_steps} steps")
        domain_data = domain_run_data(parent_dir, branch_dir, domain, corpus_config)
        source = f"default corpus, {domain} documents"
        start_run(parent, branch_train, branch_dir, prepared=domain_data, data_source=source,
                  show_progress=show_progress).train()  # fmt: skip
    log(f"merge; stage 1 (routers) {settings.router_steps} steps, stage 2 {settings.joint_steps}")
    mix_dir = merge_runs(
        branch_dirs, parent_dir, out / "mix", router_steps=settings.router_steps,
        joint_steps=settings.joint_steps, top_k=settings.top_k, router=settings.router,
        show_progress=show_progress,
    )  # fmt: skip
    log(f"baseline: the parent, {settings.extra_steps} more steps on all domains")
    derived_run(
        parent_dir,
        out / "baseline",
        parent,
        steps=settings.extra_steps,
        show_progress=show_progress,
    )
    runs = {"parent": parent_dir}
    runs |= {f"branch {d}": b for d, b in zip(settings.domains, branch_dirs)}
    if (out / "mix" / "stage1").exists() and mix_dir.name == "stage2":
        runs["BTX stage 1"] = out / "mix" / "stage1"
    runs["BTX"] = mix_dir
    runs[f"parent +{settings.extra_steps}"] = out / "baseline"
    result = evaluate_runs(runs, parent_dir)
    result["settings"] = dataclasses.asdict(settings)
    result["experts"] = list(settings.domains)  # expert k is branch k's FFN
    (out / "btx.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


def evaluate_runs(runs: dict[str, Path], union_run: Path) -> dict:
    """Per-domain validation losses of each run on union_run's validation split.

    Returns {"losses": {name: {domain: loss}}, "tokens": {domain: count},
    "routing": {name: [per MoE layer: G x E counts]}, "domains": [...]}.
    """
    _, train_config, _ = run_configs(union_run)
    validation = prepare_run_data(union_run).validation
    result: dict = {"losses": {}, "routing": {}}
    for name, run in runs.items():
        evaluation = evaluate_by_domain(
            load_trained_model(run), validation,
            batch_size=train_config.batch_size, seq_len=train_config.seq_len,
        )  # fmt: skip
        result["losses"][name] = evaluation.losses
        result["tokens"] = evaluation.tokens
        if evaluation.routing is not None:
            result["routing"][name] = [m.tolist() for m in evaluation.routing]
    result["domains"] = [d for d in result["tokens"] if d != "all"]
    return result


def format_btx(result: dict) -> str:
    """The loss table (one row per model, one column per domain and "all") and, for the
    final MoE, each layer's routing matrix: the share (%) of a domain's tokens that use each
    expert (a token uses top_k experts, so a row sums to top_k x 100)."""
    domains = result["domains"]
    columns = domains + ["all"]
    width = max(len(name) for name in result["losses"]) + 2
    lines = [
        "validation loss (nats/token) by domain",
        " " * width + "".join(f"{c[:12]:>13}" for c in columns),
    ]
    for name, losses in result["losses"].items():
        lines.append(f"{name:<{width}}" + "".join(f"{losses[c]:13.3f}" for c in columns))
    for name, layers in result["routing"].items():
        if name != "BTX":
            continue
        for layer, counts in enumerate(layers):
            tokens_G1 = np.array([[result["tokens"][d]] for d in domains], dtype=np.float64)
            share_GE = 100 * np.asarray(counts, dtype=np.float64) / np.maximum(tokens_G1, 1)
            experts = result.get("experts") or [f"e{e}" for e in range(len(share_GE[0]))]
            lines.append(f"\n{name} layer {layer}: % of each domain's tokens that use each expert")
            lines.append(" " * 14 + "".join(f"{e[:12]:>13}" for e in experts))
            for domain, row in zip(domains, share_GE):
                lines.append(f"{domain[:12]:<14}" + "".join(f"{v:13.1f}" for v in row))
    return "\n".join(lines)
