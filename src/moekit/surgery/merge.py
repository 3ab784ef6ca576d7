"""Branch-Train-MiX (Sukhbaatar et al. 2024): dense domain models merged into one MoE.

# K domain models = E experts, D model, F hidden, H = 2F for gated activations

K copies of one parent dense model are trained, each on one domain. In the merged model
layer i's expert k is domain model k's FFN of layer i; every other weight (embeddings,
attention, norms, the head) is the mean of the K models' (the paper's choice: the models
share a parent, so their non-FFN weights are close); the routers are new. Training then
goes in two stages: the routers alone with everything else frozen (TrainConfig.trainable
= ROUTERS_ONLY), then everything (`moekit.surgery.btx.merge_runs` runs both).
"""

from __future__ import annotations

import torch

from ..models import ModelConfig, Transformer
from .upcycle import seeded_model, upcycle_config


def merged_config(dense: ModelConfig, num_experts: int, **moe_options) -> ModelConfig:
    """The MoE config of K merged dense models: every layer MoE, experts as wide as the FFN.

    Args:
        dense: the domain models' (shared) dense config.
        num_experts: K, the number of domain models.
        moe_options: top_k, router and any other MoEConfig field.
    """
    return upcycle_config(dense, num_experts=num_experts, **moe_options)


@torch.no_grad()
def merge_dense_models(models: list[Transformer], *, seed: int = 0, **moe_options) -> Transformer:
    """One MoE whose layer-i experts are the models' layer-i FFNs; other weights averaged.

    Args:
        models: K >= 2 dense Transformers with equal configs, e.g. one per domain.
        seed: seeds the routers' init (the model's usual small random init).
        moe_options: top_k (default 2), router (default softmax_topk), ... (MoEConfig).
    Returns:
        The merged MoE Transformer (train mode); expert k comes from models[k].
    """
    if len(models) < 2:
        raise ValueError(f"merging needs at least 2 models, got {len(models)}")
    dense = models[0].config
    for i, model in enumerate(models[1:], start=1):
        if model.config != dense:
            raise ValueError(
                f"model {i}'s config differs from model 0's; merged models must share one"
            )
    config = merged_config(dense, len(models), **moe_options)
    parameter = next(models[0].parameters())
    merged = seeded_model(config, seed).to(device=parameter.device, dtype=parameter.dtype)
    states = [model.state_dict() for model in models]
    state = merged.state_dict()
    for layer in range(dense.num_layers):
        prefix = f"layers.{layer}.ffn."
        # nn.Linear weights (out, in) become grouped-expert weights (E, in, out).
        ups = [s.pop(prefix + "up.weight").t() for s in states]
        downs = [s.pop(prefix + "down.weight").t() for s in states]
        state[prefix + "experts.w_up"] = torch.stack(ups).contiguous()
        state[prefix + "experts.w_down"] = torch.stack(downs).contiguous()
    for key in states[0]:
        state[key] = torch.stack([s[key].float() for s in states]).mean(dim=0).to(state[key].dtype)
    merged.load_state_dict(state, strict=True)
    return merged


# TrainConfig.trainable for stage 1: only the routers train, the experts and the rest stay.
ROUTERS_ONLY = "*.router.*"
