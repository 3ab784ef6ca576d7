"""Models built from MoE layers: the decoder-only language model and its presets; the
classic, hierarchical and multi-gate mixtures; the vision MoE."""

from . import presets
from .accounting import (
    ParamCount,
    active_expert_fraction,
    count_parameters,
    kv_cache_bytes_per_token,
    meta_model,
)
from .classic import (
    DenseClassifier,
    HierarchicalClassifier,
    HierarchicalMoE,
    ModuleMoE,
    MoEClassifier,
    TaskOutput,
)
from .kv_cache import KVCache
from .mmoe import MMoE, SharedBottom
from .presets import PRESETS, dense_twin
from .transformer import ModelConfig, ModelOutput, Transformer
from .vit import ViTConfig, ViTMoE

__all__ = [
    "PRESETS",
    "DenseClassifier",
    "HierarchicalClassifier",
    "HierarchicalMoE",
    "KVCache",
    "MMoE",
    "MoEClassifier",
    "ModelConfig",
    "ModelOutput",
    "ModuleMoE",
    "ParamCount",
    "SharedBottom",
    "TaskOutput",
    "Transformer",
    "ViTConfig",
    "ViTMoE",
    "active_expert_fraction",
    "count_parameters",
    "dense_twin",
    "kv_cache_bytes_per_token",
    "meta_model",
    "presets",
]
