"""`moekit finetune BASE --routing.replay TRACE`: fine-tune on a routing trace's sequences
(an inference engine's samples) with every token sent to the experts the trace records.

The base, the overrides (model.*, train.*, lora.*, finetune.*) and the exports are those
of any fine-tuning (job.py); the data is the trace's sequences, every next token a target
(moekit.traces.training.ReplayData), and each training forward replays the trace's
experts for its rows (mode "ids": weights from the router, which trains through them;
"ids+weights": both from the trace). Eager, as any replayed training.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..traces import load_trace
from ..traces.training import Replay, ReplayData
from ..train.builder import build_job
from ..train.rundir import checkpoint_dir, read_run_config
from .chat import DEFAULT_TEMPLATE, tokenizer_config
from .job import (
    TOKENIZER_CONFIG,
    FinetuneResult,
    check_export,
    export_run,
    load_base,
    prepare_model,
    split_overrides,
)


def replay_source(out: str | Path) -> dict | None:
    """The saved source of a replayed fine-tuning run in out, or None."""
    if not (Path(out) / "config.json").is_file():
        return None
    data = read_run_config(out).get("data")
    return data if isinstance(data, dict) and "routing_replay" in data else None


def finetune_replayed(
    base_path: str | Path | None,
    trace_path: str | Path | None,
    out: str | Path,
    overrides: dict[str, str],
    mode: str = "ids",
    *,
    resume: bool = False,
    show_progress: bool = True,
    stop_at: int | None = None,
    tokenizer: str | Path | None = None,
    export: bool = True,
) -> FinetuneResult:
    """Fine-tune base on the trace's sequences with its routing replayed, then export
    (tokenizer and export as in job.finetune)."""
    out = Path(out)
    if resume:
        saved = replay_source(out)
        if saved is None:
            raise ValueError(f"--resume: {str(out)!r} is not a routing-replay fine-tuning run")
        base_path, trace_path = saved["base"], saved["routing_replay"]
        overrides, mode = saved["overrides"], saved["mode"]
        tokenizer = saved.get("tokenizer")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a run; resume it" if checkpoint_dir(out) is not None else "files"
        raise ValueError(f"--out {str(out)!r} already holds {what} or choose a new folder")
    if overrides.get("train.compile", "false") not in ("false", "auto"):
        raise ValueError("--routing.replay runs eager; drop --train.compile")
    overrides = overrides | {"train.compile": "false"}
    rest, lora, config = split_overrides(overrides)
    base, base_tokenizer = load_base(base_path, tokenizer)
    model, train_config = prepare_model(base, rest, lora, config)
    if export:
        check_export(model, lora)
    trace = load_trace(trace_path)
    replay = Replay(trace, mode)
    source = {
        "base": str(base_path),
        "routing_replay": str(trace_path),
        "mode": mode,
        "overrides": overrides,
        "lora": dataclasses.asdict(lora),
        "finetune": dataclasses.asdict(config),
    } | ({"tokenizer": str(tokenizer)} if tokenizer is not None else {})
    trainer = build_job(
        model, train_config, out, prepared=ReplayData(trace), data_source=source,
        resume=resume, show_progress=show_progress, replay=replay,
    ).trainer  # fmt: skip
    base_tokenizer.save(out)
    (out / TOKENIZER_CONFIG).write_text(
        json.dumps(tokenizer_config(DEFAULT_TEMPLATE, base_tokenizer), indent=2),
        encoding="utf-8",
    )
    train_result = trainer.train(stop_at=stop_at)
    lengths = (trace.offsets[1:] - trace.offsets[:-1]).tolist()
    truncated = sum(n > train_config.seq_len + 1 for n in lengths)
    evaluated = min(trace.num_sequences, train_config.eval_batches * train_config.batch_size)
    result = FinetuneResult(train_result, trace.num_sequences, evaluated, truncated)
    if export and train_result.steps == train_config.steps:
        export_run(trainer.model, lora, out, result)
    return result
