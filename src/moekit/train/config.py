"""TrainConfig, and the run's config.json: model and training settings as plain JSON."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..config import MoEConfig
from ..models import ModelConfig

DTYPES = ("float32", "bfloat16")
COMPILE_SETTINGS = ("auto", "true", "false")


@dataclass(kw_only=True)
class TrainConfig:
    """How to train: budget, batches, optimizer, schedule, evaluation and checkpoints.

    The defaults are the `moekit train` comparison on 2 CPU cores (docs/train.md), chosen
    on the validation split (docs/results.md): 225 steps of 48 x 128 tokens keep the whole
    job near 5 minutes; 48 rows per step rather than 16 give each of the 16 experts about
    770 rows per matmul. lr 3e-3 was the MoE's best of 2e-3, 2.5e-3, 3e-3 and 4e-3, and
    dense_lr 2e-3 the dense twin's best of 1e-3, 1.5e-3, 2e-3 and 3e-3.
    """

    steps: int = 225
    batch_size: int = 48  # rows per optimizer step, over all processes
    seq_len: int = 128
    seed: int = 0
    # Micro-batches per optimizer step (train/accumulation.py): each process's rows of the
    # batch are split into grad_accum equal parts, one forward and backward each, and the
    # gradients summed: less memory, the same step (docs/train.md, "Gradient accumulation").
    grad_accum: int = 1

    # AdamW (Loshchilov & Hutter 2019); decay on matrices only, not norms or biases.
    lr: float = 3e-3
    # The dense twin's learning rate in a comparison (`moekit train`); None = lr. Each of
    # the two models trains at the best learning rate tried for it on the validation split
    # (docs/results.md, "The recipe search"): the MoE's router spreads the gradient over
    # experts that each see a fraction of the tokens, and the MoE was best at 3e-3, while
    # the dense twin was best at 2e-3 (at 3e-3 its loss spikes early).
    dense_lr: float | None = 2e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    # Linear warmup, then cosine decay to min_lr_ratio * lr at the last step.
    # None = 5% of the steps.
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1

    # bfloat16 autocast for the matmuls (routers stay fp32 inside the layer); float32
    # is the default because CPUs without bf16 instructions run bf16 matmuls slowly.
    dtype: str = "float32"
    # torch.compile each transformer block for training (train/compiling.py): "true",
    # "false", or "auto" = compile when the job is long enough to pay the compile back,
    # judged on the first eager steps' time (the decision is printed). true/false as
    # booleans are accepted too (run configs written before "auto").
    compile: str = "auto"
    # Also write TensorBoard event files (RUN/tensorboard/; needs moekit[tensorboard]).
    tensorboard: bool = False

    # Validation loss on eval_batches batches of windows spread evenly over the validation
    # split (the same batches every time, so curves compare), every eval_every steps and at
    # the end.
    eval_every: int = 25
    eval_batches: int = 8
    checkpoint_every: int = 100

    # Comma-separated fnmatch patterns of the parameter names to train, e.g. "*.router.*"
    # (Branch-Train-MiX stage 1); the others stay frozen. None trains every parameter.
    trainable: str | None = None
    # A step whose loss or gradient is not finite: "error" stops the run before the
    # optimizer step (the last checkpoint stays as it was), "skip" drops the batch and
    # counts it (train/health.py).
    on_nonfinite: str = "error"

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "seq_len",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})"
            )
        if self.warmup_steps is None:
            self.warmup_steps = math.ceil(0.05 * self.steps)
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be in [0, steps ({self.steps})]"
            )
        if not self.lr > 0:
            raise ValueError(f"lr ({self.lr}) must be > 0")
        if self.dense_lr is not None and not self.dense_lr > 0:
            raise ValueError(f"dense_lr ({self.dense_lr}) must be > 0 or None")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio ({self.min_lr_ratio}) must be in [0, 1]")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(
                f"weight_decay ({self.weight_decay}) and grad_clip ({self.grad_clip}) must be >= 0"
            )
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 ({self.beta1}) and beta2 ({self.beta2}) must be in [0, 1)")
        if self.trainable is not None and not trainable_patterns(self.trainable):
            raise ValueError(f"trainable ({self.trainable!r}) names no parameter pattern")
        if isinstance(self.compile, bool):
            self.compile = "true" if self.compile else "false"
        if self.compile not in COMPILE_SETTINGS:
            raise ValueError(
                f"compile ({self.compile!r}) must be one of {', '.join(COMPILE_SETTINGS)}"
            )
        if self.on_nonfinite not in ("error", "skip"):
            raise ValueError(f"on_nonfinite ({self.on_nonfinite!r}) must be one of error, skip")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")


def for_dense_twin(config: TrainConfig) -> TrainConfig:
    """The settings a comparison's dense twin trains with: config at its dense_lr."""
    if config.dense_lr is None or config.dense_lr == config.lr:
        return config
    return dataclasses.replace(config, lr=config.dense_lr)


def trainable_patterns(trainable: str) -> list[str]:
    """The fnmatch patterns in a TrainConfig.trainable string."""
    return [pattern.strip() for pattern in trainable.split(",") if pattern.strip()]


def model_config_to_dict(config: ModelConfig) -> dict:
    """A ModelConfig as plain JSON-ready data (the MoE settings nested under "moe")."""
    return dataclasses.asdict(config)


def model_config_from_dict(data: dict) -> ModelConfig:
    """The inverse of model_config_to_dict; unknown keys raise ValueError naming them."""
    data = dict(data)
    moe = data.pop("moe", None)
    if moe is not None:
        moe = _build(MoEConfig, moe, "model.moe")
    return _build(ModelConfig, data | {"moe": moe}, "model")


def train_config_from_dict(data: dict) -> TrainConfig:
    """A TrainConfig from the "train" section of config.json."""
    return _build(TrainConfig, data, "train")


def _build(cls, data: dict, section: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {section} settings {unknown}; this moekit knows {sorted(known)}")
    return cls(**data)
