"""Surgery on run directories: a new run that starts from given weights.

A new run is an ordinary `moekit train` run directory (config.json, tokenizer, token
streams, metrics) whose step-0 checkpoint holds the weights surgery made and a fresh
optimizer (AdamW moments start at zero: the old moments belong to other parameters, or to
the same ones under another function). `moekit train --resume --out RUN` trains it, from
step 0 of its own warmup and cosine schedule.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..data import CorpusConfig, build_corpus, copy_tokenizer, prepare
from ..models import Transformer
from ..train import (
    TrainConfig,
    Trainer,
    TrainResult,
    load_trained_model,
    prepare_run_data,
    run_configs,
)
from ..train.builder import build_job
from ..train.data import DATA_DIR, TRAIN_FILE, VAL_FILE, RunData, copy_run_data
from ..train.rundir import checkpoint_dir
from .add_experts import add_experts, default_method
from .upcycle import upcycle, upcycle_config


def start_run(
    model: Transformer,
    train_config: TrainConfig,
    run_dir: str | Path,
    *,
    data: str | Path | None = None,
    prepared: RunData | None = None,
    data_source: str | None = None,
    show_progress: bool = True,
) -> Trainer:
    """Write run_dir as a run at step 0 whose weights are model's; returns its Trainer.

    Args:
        model: the starting weights (its config becomes the run's model config).
        train_config: the run's training settings.
        run_dir: a new run directory (holding the data already, or not).
        data: the source of the run's streams, tokenised into run_dir if not there yet.
        prepared: the run's tokenizer and streams, already prepared (instead of data).
        data_source: recorded in config.json (None: data's).
        show_progress: a tqdm bar when the Trainer trains.
    """
    job = build_job(
        model.config,
        train_config,
        run_dir,
        data=data,
        prepared=prepared,
        data_source=data_source,
        init_weights=model,
        show_progress=show_progress,
    )
    job.trainer.save()
    return job.trainer


def derived_run(
    source_run: str | Path,
    run_dir: str | Path,
    model: Transformer,
    *,
    steps: int | None = None,
    train_changes: dict | None = None,
    show_progress: bool = True,
) -> tuple[Trainer, TrainResult | None]:
    """A run on source_run's data and training settings that starts from `model`.

    Args:
        source_run: the run whose tokenizer, streams and TrainConfig are reused.
        run_dir: the new run directory (must not hold a run yet).
        model: the starting weights.
        steps: train this many steps now (None: only write the run, at step 0).
        train_changes: TrainConfig fields to change (lr, batch_size, ...).
        show_progress: a tqdm bar.
    Returns:
        The run's Trainer and, when steps was given, its TrainResult.
    """
    _, train_config, data_source = run_configs(source_run)
    changes = dict(train_changes or {})
    if steps is not None:
        changes["steps"] = steps
    # warmup_steps was derived from the old step budget; derive it again unless given.
    # A new run trains every parameter unless told otherwise (the source may be a stage 1).
    changes.setdefault("warmup_steps", None)
    changes.setdefault("trainable", None)
    train_config = dataclasses.replace(train_config, **changes)
    _claim(run_dir)
    copy_run_data(source_run, run_dir)
    trainer = start_run(model, train_config, run_dir, data=data_source, show_progress=show_progress)
    return trainer, (trainer.train() if steps is not None else None)


def upcycle_run(
    dense_run: str | Path,
    run_dir: str | Path,
    *,
    steps: int | None = None,
    train_changes: dict | None = None,
    seed: int = 0,
    show_progress: bool = True,
    **moe_options,
) -> tuple[Trainer, TrainResult | None]:
    """`moekit upcycle`: run_dir starts from dense_run's model upcycled (see upcycle_config).

    moe_options: num_experts, top_k, router, capacity_factor, moe_every, ... Returns the
    new run's Trainer and, when steps was given, its TrainResult.
    """
    dense = load_trained_model(dense_run)
    model = upcycle(dense, upcycle_config(dense.config, **moe_options), seed=seed)
    return derived_run(
        dense_run,
        run_dir,
        model,
        steps=steps,
        train_changes=train_changes,
        show_progress=show_progress,
    )


def add_experts_run(
    moe_run: str | Path,
    run_dir: str | Path,
    num_new: int,
    *,
    method: str | None = None,
    steps: int | None = None,
    train_changes: dict | None = None,
    moe_changes: dict | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> tuple[Trainer, TrainResult | None]:
    """`moekit add-experts`: run_dir starts from moe_run's model with num_new more experts.

    moe_changes: MoEConfig fields to set on the result that do not change its output at the
    moment of adding (bias_update_rate, balance_loss_coef, z_loss_coef).
    """
    model = load_trained_model(moe_run)
    model = add_experts(model, num_new, method or default_method(model.config), seed=seed)
    if moe_changes:
        unknown = sorted(
            set(moe_changes) - {"bias_update_rate", "balance_loss_coef", "z_loss_coef"}
        )
        if unknown:
            raise ValueError(f"add-experts cannot change {unknown}: they would change the output")
        config = dataclasses.replace(
            model.config, moe=dataclasses.replace(model.config.moe, **moe_changes)
        )
        rebuilt = Transformer(config)
        rebuilt.load_state_dict(model.state_dict(), strict=True)
        model = rebuilt
    return derived_run(
        moe_run,
        run_dir,
        model,
        steps=steps,
        train_changes=train_changes,
        show_progress=show_progress,
    )


def domain_run_data(
    source_run: str | Path, run_dir: str | Path, domain: str, corpus_config: CorpusConfig | None
) -> RunData:
    """run_dir's streams: the default corpus's `domain` documents, in source_run's tokenizer.

    Writes RUN/tokenizer.json (a copy) and RUN/data/{train,val}.bin with that domain's
    train and validation documents, so the run resumes like any other.
    """
    corpus = build_corpus(config=corpus_config)
    if domain not in corpus.domains:
        raise ValueError(f"domain {domain!r} is not in the corpus; it has {corpus.domains}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = copy_tokenizer(source_run, run_dir)
    for documents, name in ((corpus.train, TRAIN_FILE), (corpus.validation, VAL_FILE)):
        prepare([d for d in documents if d.domain == domain], tokenizer, run_dir / DATA_DIR / name)
    return prepare_run_data(run_dir)


def _claim(run_dir: str | Path) -> None:
    if checkpoint_dir(run_dir) is not None:
        raise ValueError(f"{str(run_dir)!r} already holds a trained run; choose another --out")
