"""Parameter accounting of the decoder: total and active-per-token counts, counted on the
meta device so that a 671B configuration costs no memory and no time.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..config import MoEConfig
from ..moe import MoE
from ..routing import router_class
from .skip_init import skipped_initialisers
from .transformer import ATTENTION_KINDS, ModelConfig, Transformer


class ParamCount(NamedTuple):
    """Parameter counts: total stored, and active (used) per token."""

    total: int
    active: int


def active_expert_fraction(moe: MoEConfig) -> float:
    """Share of the routed experts' weights one token uses, on average; the router says
    (`Router.active_fraction`): top_k / E for token choice (an upper bound for top_p),
    cf * top_k / E for expert choice, every expert for dense and Soft MoE."""
    return router_class(moe.router).active_fraction(moe)


def meta_model(config: ModelConfig) -> Transformer:
    """The model on the meta device: shapes only, no memory, no initialisers run.

    Skipping torch.nn.init matters for speed alone: there are no values to set, and a
    meta normal_ imports torch._dynamo, which takes seconds.
    """
    with skipped_initialisers(), torch.device("meta"):
        return Transformer(config)


def count_parameters(model_or_config: Transformer | ModelConfig) -> ParamCount:
    """Total and active-per-token parameter counts (tied embeddings counted once).

    Active = every parameter except the routed experts', plus active_expert_fraction of
    the routed experts' weights. Embedding and head count as active. The MTP modules of a
    config with mtp_depth > 0 count like the main model's layers (every training token runs
    them; generation does not). A config is built on
    the meta device, so huge configs cost no memory.
    """
    model = model_or_config
    if isinstance(model, ModelConfig):
        model = meta_model(model)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0.0
    for module in model.modules():
        if isinstance(module, MoE):
            routed = sum(p.numel() for p in module.experts.parameters())
            inactive += routed * (1.0 - active_expert_fraction(module.config))
    return ParamCount(total=total, active=total - round(inactive))


def kv_cache_bytes_per_token(config: ModelConfig, bytes_per_value: int = 2) -> int:
    """Bytes the KV cache holds per token, all layers together (default: bf16 values).

    The attention kind says what it caches (`cache_widths`): G * 2 * Dh values per layer
    for grouped-query attention; kv_lora_rank + qk_rope_head_dim for MLA (models/mla.py).
    """
    heads, key_dim, value_dim = ATTENTION_KINDS[config.attention].cache_widths(config)
    return config.num_layers * heads * (key_dim + value_dim) * bytes_per_value
