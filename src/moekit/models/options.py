"""Decoder options that further Hugging Face families need, and their validation.

All default to the decoder without them (ModelConfig's fields; models/transformer.py):
- rotary_dim R (None = head_dim): grouped-query attention rotates only the first R dims of
  each q/k head, in the rotate-half layout over those R (x[..., :R/2] with x[..., R/2:R]),
  and passes the rest unchanged: transformers' partial_rotary_factor = R / head_dim
  (GPT-NeoX, GLM-4.5, MiniMax-M2). The rotary tables are R wide. MLA has its own rotary
  width (qk_rope_head_dim) and refuses it.
- norm: "rms" (RMSNorm) or "layer" (LayerNorm with weight and bias, Phi-3.5-MoE) for the
  block norms (attn_norm, ffn_norm) and the final norm; q/k and MTP norms stay RMSNorm.
- IBM Granite's multipliers, as transformers' granitemoeshared applies them:
  embeddings * embedding_multiplier; in each block x + attn(norm(x)) * residual_multiplier,
  then x + ffn(norm(x)) * residual_multiplier; attention_multiplier the softmax scale (None
  = 1 / sqrt(head_dim); MLA refuses it: it sets its own); logits / logits_scaling.
- lm_head_bias: a bias on the output head (Phi-3.5-MoE), lm_head.bias, also when the head's
  weight is tied to the embedding.
"""

from __future__ import annotations

import math

from .norm import NORMS


def check_options(config) -> None:
    """Raise ValueError naming a bad decoder option of a ModelConfig (head_dim derived)."""
    rotary, head_dim = config.rotary_dim, config.head_dim
    if rotary is not None:
        if config.attention == "mla":
            raise ValueError(f"rotary_dim ({rotary!r}) has no effect with attention 'mla'")
        if not isinstance(rotary, int) or isinstance(rotary, bool) or rotary % 2:
            raise ValueError(f"rotary_dim ({rotary!r}) must be an even integer or None")
        if not 0 < rotary <= head_dim:
            raise ValueError(f"rotary_dim ({rotary}) must be in (0, head_dim ({head_dim})]")
    if config.norm not in NORMS:
        raise ValueError(f"unknown norm {config.norm!r}; choose one of {', '.join(NORMS)}")
    names = ["embedding_multiplier", "residual_multiplier", "logits_scaling"]
    if config.attention_multiplier is not None:
        if config.attention == "mla":
            raise ValueError(
                f"attention_multiplier ({config.attention_multiplier!r}) has no effect with "
                "attention 'mla' (it sets its own softmax scale)"
            )
        names.append("attention_multiplier")
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{name} ({value!r}) must be a number")
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} ({value!r}) must be a finite number > 0")
    if not isinstance(config.lm_head_bias, bool):
        raise ValueError(f"lm_head_bias ({config.lm_head_bias!r}) must be True or False")
