"""Supervised fine-tuning of a moekit run or a Hugging Face folder, through the Trainer.

A fine-tuning run directory is a training run (config.json, metrics.jsonl, routing.jsonl,
checkpoint/, resumable) plus:
    tokenizer.json, tokenizer_config.json   the tokenizer and its chat template, as
                                            transformers keeps them
    hf/        the model as a Hugging Face folder (the base, for LoRA), with the tokenizer
    adapter/   LoRA only: the adapters in PEFT's format, for hf/
    merged/    LoRA only: hf/ with the adapters folded into the weights
Before the first step, the exports are tried on the model to train (its Hugging Face
config, and with adapters their PEFT names): one the base's settings cannot express stops
the run there, naming why, unless it was asked for none (export=False, --no-export).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import Tokenizer
from ..data.tokenizer import TOKENIZER_FILE, check_vocabulary, load_tokenizer_arg, run_tokenizer
from ..interop import hf_config, load_hf, save_hf
from ..interop.convert import GENERATION_CONFIG_FILE, hf_tokenizer_files
from ..interop.peft import peft_tensors, save_peft
from ..models import ModelConfig, Transformer
from ..models.lora import LoRAConfig, add_lora, merge_lora, remove_lora
from ..train import TrainConfig, TrainResult, load_trained_model
from ..train.builder import build_job
from ..train.overrides import apply_overrides, parse_setting
from ..train.rundir import checkpoint_dir, read_run_config
from .chat import (
    DEFAULT_TEMPLATE,
    ChatTemplate,
    Conversation,
    read_conversations,
    tokenizer_config,
)
from .data import InstructionData, encode_all

TOKENIZER_CONFIG = "tokenizer_config.json"
# Fine-tuning budgets, not pretraining ones (TrainConfig's defaults): fewer, smaller steps.
TRAIN_DEFAULTS = {
    "steps": 100,
    "batch_size": 16,
    "seq_len": 256,
    "lr": 3e-4,
    "weight_decay": 0.0,
    "eval_every": 25,
    "eval_batches": 4,
    "checkpoint_every": 50,
}
LORA_LR = 1e-3  # the default learning rate with adapters (only the factors train)


@dataclass(kw_only=True)
class FinetuneConfig:
    """What fine-tuning changes beyond TrainConfig.

    train_router: False freezes the routers' weights (full fine-tuning; with adapters the
        router trains only through lora.targets "router").
    aux_losses: False sets the MoE layers' balance, z, importance and load loss
        coefficients to 0; True keeps the base's.
    eval_fraction: the share of --data held out for the validation loss (at least one).
    template: a file holding a Jinja chat template; None uses DEFAULT_TEMPLATE.
    """

    train_router: bool = True
    aux_losses: bool = True
    eval_fraction: float = 0.05
    template: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"finetune.eval_fraction ({self.eval_fraction}) must be in (0, 1)")


@dataclass
class FinetuneResult:
    """The TrainResult, the counts of examples, and what the exports wrote or skipped."""

    train: TrainResult
    num_train: int
    num_validation: int
    num_truncated: int
    exported: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def load_base(
    path: str | Path, tokenizer: str | Path | None = None
) -> tuple[Transformer, Tokenizer]:
    """A fine-tuning base and its tokenizer: a moekit run or a Hugging Face folder.

    Args:
        path: the base.
        tokenizer: a tokenizer.json or a folder holding one, instead of the base's own
            (see data.tokenizer.run_tokenizer).
    Raises:
        ValueError: naming the path and why it cannot be loaded (a converted run without
            a tokenizer and no `tokenizer` among them, before the weights are read).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        hint = " (a comparison: pick BASE/moe or BASE/dense)" if (path / "moe").is_dir() else ""
        raise ValueError(f"cannot load base {str(path)!r}: no config.json{hint}")
    try:
        saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if "format" in saved and "model" in saved:
            base_tokenizer = run_tokenizer(path, tokenizer)
            model = load_trained_model(path)
        else:
            model = load_hf(path)
            base_tokenizer = load_tokenizer_arg(tokenizer) if tokenizer else Tokenizer.load(path)
            check_vocabulary(base_tokenizer, model.config.vocab_size, str(tokenizer or path))
    except (ValueError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot load base {str(path)!r}: {error}") from None
    return model, base_tokenizer


def split_overrides(overrides: dict[str, str]) -> tuple[dict, LoRAConfig, FinetuneConfig]:
    """The model.*/train.* overrides, and the LoRAConfig and FinetuneConfig of the rest."""
    rest, sections = {}, {"lora": {}, "finetune": {}}
    for key, raw in overrides.items():
        section, _, name = key.partition(".")
        if section in sections:
            cls = LoRAConfig if section == "lora" else FinetuneConfig
            sections[section][name] = parse_setting(cls, name, raw, key)
        else:
            rest[key] = raw
    lora = LoRAConfig(**sections["lora"])
    idle = sorted(f"lora.{name}" for name in sections["lora"] if name != "rank")
    if idle and not lora.rank:
        message = f"{', '.join(idle)}: no effect without lora.rank (full fine-tuning)"
        warnings.warn(message, stacklevel=2)
    return rest, lora, FinetuneConfig(**sections["finetune"])


def prepare_model(
    base: Transformer, overrides: dict, lora: LoRAConfig, finetune: FinetuneConfig
) -> tuple[Transformer, TrainConfig]:
    """The model to train (base weights, overridden settings, adapters) and its TrainConfig.

    Raises:
        ValueError: an override that changes the weights' shapes; conflicting settings.
    """
    defaults = TRAIN_DEFAULTS | ({"lr": LORA_LR} if lora.rank else {})
    defaults["seq_len"] = min(defaults["seq_len"], base.config.max_seq_len)
    model_config, train_config = apply_overrides(
        base.config, overrides, label="the base", train_defaults=defaults
    )
    if train_config.seq_len > model_config.max_seq_len:
        raise ValueError(
            f"train.seq_len ({train_config.seq_len}) exceeds the base's max_seq_len "
            f"({model_config.max_seq_len})"
        )
    if not finetune.aux_losses and model_config.moe is not None:
        zero = dict.fromkeys(
            ("balance_loss_coef", "z_loss_coef", "importance_loss_coef", "load_loss_coef"), 0.0
        )
        model_config = dataclasses.replace(
            model_config, moe=dataclasses.replace(model_config.moe, **zero)
        )
    model = _rebuilt(base, model_config)
    if lora.rank:
        if not finetune.train_router and "router" in lora.target_list:
            raise ValueError("finetune.train_router false contradicts lora.targets 'router'")
        torch.manual_seed(train_config.seed)  # the adapters' initialisation
        add_lora(model, lora)
    elif not finetune.train_router:
        for name, param in model.named_parameters():
            if ".router." in name:
                param.requires_grad_(False)
    return model.train(), train_config  # a loaded base comes in eval mode


def _rebuilt(base: Transformer, config: ModelConfig) -> Transformer:
    if config == base.config:
        return base
    model = Transformer(config)
    try:
        model.load_state_dict(base.state_dict(), strict=True)
    except RuntimeError as error:
        raise ValueError(f"the model overrides do not fit the base's weights: {error}") from None
    return model


def finetune(
    base_path: str | Path,
    data_path: str | Path,
    out: str | Path,
    overrides: dict[str, str],
    *,
    resume: bool = False,
    show_progress: bool = True,
    stop_at: int | None = None,
    tokenizer: str | Path | None = None,
    export: bool = True,
) -> FinetuneResult:
    """`moekit finetune BASE --data FILE --out DIR`: fine-tune, then export.

    Args:
        base_path: a moekit run or a Hugging Face folder (with tokenizer.json).
        data_path: jsonl of messages or prompt/response lines (chat.py).
        out: the new run directory (or the one to resume).
        overrides: dotted overrides (model.*, train.*, lora.*, finetune.*).
        resume: continue the run in out with the settings saved there.
        stop_at: stop (with a checkpoint, no export) after this many steps.
        tokenizer: a tokenizer.json or a folder holding one, instead of the base's own
            (load_base); it is saved into out like any base's.
        export: False skips the Hugging Face export (and its check before training).
    """
    out = Path(out)
    if resume:
        saved = read_run_config(out)["data"]
        if not isinstance(saved, dict) or "base" not in saved:
            raise ValueError(f"--resume: {str(out)!r} is not a fine-tuning run")
        base_path, data_path, overrides = saved["base"], saved["data"], saved["overrides"]
        tokenizer = saved.get("tokenizer")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a run; resume it" if checkpoint_dir(out) is not None else "files"
        raise ValueError(f"--out {str(out)!r} already holds {what} or choose a new folder")
    rest, lora, config = split_overrides(overrides)
    base, base_tokenizer = load_base(base_path, tokenizer)
    conversations = read_conversations(data_path)
    train, validation = split_examples(conversations, config.eval_fraction)
    source = {"base": str(base_path), "data": str(data_path), "overrides": overrides}
    if tokenizer is not None:
        source["tokenizer"] = str(tokenizer)
    return run_finetune(
        base,
        base_tokenizer,
        train,
        validation,
        out,
        rest,
        lora,
        config,
        source,
        resume=resume,
        show_progress=show_progress,
        stop_at=stop_at,
        export=export,
    )


def split_examples(
    conversations: list[Conversation], eval_fraction: float
) -> tuple[list[Conversation], list[Conversation]]:
    """A fixed, seeded split: eval_fraction of the examples (at least one) for validation."""
    if len(conversations) < 2:
        raise ValueError("--data needs at least two examples (one is held out for validation)")
    order = list(range(len(conversations)))
    random.Random(0).shuffle(order)
    num_val = max(1, round(eval_fraction * len(conversations)))
    held = set(order[:num_val])
    return (
        [c for i, c in enumerate(conversations) if i not in held],
        [c for i, c in enumerate(conversations) if i in held],
    )


def run_finetune(
    base: Transformer,
    tokenizer: Tokenizer,
    train: list[Conversation],
    validation: list[Conversation],
    out: Path,
    overrides: dict,
    lora: LoRAConfig,
    config: FinetuneConfig,
    source: dict,
    *,
    resume: bool = False,
    show_progress: bool = True,
    stop_at: int | None = None,
    export: bool = True,
) -> FinetuneResult:
    """Fine-tune base on the conversations in run directory out; see finetune()."""
    template_text = DEFAULT_TEMPLATE
    if config.template is not None:
        try:
            template_text = Path(config.template).read_text(encoding="utf-8")
        except OSError as error:
            raise ValueError(f"finetune.template: {error}") from None
    template = ChatTemplate(template_text, tokenizer)
    model, train_config = prepare_model(base, overrides, lora, config)
    if export:
        check_export(model, lora)
    max_tokens = train_config.seq_len + 1
    train_examples, truncated = encode_all(train, template, max_tokens)
    val_examples, _ = encode_all(validation, template, max_tokens)
    if not train_examples or not val_examples:
        raise ValueError(
            f"no example keeps an assistant token within train.seq_len ({train_config.seq_len})"
        )
    data = InstructionData(tokenizer, train_examples, val_examples)
    source = source | {"lora": dataclasses.asdict(lora), "finetune": dataclasses.asdict(config)}
    trainer = build_job(
        model,
        train_config,
        out,
        prepared=data,
        data_source=source,
        resume=resume,
        show_progress=show_progress,
    ).trainer
    tokenizer.save(out)
    (out / TOKENIZER_CONFIG).write_text(
        json.dumps(tokenizer_config(template_text, tokenizer), indent=2), encoding="utf-8"
    )
    train_result = trainer.train(stop_at=stop_at)
    result = FinetuneResult(train_result, len(train_examples), len(val_examples), truncated)
    if export and train_result.steps == train_config.steps:
        export_run(trainer.model, lora, out, result)
    return result


def check_export(model: Transformer, lora: LoRAConfig) -> None:
    """Raise before training when export_run could not write the model (or its adapters).

    Raises:
        ValueError: the export is impossible, why, and how to fine-tune without it.
    """
    try:
        hf_config(model.config)
        if lora.rank:
            peft_tensors(model)
    except ValueError as error:
        raise ValueError(
            f"the Hugging Face export after fine-tuning is impossible: {error}; add "
            "--no-export to fine-tune without it"
        ) from None


def export_run(model: Transformer, lora: LoRAConfig, out: Path, result: FinetuneResult) -> None:
    """Write out/hf (and, with adapters, out/adapter and out/merged); see the module doc."""
    files = {
        name: (out / name).read_text(encoding="utf-8")
        for name in (TOKENIZER_FILE, TOKENIZER_CONFIG)
    }
    # the tokenizer's eos/bos/pad ids in config.json and generation_config.json
    ids, _, generation = hf_tokenizer_files(Tokenizer.load(out), model.config.max_seq_len)
    if generation is not None:
        files[GENERATION_CONFIG_FILE] = generation
    plain = remove_lora(model) if lora.rank else model
    for name in ("hf", "adapter", "merged"):
        shutil.rmtree(out / name, ignore_errors=True)  # a resumed run exports again
    try:
        save_hf(plain, out / "hf", config_extra=ids, extra_files=files)
        result.exported.append("hf")
        if lora.rank:
            save_peft(model, out / "adapter", lora, base_model=str(out / "hf"))
            save_hf(merge_lora(model), out / "merged", config_extra=ids, extra_files=files)
            result.exported += ["adapter", "merged"]
    except ValueError as error:
        result.notes.append(f"no Hugging Face export: {error}")
