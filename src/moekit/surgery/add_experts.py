"""Add experts to a trained MoE so that, at the moment of adding, its output is unchanged.

# E experts before, N new experts, P parts per expert, D model, F expert hidden

A new expert needs a router row, and a row alone cannot keep it out of the top-k: its
logit x . w is 0 at x = 0 and changes sign with x, so for some tokens it beats an old
expert. Nor can a row keep a softmax's normaliser unchanged (that needs exp(logit) = 0).
Exactness needs either a per-expert score offset or new experts that split old ones:

- "offset" (sigmoid_topk): new experts are copies of old ones (weights and router row),
  and their selection bias (DeepSeek-V3's balancing bias, used to choose experts but not
  to weight them) starts 1 + OFFSET_MARGIN below the lowest old bias. A sigmoid score lies
  in [0, 1], so a new expert never outranks an old one, and the weights (each chosen
  expert's own score) do not depend on the other experts: the output is bit-identical.
  Training then uses the new experts because the aux-loss-free update raises the bias of
  every expert with less than the mean load by bias_update_rate per step, so after about
  1 / bias_update_rate steps they start taking tokens from the experts they copy.
- "split" (softmax_topk, noisy_topk, dense, sigmoid_topk): every expert's hidden units are
  split into P parts, each a new expert of width F / P with a copy of the router row, and
  top_k grows P-fold. A token picks all P parts of each expert it picked before (they tie),
  and the parts' outputs add up to the old expert's. Softmax gives each part 1/P of the
  old probability, so w_down is scaled by P (likewise for renormalised sigmoid weights).
  Parameters and FLOPs stay the same (DeepSeekMoE's fine-grained segmentation): the model
  gains routable experts, not capacity; training separates the parts' router rows.
- "grow" (the same routers): "split", then each part is widened back to F hidden units
  with new units whose w_down rows start at zero (so they add exactly 0, and their output
  weights get a gradient from the first step, like LoRA's zero-initialised B). Parameters
  and the active FFN compute per token grow P-fold.

Unsupported: switch (top-1 by definition, so no room for a second part and an unnormalised
softmax weight), top_p (the cumulative-mass cut can fall between two parts), expert_choice
and soft (an expert's tokens depend on every expert's scores), group-limited sigmoid
routing (new experts change the groups' scores), and a capacity_factor (capacity per expert
depends on E, so drops would change).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..models import ModelConfig, Transformer
from ..routing import router_class

METHODS = ("offset", "split", "grow")
# The new experts' bias is this much further below the lowest old bias than the width of
# the sigmoid's range (1), so rounding can never make a tie.
OFFSET_MARGIN = 0.01


def default_method(config: ModelConfig) -> str:
    """ "offset" for sigmoid_topk (new capacity at the same top_k), else "split"."""
    biased = config.moe is not None and router_class(config.moe.router).has_selection_bias
    return "offset" if biased else "split"


def add_experts_unsupported(config: ModelConfig, method: str) -> str | None:
    """Why `method` cannot add experts to this config exactly, or None when it can."""
    moe = config.moe
    if method not in METHODS:
        return f"unknown method {method!r}; choose one of {', '.join(METHODS)}"
    if moe is None:
        return "the model is dense; upcycle it first"
    if moe.capacity_factor is not None:
        return "capacity_factor is set: capacity per expert depends on E, so drops would change"
    if moe.expert_bias or moe.router_bias:
        return "biased experts or router (expert_bias, router_bias) are not carried over yet"
    router = router_class(moe.router)
    if method == "offset" and not router.has_selection_bias:
        return (
            f"the {moe.router} router has no per-expert score offset to keep new experts out "
            "of the top-k; use method 'split', or a sigmoid_topk model"
        )
    if method in ("split", "grow") and not router.splits_exactly:
        return (
            f"the {moe.router} router cannot split experts exactly (see moekit.surgery.add_experts)"
        )
    if moe.num_groups > 1:
        return "group-limited routing (num_groups > 1): new experts change the group scores"
    return None


def added_experts_config(config: ModelConfig, num_new: int, method: str) -> ModelConfig:
    """The config after adding num_new experts to every MoE layer with `method`.

    offset: E + N experts, same top_k and width. split: N must be a multiple of E;
    P = 1 + N / E parts per expert, top_k * P, d_hidden / P. grow: as split, d_hidden kept.
    """
    reason = add_experts_unsupported(config, method)
    if reason is not None:
        raise ValueError(reason)
    moe = config.moe
    if not isinstance(num_new, int) or num_new < 1:
        raise ValueError(f"num_new ({num_new!r}) must be a positive integer")
    if method == "offset":
        new_moe = dataclasses.replace(moe, num_experts=moe.num_experts + num_new)
    else:
        parts = _parts(config, num_new, method)
        new_moe = dataclasses.replace(
            moe,
            num_experts=moe.num_experts * parts,
            top_k=moe.top_k * parts,
            d_hidden=moe.d_hidden if method == "grow" else moe.d_hidden // parts,
            # Shared experts keep their width (it defaults to d_hidden).
            d_shared_hidden=moe.d_shared_hidden
            or (moe.d_hidden if moe.num_shared_experts else None),
        )
    return dataclasses.replace(config, moe=new_moe)


@torch.no_grad()
def add_experts(
    model: Transformer, num_new: int, method: str | None = None, seed: int = 0
) -> Transformer:
    """A new model with num_new more experts per MoE layer and the same output.

    Args:
        model: the trained MoE Transformer.
        num_new: experts to add to every MoE layer (split, grow: a multiple of E).
        method: "offset", "split" or "grow" (see the module docstring); None picks
            default_method.
        seed: seeds the new units' w_up (grow).
    Returns:
        The new model (train mode) on model's device and dtype. New experts have ids E and up.
    """
    method = method or default_method(model.config)
    config = added_experts_config(model.config, num_new, method)
    old = model.config.moe
    state = model.state_dict()
    for layer in model.config.moe_layers:
        prefix = f"layers.{layer}.ffn."
        if method == "offset":
            _offset_layer(state, prefix, old.num_experts, num_new)
        else:
            parts = config.moe.num_experts // old.num_experts
            _split_layer(state, prefix, parts, old)
            if method == "grow":
                generator = torch.Generator().manual_seed(seed + layer)
                _widen_layer(state, prefix, parts, old, model.config.init_std, generator)
    parameter = next(model.parameters())
    new_model = Transformer(config).to(device=parameter.device, dtype=parameter.dtype)
    new_model.load_state_dict(state, strict=True)
    return new_model


def _offset_layer(state: dict[str, Tensor], prefix: str, num_old: int, num_new: int) -> None:
    """New expert E + j copies expert j mod E (weights, router row); its bias sits below all."""
    sources = torch.arange(num_new) % num_old
    for key in ("experts.w_up", "experts.w_down", "router.weight"):
        old = state[prefix + key]
        state[prefix + key] = torch.cat((old, old[sources.to(old.device)]))
    bias_E = state[prefix + "router.bias"]
    new_bias = bias_E.min() - 1.0 - OFFSET_MARGIN
    state[prefix + "router.bias"] = torch.cat((bias_E, new_bias.expand(num_new)))


def _split_layer(state: dict[str, Tensor], prefix: str, parts: int, moe) -> None:
    """Part s of expert e becomes expert e + s * E: hidden units [s F/P, (s+1) F/P)."""
    w_up_EDH, w_down_EFD = state[prefix + "experts.w_up"], state[prefix + "experts.w_down"]
    F, width = moe.d_hidden, moe.d_hidden // parts
    # Each part's weight is 1/P of the old one, except unnormalised sigmoid scores.
    sigmoid_scores = router_class(moe.router).has_selection_bias  # scores not shared by a softmax
    scale = 1.0 if sigmoid_scores and not moe.renormalize else float(parts)
    ups, downs = [], []
    for s in range(parts):
        units = slice(s * width, (s + 1) * width)
        if moe.gated:  # gate and up halves side by side: take the same units from each
            ups.append(torch.cat((w_up_EDH[..., units], w_up_EDH[..., F:][..., units]), dim=-1))
        else:
            ups.append(w_up_EDH[..., units])
        downs.append(w_down_EFD[:, units] * scale)
    state[prefix + "experts.w_up"] = torch.cat(ups).contiguous()
    state[prefix + "experts.w_down"] = torch.cat(downs).contiguous()
    for key in ("router.weight", "router.bias", "router.noise_weight"):
        if prefix + key in state:  # rows (E, D) or biases (E,): the same for every part
            rows = state[prefix + key]
            state[prefix + key] = rows.repeat(parts, *[1] * (rows.dim() - 1))


def _widen_layer(
    state: dict[str, Tensor], prefix: str, parts: int, moe, std: float, generator: torch.Generator
) -> None:
    """Pad each part from F / P back to F units: new w_up columns N(0, std), w_down rows 0."""
    w_up_EDH, w_down_EFD = state[prefix + "experts.w_up"], state[prefix + "experts.w_down"]
    E, D, width = w_up_EDH.shape[0], w_up_EDH.shape[1], moe.d_hidden // parts
    new_units = moe.d_hidden - width
    halves = w_up_EDH.chunk(2, dim=-1) if moe.gated else (w_up_EDH,)
    fresh = [torch.randn(E, D, new_units, generator=generator).to(w_up_EDH) * std for _ in halves]
    state[prefix + "experts.w_up"] = torch.cat(
        [piece for half, new in zip(halves, fresh) for piece in (half, new)], dim=-1
    )
    zeros = w_down_EFD.new_zeros(E, new_units, w_down_EFD.shape[-1])
    state[prefix + "experts.w_down"] = torch.cat((w_down_EFD, zeros), dim=1)


def _parts(config: ModelConfig, num_new: int, method: str) -> int:
    """Parts per expert for split and grow; errors name the method and the --num that work."""
    num_experts, d_hidden = config.moe.num_experts, config.moe.d_hidden
    # num_new = k * E gives 1 + k parts, each needing d_hidden divisible by it.
    working = [k * num_experts for k in range(1, d_hidden) if d_hidden % (1 + k) == 0][:3]
    advice = f"--num {', '.join(map(str, working))}, ..." if working else "no --num does"
    if add_experts_unsupported(config, "offset") is None:
        advice += "; or method 'offset', which adds any number"
    if num_new % num_experts:
        raise ValueError(
            f"method {method!r} adds a multiple of num_experts ({num_experts}) experts, "
            f"got {num_new}: {advice}"
        )
    parts = 1 + num_new // num_experts
    if d_hidden % parts:
        raise ValueError(
            f"method {method!r} with {num_new} new experts splits each into {parts} parts, "
            f"which needs d_hidden ({d_hidden}) divisible by {parts}: {advice}"
        )
    return parts
