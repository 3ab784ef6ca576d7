"""Rotary position embeddings (RoFormer), plain or YaRN-scaled for long contexts.

# S positions, P = rotary dim / 2 frequency pairs, Dh the rotated part of a head

YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language
Models") stretches a model trained on `original_max_seq_len` positions by `factor`:
frequencies that turn fewer than beta_slow times over the original context are
interpolated (divided by factor), those that turn more than beta_fast times are kept,
and a linear ramp blends the band between. The attention logits are then sharpened by
mscale(factor) = 0.1 * m * ln(factor) + 1, applied to cos and sin (so to q.k twice, as
the paper's sqrt(1/t) on each). DeepSeek-V2/V3 give m for the rotary part (`mscale`)
and for the whole head (`mscale_all_dim`): the tables carry their ratio and the
attention's softmax scale the mscale_all_dim part squared (models/mla.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ROPE_SCALINGS = ("yarn",)
# The keys a rope_scaling dict may hold (a YaRN one needs type and factor).
_YARN_KEYS = {
    "type",
    "factor",
    "original_max_seq_len",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "attention_factor",
    "truncate",
}


def check_rope_scaling(scaling: dict | None) -> None:
    """Raise ValueError naming the bad entry of a ModelConfig.rope_scaling dict."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling ({scaling!r}) must be a dict or None")
    if scaling.get("type") not in ROPE_SCALINGS:
        raise ValueError(f"rope_scaling type {scaling.get('type')!r} is not one of {ROPE_SCALINGS}")
    unknown = sorted(set(scaling) - _YARN_KEYS)
    if unknown:
        raise ValueError(f"unknown rope_scaling keys {unknown}; known: {sorted(_YARN_KEYS)}")
    for key in ("factor", "original_max_seq_len"):
        value = scaling.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"rope_scaling {key} ({value!r}) must be a positive number")


def yarn_mscale(factor: float, m: float = 1.0) -> float:
    """YaRN's attention temperature term, 0.1 * m * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def _yarn_frequencies(dim: int, theta: float, s: dict) -> tuple[Tensor, float]:
    factor, original = float(s["factor"]), s["original_max_seq_len"]
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def dim_of(rotations: float) -> float:
        # the pair index whose wavelength fits `rotations` turns into the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp_P = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq_P = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    # ramp 0: keep the frequency (extrapolate); ramp 1: interpolate it by the factor
    inv_freq_P = inv_freq_P / factor * ramp_P + inv_freq_P * (1 - ramp_P)
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq_P, float(attention_factor)


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, scaling: dict | None = None
) -> tuple[Tensor, Tensor]:
    """cos and sin tables (max_seq_len, head_dim / 2) for rotary embeddings.

    head_dim is the rotated width (DeepSeek's MLA rotates only qk_rope_head_dim of each
    head). scaling: None, or a YaRN dict (see the module docstring; keys in _YARN_KEYS).
    """
    if scaling is None:
        inv_freq_P = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        scale = 1.0
    else:
        inv_freq_P, scale = _yarn_frequencies(head_dim, theta, scaling)
    angles_SP = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq_P)
    return angles_SP.cos() * scale, angles_SP.sin() * scale


def apply_rope(x_BHTDh: Tensor, cos_TP: Tensor, sin_TP: Tensor) -> Tensor:
    """Rotate each (first half, second half) pair of x's first 2P dims by the position's angle.

    The "rotate half" layout of GPT-NeoX and Hugging Face LLaMA/Mixtral, so their q/k
    weights load without the permutation the interleaved layout would need. When the
    tables are narrower than the head (2P < Dh: ModelConfig.rotary_dim, GLM-4.5's
    partial_rotary_factor), x[..., :P] pairs with x[..., P:2P] and the dims from 2P on
    pass through unchanged, as transformers' GPT-NeoX/GLM apply_rotary_pos_emb does.
    """
    rotary = 2 * cos_TP.shape[-1]
    if rotary < x_BHTDh.shape[-1]:
        rotated = apply_rope(x_BHTDh[..., :rotary], cos_TP, sin_TP)
        return torch.cat((rotated, x_BHTDh[..., rotary:]), dim=-1)
    x1, x2 = x_BHTDh.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos_TP - x2 * sin_TP, x2 * cos_TP + x1 * sin_TP), dim=-1)
    return rotated.to(x_BHTDh.dtype)
