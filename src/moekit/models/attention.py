"""Attention kinds of the decoder: grouped-query attention with rotary positions.

# B batch, T new tokens, S cached + new tokens, D model, H query heads, G key/value heads,
# Dh head dim

Every kind takes (config, layer) and is called as attn(x_BTD, where, kv_cache) -> y_BTD,
where `Placement` says where the T new tokens sit (shared by every layer); its output
projection is `wo` (initialised with the residual scale). `rotary_dim(config)` gives the
width its rotary tables need. models/transformer.py picks the kind by
ModelConfig.attention from ATTENTION_KINDS there (so the kinds take the config without
importing its class: transformer.py imports them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from .kv_cache import KVCache
from .norm import RMSNorm
from .rope import apply_rope


@dataclass
class Placement:
    """Where a forward's T new tokens sit, shared by every layer.

    cos, sin: rotary tables at the tokens' positions, (T, P) or (B, 1, T, P) per sequence.
    mask_B1TS: which keys each query may attend to; None = causal over the T tokens alone.
    slots_T: the cache slots the new keys and values go to (None without a cache).
    """

    cos: Tensor
    sin: Tensor
    mask_B1TS: Tensor | None
    slots_T: Tensor | None


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query heads and rotary positions.

    Args:
        config: the model config (d_model, num_heads, num_kv_heads; rotary_dim, the width
            of each head that rotates; attention_multiplier, the softmax scale).
        layer: this layer's index, its slot in a KV cache.
    """

    def __init__(self, config, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        q_width, kv_width = (
            config.num_heads * config.head_dim,
            config.num_kv_heads * config.head_dim,
        )
        self.wq = nn.Linear(config.d_model, q_width, bias=config.qkv_bias)
        self.wk = nn.Linear(config.d_model, kv_width, bias=config.qkv_bias)
        self.wv = nn.Linear(config.d_model, kv_width, bias=config.qkv_bias)
        self.wo = nn.Linear(q_width, config.d_model, bias=config.attn_out_bias)
        self.qk_norm = config.qk_norm
        # None: SDPA's own 1 / sqrt(Dh); Granite sets its attention_multiplier instead
        self.scale = config.attention_multiplier
        if config.qk_norm is not None:
            per_head = config.qk_norm == "head"
            self.q_norm = RMSNorm(config.head_dim if per_head else q_width, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim if per_head else kv_width, config.norm_eps)

    @staticmethod
    def rotary_dim(config) -> int:
        """The width the rotary tables cover: rotary_dim, or the whole head when None."""
        return config.head_dim if config.rotary_dim is None else config.rotary_dim

    @staticmethod
    def cache_widths(config) -> tuple[int, int, int]:
        """(heads, key width, value width) of a layer's KV cache: G heads of Dh each."""
        return config.num_kv_heads, config.head_dim, config.head_dim

    def forward(self, x_BTD: Tensor, where: Placement, kv_cache: KVCache | None) -> Tensor:
        """Args: x_BTD; where the T new tokens are (Placement); kv_cache or None. Returns y_BTD."""
        B, T, _ = x_BTD.shape
        # 1. project (q/k norm), split heads; rotate q and k by their positions
        q, k = self.wq(x_BTD), self.wk(x_BTD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BTHDh = q.view(B, T, self.num_heads, self.head_dim)
        k_BTGDh = k.view(B, T, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q_BTHDh, k_BTGDh = self.q_norm(q_BTHDh), self.k_norm(k_BTGDh)
        q_BHTDh, k_BGTDh = q_BTHDh.transpose(1, 2), k_BTGDh.transpose(1, 2)
        v_BGTDh = self.wv(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q_BHTDh = apply_rope(q_BHTDh, where.cos, where.sin)
        k_BGTDh = apply_rope(k_BGTDh, where.cos, where.sin)

        # 2. write into the cache; attend over all of its slots (the mask says which count)
        if kv_cache is not None:
            k_BGTDh, v_BGTDh = kv_cache.update(self.layer, where.slots_T, k_BGTDh, v_BGTDh)

        # 3. attention, each key/value head serving num_heads / num_kv_heads query heads
        y_BHTDh = self.attend(q_BHTDh, k_BGTDh, v_BGTDh, where)

        # 4. merge heads and project back
        return self.wo(y_BHTDh.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    def attend(self, q_BHTDh: Tensor, k_BGSDh: Tensor, v_BGSDh: Tensor, where: Placement) -> Tensor:
        """Step 3 on the rotated heads (a subclass may change how heads attend). Returns y_BHTDh."""
        return grouped_query_attention(q_BHTDh, k_BGSDh, v_BGSDh, where.mask_B1TS, self.scale)


def grouped_query_attention(
    q_BHTDh: Tensor,
    k_BGSDh: Tensor,
    v_BGSDh: Tensor,
    mask_B1TS: Tensor | None,
    scale: float | None = None,
) -> Tensor:
    """SDPA with G key/value heads for H query heads; causal when mask_B1TS is None.

    scale is the softmax scale (None = SDPA's 1 / sqrt(Dh)).

    With a mask (a cache or padding), the query heads of one key/value head are folded
    into its rows, (B, G, H/G * T, Dh), so the cached keys and values are read as they are,
    never repeated per query head. Without one (training), SDPA's is_causal needs the rows
    as they are, so the keys and values are repeated (works on every torch >= 2.4, unlike
    SDPA's enable_gqa).
    """
    B, H, T, Dh = q_BHTDh.shape
    groups = H // k_BGSDh.shape[1]
    if mask_B1TS is None:
        if groups > 1:
            k_BGSDh = k_BGSDh.repeat_interleave(groups, dim=1)
            v_BGSDh = v_BGSDh.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(
            q_BHTDh, k_BGSDh, v_BGSDh, is_causal=T > 1, scale=scale
        )
    # Query head h uses key/value head h // groups (repeat_interleave's order), so the
    # reshape puts row j * T + t of head g at query head g * groups + j, position t.
    q_BGMDh = q_BHTDh.reshape(B, -1, groups * T, Dh)
    mask_B1MS = mask_B1TS.repeat(1, 1, groups, 1)
    y_BGMDh = F.scaled_dot_product_attention(
        q_BGMDh, k_BGSDh, v_BGSDh, attn_mask=mask_B1MS, scale=scale
    )
    return y_BGMDh.reshape(B, H, T, Dh)
