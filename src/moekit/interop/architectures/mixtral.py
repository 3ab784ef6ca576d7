"""Mixtral (model_type mixtral): Jiang et al. 2024, "Mixtral of Experts" (arXiv:2401.04088).

A pre-norm decoder with RMSNorm, rotary positions in the rotate-half layout, grouped-query
attention, SwiGLU experts and a softmax top-k router whose top-k weights are always
renormalised; every layer MoE, no biases, no shared expert. The default choice for a moekit
model that fits it.
"""

from __future__ import annotations

from ...models import ModelConfig
from ...models.published import mixtral_8x7b, mixtral_8x22b
from .base import (
    STRUCTURE,
    Architecture,
    Published,
    dense_layer_indices,
    gqa_model_config,
    gqa_problems,
    moe_config,
    no_shared_expert,
    refuse_gqa_options,
)
from .rules import DECODER, FUSED_EXPERTS, per_expert


class Mixtral(Architecture):
    name = "mixtral"
    hf_class = "MixtralForCausalLM"
    aliases = {"num_local_experts": "num_experts"}
    priority = 0
    defaults = dict(rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=131072)
    tiny = dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    flagships = {"mixtral_8x7b": mixtral_8x7b, "mixtral_8x22b": mixtral_8x22b}
    published = {
        "mixtral_8x7b": Published(46.7e9, 12.9e9, "Mistral AI, 'Mixtral of experts' (11 Dec 2023)"),
        "mixtral_8x22b": Published(
            141e9, 39e9, "Mistral AI, 'Cheaper, Better, Faster, Stronger' (17 Apr 2024)"
        ),
    }

    def to_moekit(self, hf: dict) -> ModelConfig:
        hf = self.read(hf)
        hf.require((*STRUCTURE, "intermediate_size", "num_local_experts"))
        refuse_gqa_options(hf)
        window = hf.get("sliding_window")
        if window is not None and window < hf.get("max_position_embeddings"):
            hf.refuse(f"sliding_window {window} (shorter than max_position_embeddings)")
        rope_theta, _ = hf.rope()
        hf.check()
        moe = moe_config(
            hf,
            d_hidden=hf["intermediate_size"],
            num_experts=hf["num_local_experts"],
            renormalize=True,
        )
        bias = bool(hf.get("attention_bias", False))
        return gqa_model_config(hf, moe, rope_theta, qkv_bias=bias, attn_out_bias=bias)

    def inexpressible(self, config: ModelConfig) -> list[str]:
        problems = gqa_problems(config, self.name) + no_shared_expert(config)
        if dense_layer_indices(config):
            problems.append(f"dense layers {dense_layer_indices(config)}")
        if config.qkv_bias or config.attn_out_bias:
            problems.append("attention biases")
        if not config.moe.renormalize:
            problems.append("renormalize false (Mixtral always renormalises the top-k weights)")
        return problems

    def hf_keys(self, config: ModelConfig) -> dict:
        return {
            "intermediate_size": config.moe.d_hidden,
            "num_local_experts": config.moe.num_experts,
            "head_dim": config.head_dim,
            "sliding_window": None,
            "router_jitter_noise": 0.0,
        }

    def tables(self, config, hf):
        return {
            "per_expert": DECODER + per_expert("block_sparse_moe", "w1", "w3", "w2"),
            "fused": DECODER + FUSED_EXPERTS,
        }
