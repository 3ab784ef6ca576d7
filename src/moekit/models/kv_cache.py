"""The key/value cache of autoregressive decoding, one preallocated tensor pair per model.

# L layers, B batch, G key/value heads, S cache length, T new tokens, Dh head dim

Beside the model (not in generate.py) because the attention layers write into it: the
model imports its cache type, and the generator imports both.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache:
    """Preallocated keys and values of every layer: (L, B, G, max_len, Dh) each.

    Args:
        num_layers, batch_size, num_kv_heads, head_dim: the cache's shape.
        max_len: the most positions it holds (prompt plus generated tokens).
        device, dtype: those of the model's activations.
    """

    def __init__(
        self, num_layers, batch_size, num_kv_heads, head_dim, max_len, *, device=None, dtype=None
    ):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k_LBGSDh = torch.zeros(shape, device=device, dtype=dtype)
        self.v_LBGSDh = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # positions filled; the model advances it after all layers ran

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_len: int) -> KVCache:
        """An empty cache shaped for `model` with room for max_len positions."""
        cfg = model.config
        weight = model.tok_embed.weight
        return cls(
            cfg.num_layers,
            batch_size,
            cfg.num_kv_heads,
            cfg.head_dim,
            max_len,
            device=weight.device,
            dtype=weight.dtype,
        )

    def update(self, layer: int, k_BGTDh: Tensor, v_BGTDh: Tensor) -> tuple[Tensor, Tensor]:
        """Store the T new keys/values of `layer`; return all of its (B, G, length + T, Dh)."""
        end = self.length + k_BGTDh.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions > max_len ({self.max_len})")
        self.k_LBGSDh[layer, :, :, self.length : end] = k_BGTDh
        self.v_LBGSDh[layer, :, :, self.length : end] = v_BGTDh
        return self.k_LBGSDh[layer, :, :, :end], self.v_LBGSDh[layer, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Mark num_tokens more positions as filled (called once per model forward)."""
        self.length += num_tokens
