"""Models built from MoE layers: the decoder-only language model and its presets."""

from . import presets
from .presets import PRESETS, dense_twin
from .transformer import (
    ModelConfig,
    ModelOutput,
    ParamCount,
    Transformer,
    active_expert_fraction,
    count_parameters,
)

__all__ = [
    "PRESETS",
    "ModelConfig",
    "ModelOutput",
    "ParamCount",
    "Transformer",
    "active_expert_fraction",
    "count_parameters",
    "dense_twin",
    "presets",
]
