"""Sparse upcycling (Komatsuzaki et al. 2022): a trained dense model becomes an MoE.

# E experts, D model, F expert hidden, H = 2F for gated activations (else F)

Every MoE layer's experts start as copies of that layer's dense FFN; everything else
(embeddings, attention, norms, the dense layers that stay dense) is copied unchanged, and
the routers get the model's usual small random init. Because all experts of a layer are the
same function, the MoE output is (sum of the token's combine weights) * FFN(x): the
upcycled model computes exactly the dense model's function whenever those weights sum to
one for every token, and no token is dropped. `upcycle_changes_function` says when not.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..config import MoEConfig
from ..models import ModelConfig, Transformer
from ..routing import router_class

# Routers whose combine weights are a per-token distribution only when renormalised.


def upcycle_config(
    dense: ModelConfig,
    *,
    num_experts: int,
    top_k: int = 2,
    router: str = "softmax_topk",
    moe_every: int = 1,
    first_dense_layers: int = 0,
    **moe_options,
) -> ModelConfig:
    """The MoE config of an upcycled dense config: experts as wide as the dense FFN.

    Args:
        dense: the dense model's config (moe None).
        num_experts, top_k, router: the MoE layers' routing (E, K, router name).
        moe_every, first_dense_layers: which layers become MoE (see ModelConfig).
        moe_options: any other MoEConfig field (capacity_factor, renormalize, ...).
    Returns:
        The ModelConfig with moe set; other fields are the dense config's.
    """
    if dense.moe is not None:
        raise ValueError("upcycling needs a dense model; this config already has MoE layers")
    moe = MoEConfig(
        d_model=dense.d_model,
        d_hidden=dense.d_hidden,
        num_experts=num_experts,
        top_k=top_k,
        router=router,
        activation=dense.activation,
        **moe_options,
    )
    return dataclasses.replace(
        dense, moe=moe, moe_every=moe_every, first_dense_layers=first_dense_layers
    )


def upcycle_changes_function(moe: MoEConfig) -> str | None:
    """Why an upcycled model with this MoE config differs from the dense one, or None.

    Equal (to rounding) when every token's combine weights sum to one and no token is
    dropped: softmax_topk, noisy_topk, top_p and sigmoid_topk with renormalize (sigmoid also
    with routed_scaling 1), and dense, all dropless. noisy_topk stays equal in training too,
    since any choice of identical experts gives the same output.
    """
    reason = router_class(moe.router).weights_not_summing_to_one(moe)
    if reason is not None:
        return reason
    if moe.capacity_factor is not None:
        return "with a capacity_factor, tokens over capacity are dropped"
    if moe.num_shared_experts:
        return "shared experts add to the copied FFN"
    return None


@torch.no_grad()
def upcycle(dense_model: Transformer, moe_config: ModelConfig, seed: int = 0) -> Transformer:
    """A new MoE Transformer whose experts are copies of dense_model's FFNs.

    Args:
        dense_model: the trained dense model.
        moe_config: from upcycle_config (the dense config plus moe settings).
        seed: seeds the routers' random init.
    Returns:
        The upcycled model (train mode), on dense_model's device and dtype.
    """
    _check_compatible(dense_model.config, moe_config)
    moe_model = seeded_model(moe_config, seed)
    parameter = next(dense_model.parameters())
    moe_model.to(device=parameter.device, dtype=parameter.dtype)
    dense_state = dense_model.state_dict()
    state = moe_model.state_dict()
    for layer in moe_config.moe_layers:
        prefix = f"layers.{layer}.ffn."
        state[prefix + "experts.w_up"] = expert_copies(
            dense_state.pop(prefix + "up.weight"), moe_config.moe.num_experts
        )
        state[prefix + "experts.w_down"] = expert_copies(
            dense_state.pop(prefix + "down.weight"), moe_config.moe.num_experts
        )
    # Everything else (router parameters excepted) has the same name and shape.
    for key, tensor in dense_state.items():
        state[key] = tensor
    moe_model.load_state_dict(state, strict=True)
    return moe_model


def seeded_model(config: ModelConfig, seed: int) -> Transformer:
    """A freshly initialised Transformer from `seed`, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Transformer(config)


def expert_copies(linear_weight: Tensor, num_experts: int) -> Tensor:
    """Stack E copies of an nn.Linear weight (out, in) as grouped-expert weights (E, in, out).

    The dense MLP's up.weight (H, D) becomes w_up (E, D, H); down.weight (D, F) becomes
    w_down (E, F, D); the gate/up halves of a GLU keep their order.
    """
    return linear_weight.t().unsqueeze(0).repeat(num_experts, 1, 1).contiguous()


def _check_compatible(dense: ModelConfig, moe_config: ModelConfig) -> None:
    """moe_config must be the dense config plus MoE settings with experts as wide as its FFN."""
    moe = moe_config.moe
    if dense.moe is not None or moe is None:
        raise ValueError("upcycle needs a dense model and an MoE config")
    if (moe.d_hidden, moe.activation) != (dense.d_hidden, dense.activation):
        raise ValueError(
            f"experts ({moe.d_hidden}, {moe.activation}) must match the dense FFN "
            f"({dense.d_hidden}, {dense.activation}); use upcycle_config"
        )
    rest = dataclasses.replace(moe_config, moe=None, moe_every=1, first_dense_layers=0)
    if rest != dense:
        raise ValueError("moe_config's non-MoE settings differ from the dense model's config")
