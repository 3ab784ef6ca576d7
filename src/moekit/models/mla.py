"""Multi-head latent attention (MLA) of DeepSeek-V2 and DeepSeek-V3.

# B batch, T new tokens, S cached + new tokens, D model, H heads, C kv_lora_rank (the
# latent), Q q_lora_rank, N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim

DeepSeek-V2 (arXiv:2405.04434) section 2.1, eqs. (9)-(19); DeepSeek-V3 (arXiv:2412.19437)
section 2.1.1 keeps it unchanged. Keys and values are compressed jointly into a latent
    c_KV = RMSNorm(W_DKV x)                       (C wide, eq. 9)
and recovered per head by up-projections, k_C = W_UK c_KV, v = W_UV c_KV (eqs. 10-11).
Rotary positions cannot pass through that low-rank product, so they are decoupled
(eqs. 14-17): every head's key gets a rotary part k_R = RoPE(W_KR x) (R wide) shared by
all heads, and the query a per-head rotary part q_R. A head's query and key are
[q_C; q_R] and [k_C; k_R] (N + R wide); its value is V wide. The query may be
compressed the same way, q = W_UQ RMSNorm(W_DQ x) (eqs. 12-13, q_lora_rank), or be one
projection (q_lora_rank None, DeepSeek-V2-Lite).

Softmax scale: 1 / sqrt(N + R), times mscale(factor, mscale_all_dim)^2 under YaRN
(models/rope.py; the tables carry the rotary part's own mscale ratio).

The cache holds what MLA is for: per token and layer, the latent c_KV (C values) and the
rotated shared key k_R (R values), not H * (N + R + V) keys and values. A one-token
decode step attends in the latent space: W_UK is folded into the query and W_UV applied
after the softmax (section 2.1.2's inference form, `_attend_absorbed`), so it reads S
latents rather than S * H keys and values. Training and prompts decompress the latents
into per-head keys and values (`_attend`), cheaper when T is large. Both give the same
attention (tests/test_mla.py).

Layout: W_DKV and W_KR are one projection `wkv_down` (C + R outputs, latent first) and
W_UK, W_UV one `wkv_up` (per head N key then V value rows), as in DeepSeek's checkpoints.
The rotary dims use moekit's rotate-half layout; DeepSeek's checkpoints rotate
interleaved pairs, and interop reorders those weight rows on load and back on save.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Placement
from .kv_cache import KVCache
from .norm import RMSNorm
from .rope import apply_rope, yarn_mscale

# DeepSeek's latent RMSNorms use this epsilon whatever the model's norm_eps (their
# q_a_layernorm / kv_a_layernorm are built with the class default).
LATENT_NORM_EPS = 1e-6
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")


def check_mla_fields(config) -> None:
    """Raise ValueError naming a missing or bad MLA width of a ModelConfig (attention "mla")."""
    for name in MLA_FIELDS:
        value = getattr(config, name)
        if name == "q_lora_rank" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f'{name} ({value!r}) must be a positive integer with attention "mla"')
    gqa_only = [
        f"{name} {getattr(config, name)!r}"
        for name in ("qk_norm", "qkv_bias", "attn_out_bias")
        if getattr(config, name)
    ]
    if gqa_only:
        raise ValueError(f'attention "mla" has no {", ".join(gqa_only)}')
    if config.qk_rope_head_dim % 2:
        raise ValueError(
            f"qk_rope_head_dim ({config.qk_rope_head_dim}) must be even for rotary embeddings"
        )


def softmax_scale(config) -> float:
    """1 / sqrt(N + R), times YaRN's mscale(factor, mscale_all_dim)^2 when rope_scaling is set."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    scaling = config.rope_scaling
    if scaling is not None:
        scale *= yarn_mscale(float(scaling["factor"]), scaling.get("mscale_all_dim") or 0.0) ** 2
    return scale


class MultiHeadLatentAttention(nn.Module):
    """Causal MLA with a compressed key/value cache (DeepSeek-V2 section 2.1).

    Args:
        config: the model config (d_model, num_heads and the MLA widths: q_lora_rank,
            kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim).
        layer: this layer's index, its slot in a KV cache.
    """

    def __init__(self, config, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = H = config.num_heads
        self.kv_rank, self.v_dim = config.kv_lora_rank, config.v_head_dim
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        D, qk_width = config.d_model, H * (self.nope_dim + self.rope_dim)
        self.compressed_q = config.q_lora_rank is not None
        if not self.compressed_q:
            self.wq = nn.Linear(D, qk_width, bias=False)
        else:
            self.wq_down = nn.Linear(D, config.q_lora_rank, bias=False)  # W_DQ
            self.q_norm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.wq_up = nn.Linear(config.q_lora_rank, qk_width, bias=False)  # W_UQ and W_QR
        self.wkv_down = nn.Linear(D, self.kv_rank + self.rope_dim, bias=False)  # W_DKV, W_KR
        self.kv_norm = RMSNorm(self.kv_rank, LATENT_NORM_EPS)
        self.wkv_up = nn.Linear(self.kv_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(H * self.v_dim, D, bias=False)
        self.scale = softmax_scale(config)

    @staticmethod
    def rotary_dim(config) -> int:
        """The width the rotary tables cover: the decoupled rotary part, qk_rope_head_dim."""
        return config.qk_rope_head_dim

    @staticmethod
    def cache_widths(config) -> tuple[int, int, int]:
        """(heads, first width, second width) of a layer's cache: one latent of
        kv_lora_rank and one shared rotary key of qk_rope_head_dim per token."""
        return 1, config.kv_lora_rank, config.qk_rope_head_dim

    def forward(self, x_BTD: Tensor, where: Placement, kv_cache: KVCache | None) -> Tensor:
        """Args: x_BTD; where the T new tokens are (Placement); kv_cache or None. Returns y_BTD."""
        B, T, _ = x_BTD.shape
        H, N, R = self.num_heads, self.nope_dim, self.rope_dim
        # 1. queries (eqs. 12-13, 16): per head a non-rotary and a rotated part
        if self.compressed_q:
            q = self.wq_up(self.q_norm(self.wq_down(x_BTD)))
        else:
            q = self.wq(x_BTD)
        q_BHTN, q_rot_BHTR = q.view(B, T, H, N + R).transpose(1, 2).split((N, R), dim=-1)
        q_rot_BHTR = apply_rope(q_rot_BHTR, where.cos, where.sin)

        # 2. the latent (eq. 9) and the shared rotary key (eq. 17), one "head" each
        latent_BTC, k_rot_BTR = self.wkv_down(x_BTD).split((self.kv_rank, R), dim=-1)
        latent_B1TC = self.kv_norm(latent_BTC).unsqueeze(1)
        k_rot_B1TR = apply_rope(k_rot_BTR.unsqueeze(1), where.cos, where.sin)

        # 3. the cache stores only those two; attend over all of its slots (the mask says which)
        if kv_cache is not None:
            latent_B1TC, k_rot_B1TR = kv_cache.update(
                self.layer, where.slots_T, latent_B1TC, k_rot_B1TR
            )
        # 4. attention: a decode step in the latent space (absorbed), otherwise decompressed
        if kv_cache is not None and T == 1:
            y_BHTV = self._attend_absorbed(q_BHTN, q_rot_BHTR, latent_B1TC, k_rot_B1TR, where)
        else:
            y_BHTV = self._attend(q_BHTN, q_rot_BHTR, latent_B1TC, k_rot_B1TR, where)
        return self.wo(y_BHTV.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def _attend(
        self, q_BHTN: Tensor, q_rot_BHTR: Tensor, latent_B1SC: Tensor, k_rot_B1SR: Tensor, where
    ) -> Tensor:
        """Attention with keys and values decompressed per head (eqs. 10-11, 18-19)."""
        B, H, T, N = q_BHTN.shape
        S, R, V = latent_B1SC.shape[2], self.rope_dim, self.v_dim
        # decompress keys and values per head and join the shared rotary key
        kv_BHSX = self.wkv_up(latent_B1SC.squeeze(1)).view(B, S, H, N + V).transpose(1, 2)
        k_BHSN, v_BHSV = kv_BHSX.split((N, V), dim=-1)
        k_BHSK = torch.cat((k_BHSN, k_rot_B1SR.expand(B, H, S, R)), dim=-1)
        q_BHTK = torch.cat((q_BHTN, q_rot_BHTR), dim=-1)
        # causal over the T tokens when there is no mask
        mask = where.mask_B1TS
        return F.scaled_dot_product_attention(
            q_BHTK,
            k_BHSK,
            v_BHSV,
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            scale=self.scale,
        )

    def _attend_absorbed(
        self, q_BHTN: Tensor, q_rot_BHTR: Tensor, latent_B1SC: Tensor, k_rot_B1SR: Tensor, where
    ) -> Tensor:
        """The same attention without decompressing the cache (DeepSeek-V2 section 2.1.2):
        W_UK is folded into the query and W_UV applied after the softmax, so one decode step
        reads S latents instead of S * H keys and values.

        q_C . k_C = q_C . (W_UK c) = (W_UK^T q_C) . c, so each head scores
        [W_UK^T q_C; q_R] against [c; k_R] (C + R wide) and mixes the latents c, which
        W_UV then maps to the head's value: the softmax weights are those of _attend.
        """
        B, H, T, N = q_BHTN.shape
        S, C, R, V = latent_B1SC.shape[2], self.kv_rank, self.rope_dim, self.v_dim
        w_up_HXC = _effective_weight(self.wkv_up).view(H, N + V, C)
        w_uk_HNC, w_uv_HVC = w_up_HXC.split((N, V), dim=1)
        q_latent_BHTC = torch.einsum("bhtn,hnc->bhtc", q_BHTN, w_uk_HNC)
        q_BHTK = torch.cat((q_latent_BHTC, q_rot_BHTR), dim=-1)
        k_B1SK = torch.cat((latent_B1SC, k_rot_B1SR), dim=-1)
        mixed_BHTC = F.scaled_dot_product_attention(
            q_BHTK,
            k_B1SK.expand(B, H, S, C + R),
            latent_B1SC.expand(B, H, S, C),
            attn_mask=where.mask_B1TS,
            scale=self.scale,
        )
        return torch.einsum("bhtc,hvc->bhtv", mixed_BHTC, w_uv_HVC)


def _effective_weight(linear: nn.Module) -> Tensor:
    """The weight a projection applies: with a LoRA adapter (models/lora.py's LoRALinear,
    which has delta_weight), the base weight plus its low-rank update."""
    delta = getattr(linear, "delta_weight", None)
    return linear.weight if delta is None else linear.weight + delta()
