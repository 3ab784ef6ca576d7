"""The key/value cache of autoregressive decoding: static, preallocated, written in place.

# L layers, B batch, G key/value heads, S cache slots, T new tokens, Dh head dim

Every shape is fixed when the cache is made. A forward claims the next T slots (a tensor,
never a Python number), writes its keys and values there with index_put_, and attention
runs over all S slots under a mask: slots not yet written and padding are masked out. So
torch.compile traces one decode step and reuses it at every position (gpt-fast's scheme).

Sequences of different lengths share the slots: each keeps its own count of real tokens,
which gives the rotary position of its next token, and padding slots are never attended
to. Beside the model (not in generate.py) because the attention layers write into it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache:
    """Keys and values of every layer, (B, G, max_len, Dh) each, plus where the tokens are.

    Args:
        num_layers, batch_size, num_kv_heads, head_dim: the cache's shape.
        max_len: the most slots it holds (prompt, its padding, and generated tokens).
        device, dtype: those of the model's activations.
        value_dim: the width of the second tensor per layer (None = head_dim). The attention
            kind says what the two hold (`cache_widths(config)`): keys and values for
            grouped-query attention; for MLA (models/mla.py) the compressed latent
            (B, 1, S, kv_lora_rank) and the shared rotary key (B, 1, S, qk_rope_head_dim).

    State (all tensors, updated in place): `filled_BS` marks the slots that hold a real
    token, `seen_B` counts each sequence's real tokens (the next token's position),
    `end_1` is the next free slot.
    """

    def __init__(
        self,
        num_layers,
        batch_size,
        num_kv_heads,
        head_dim,
        max_len,
        *,
        device=None,
        dtype=None,
        value_dim=None,
    ):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        value_shape = shape[:-1] + (head_dim if value_dim is None else value_dim,)
        # One tensor per layer (not a view of an (L, ...) block): a compiled step writes
        # each with index_put_ in place, which inductor keeps in place for graph inputs.
        self.k_BGSDh = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v_BGSDh = [
            torch.zeros(value_shape, device=device, dtype=dtype) for _ in range(num_layers)
        ]
        self.filled_BS = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.seen_B = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.end_1 = torch.zeros(1, dtype=torch.long, device=device)
        self.slots_S = torch.arange(max_len, device=device)
        self.max_len = max_len

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_len: int) -> KVCache:
        """An empty cache shaped for `model` (as its attention kind says) with max_len slots."""
        cfg = model.config
        weight = model.tok_embed.weight
        heads, key_dim, value_dim = type(model.layers[0].attn).cache_widths(cfg)
        return cls(
            cfg.num_layers,
            batch_size,
            heads,
            key_dim,
            max_len,
            device=weight.device,
            dtype=weight.dtype,
            value_dim=value_dim,
        )

    @property
    def length(self) -> int:
        """Slots written so far (reads a tensor on the host: for eager code)."""
        return int(self.end_1)

    def claim(self, real_BT: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Take the next T slots for new tokens; real_BT (bool) is False for padding.

        Returns:
            slots_T: the slots the new keys and values go to.
            positions_BT: each token's rotary position (its sequence's real tokens before
                it; a padding token gets the position of the next real one).
            mask_B1TS: True where a query may attend to a key: keys at or before its slot
                holding a real token, and always its own slot (so a padding query, which
                has no real key, still has one to attend to and never makes a NaN).
        """
        T = real_BT.shape[1]
        if not torch.compiler.is_compiling():  # compiled callers check the room beforehand
            end = self.length + T
            if end > self.max_len:
                raise ValueError(f"KV cache is full: {end} positions > max_len ({self.max_len})")
        slots_T = self.end_1 + torch.arange(T, device=self.end_1.device)
        real_count_BT = real_BT.long().cumsum(dim=1)
        positions_BT = self.seen_B.unsqueeze(1) + real_count_BT - real_BT.long()
        self.filled_BS[:, slots_T] = real_BT
        self.seen_B += real_count_BT[:, -1]
        self.end_1 += T
        keys_1S, queries_T1 = self.slots_S.unsqueeze(0), slots_T.unsqueeze(1)
        causal_TS = keys_1S <= queries_T1
        mask_BTS = (self.filled_BS.unsqueeze(1) & causal_TS) | (keys_1S == queries_T1)
        return slots_T, positions_BT, mask_BTS.unsqueeze(1)

    def update(
        self, layer: int, slots_T: Tensor, k_BGTDh: Tensor, v_BGTDh: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Write the new keys/values of `layer` at slots_T; return all (B, G, S, Dh) of it."""
        self.k_BGSDh[layer][:, :, slots_T] = k_BGTDh
        self.v_BGSDh[layer][:, :, slots_T] = v_BGTDh
        return self.k_BGSDh[layer], self.v_BGSDh[layer]


def padded_positions(real_BT: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary positions and the attention mask of padded sequences without a cache.

    Args:
        real_BT: bool, False at padding (any layout: left, right or in between).
    Returns:
        positions_BT (real tokens before each token) and mask_B1TT (causal, real keys only,
        and each query's own slot; see KVCache.claim).
    """
    T = real_BT.shape[1]
    positions_BT = real_BT.long().cumsum(dim=1) - real_BT.long()
    slots_T = torch.arange(T, device=real_BT.device)
    keys_1T, queries_T1 = slots_T.unsqueeze(0), slots_T.unsqueeze(1)
    mask_BTT = (real_BT.unsqueeze(1) & (keys_1T <= queries_T1)) | (keys_1T == queries_T1)
    return positions_BT, mask_BTT.unsqueeze(1)
