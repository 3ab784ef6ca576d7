"""gpt-oss's attention: grouped-query heads with attention sinks and sliding windows.

# B batch, T new tokens, S cached + new tokens (key slots), H query heads, G key/value
# heads, Dh head dim, M = H/G * T query rows per key/value head

A kind of its own (ModelConfig.attention "sinks"), a subclass of the grouped-query
`Attention` that changes only how the rotated heads attend (`attend`):

Attention sinks (Xiao et al. 2023, "Efficient Streaming Language Models with Attention
Sinks"; as gpt-oss uses them, OpenAI 2025, arXiv:2508.10925): each head h has a learned
logit s_h that joins the softmax's denominator and carries no value,
    y_t = sum_j exp(q_t.k_j / sqrt(Dh)) v_j / (exp(s_h) + sum_j exp(q_t.k_j / sqrt(Dh))),
so a head may put weight on "nothing" instead of spreading it over the keys. For SDPA the
sink is one more key column whose key and value are zero (its dot product is 0) and whose
logit s_h is given through a float attn_mask; the mask's other columns hold 0 where a
query may attend and -inf where it may not.

Sliding windows (Beltagy et al. 2020, "Longformer"; Jiang et al. 2023, "Mistral 7B"):
in the layers listed in ModelConfig.sliding_layers (all layers when None), query slot q
sees key slots k with q - window < k <= q, that is itself and the window - 1 slots before
it (transformers' `sliding_window` convention). Windows are over slots, as transformers' masks are: with
left padding, the distance between two real tokens' slots is the distance between their
positions. The static KV cache keeps every slot; the window is part of the mask over them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Attention, Placement


class SinkAttention(Attention):
    """Grouped-query attention with one learned sink logit per head and, in sliding
    layers, a window over the key slots (see the module docstring).

    Args:
        config: the model config (as Attention, plus sliding_window and sliding_layers).
        layer: this layer's index.
    """

    def __init__(self, config, layer: int):
        super().__init__(config, layer)
        self.sinks = nn.Parameter(torch.zeros(config.num_heads))
        slides = config.sliding_layers is None or layer in config.sliding_layers
        self.window = config.sliding_window if slides else None

    def attend(self, q_BHTDh: Tensor, k_BGSDh: Tensor, v_BGSDh: Tensor, where: Placement) -> Tensor:
        """SDPA over the allowed keys plus the sink column. Returns y_BHTDh."""
        B, H, T, Dh = q_BHTDh.shape
        G, S = k_BGSDh.shape[1], k_BGSDh.shape[2]
        groups = H // G
        # 1. which keys each query may see: causal (or the cache's mask), then the window
        keys_1S = torch.arange(S, device=q_BHTDh.device).unsqueeze(0)
        if where.slots_T is None:
            queries_T1 = torch.arange(T, device=q_BHTDh.device).unsqueeze(1)
        else:
            queries_T1 = where.slots_T.unsqueeze(1)
        if where.mask_B1TS is None:
            allowed_B1TS = (keys_1S <= queries_T1).view(1, 1, T, S)
        else:
            allowed_B1TS = where.mask_B1TS
        if self.window is not None:
            allowed_B1TS = allowed_B1TS & (queries_T1 - keys_1S < self.window)
        # 2. the float mask, with the query heads of one key/value head folded into its
        # rows as in grouped_query_attention (row j * T + t is query head g * groups + j)
        # (its batch dim stays 1 without padding or a cache: SDPA broadcasts it)
        dtype, Bm = q_BHTDh.dtype, allowed_B1TS.shape[0]
        bias_B1TS = torch.zeros(allowed_B1TS.shape, dtype=dtype, device=q_BHTDh.device)
        bias_B1TS = bias_B1TS.masked_fill(~allowed_B1TS, float("-inf"))
        bias_BGMS = bias_B1TS.repeat(1, 1, groups, 1).expand(Bm, G, groups * T, S)
        sink_GM = self.sinks.to(dtype).view(G, groups).repeat_interleave(T, dim=1)
        sink_BGM1 = sink_GM.view(1, G, groups * T, 1).expand(Bm, G, groups * T, 1)
        mask_BGMS1 = torch.cat([bias_BGMS, sink_BGM1], dim=-1)
        # 3. the sink's key and value: zeros
        zero_BG1Dh = k_BGSDh.new_zeros(B, G, 1, Dh)
        k_BGS1Dh = torch.cat([k_BGSDh, zero_BG1Dh], dim=2)
        v_BGS1Dh = torch.cat([v_BGSDh, zero_BG1Dh], dim=2)
        q_BGMDh = q_BHTDh.reshape(B, G, groups * T, Dh)
        y_BGMDh = F.scaled_dot_product_attention(
            q_BGMDh, k_BGS1Dh, v_BGS1Dh, attn_mask=mask_BGMS1, scale=self.scale
        )
        return y_BGMDh.reshape(B, H, T, Dh)


def check_window(config) -> None:
    """Raise ValueError naming a bad sliding_window or sliding_layers of a ModelConfig."""
    window = config.sliding_window
    if window is None:
        if config.sliding_layers is not None:
            raise ValueError(f"sliding_layers ({config.sliding_layers}) needs a sliding_window")
        return
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"sliding_window ({window!r}) must be a positive integer or None")
    if config.attention != "sinks":
        raise ValueError(
            f"sliding_window needs attention 'sinks' (got attention {config.attention!r})"
        )
    layers = config.sliding_layers or []
    bad = [i for i in layers if not (isinstance(i, int) and 0 <= i < config.num_layers)]
    if bad:
        raise ValueError(f"sliding_layers {bad} are not layer indices in [0, {config.num_layers})")
