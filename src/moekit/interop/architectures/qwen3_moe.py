"""Qwen3-MoE (model_type qwen3_moe): Qwen3-30B-A3B and Qwen3-235B-A22B.

Qwen2-MoE's layer pattern and norm_topk_prob (qwen2_moe.py) without its shared expert or
q/k/v biases (one attention_bias), with an RMSNorm over each head of q and k and a head_dim
apart from hidden_size / heads.
"""

from __future__ import annotations

from ...models import ModelConfig
from .base import (
    Architecture,
    gqa_model_config,
    gqa_problems,
    no_shared_expert,
    one_attention_bias,
)
from .qwen2_moe import qwen_layer_keys, read_qwen
from .rules import DECODER, FUSED_EXPERTS, PER_EXPERT


class Qwen3Moe(Architecture):
    name = "qwen3_moe"
    hf_class = "Qwen3MoeForCausalLM"
    aliases = {"num_experts": "num_local_experts"}
    priority = 2
    defaults = dict(rope_theta=1e4, rms_norm_eps=1e-6, max_position_embeddings=32768)
    # head_dim 12 != hidden / heads; the top-k weights renormalised
    tiny = dict(
        intermediate_size=40,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        head_dim=12,
        norm_topk_prob=True,
    )

    def to_moekit(self, hf: dict) -> ModelConfig:
        hf = self.read(hf)
        rope_theta, fields = read_qwen(hf)
        bias = bool(hf.get("attention_bias", False))
        return gqa_model_config(
            hf, rope_theta=rope_theta, qkv_bias=bias, attn_out_bias=bias, qk_norm="head", **fields
        )

    def inexpressible(self, config: ModelConfig) -> list[str]:
        return (
            gqa_problems(config, self.name, qk_norm="head")
            + no_shared_expert(config)
            + one_attention_bias(config)
        )

    def hf_keys(self, config: ModelConfig) -> dict:
        return qwen_layer_keys(config) | {"attention_bias": config.qkv_bias}

    def tables(self, config, hf):
        return {"per_expert": DECODER + PER_EXPERT, "fused": DECODER + FUSED_EXPERTS}
