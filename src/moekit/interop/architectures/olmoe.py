"""OLMoE (model_type olmoe): Muennighoff et al. 2024, "OLMoE" (arXiv:2409.02060).

Mixtral's decoder (mixtral.py) with an RMSNorm over the whole q and k projections (so
head_dim must be hidden_size / heads), norm_topk_prob, one attention_bias and clip_qkv
(refused when set); every layer MoE, no shared expert.
"""

from __future__ import annotations

from ...models import ModelConfig
from ...models.published import olmoe_1b_7b
from .base import (
    STRUCTURE,
    Architecture,
    Published,
    dense_layer_indices,
    gqa_model_config,
    gqa_problems,
    moe_config,
    no_shared_expert,
    one_attention_bias,
    refuse_gqa_options,
)
from .rules import DECODER, FUSED_EXPERTS, PER_EXPERT


class Olmoe(Architecture):
    name = "olmoe"
    hf_class = "OlmoeForCausalLM"
    aliases = {"num_experts": "num_local_experts"}
    priority = 3
    defaults = dict(rope_theta=1e4, rms_norm_eps=1e-5, max_position_embeddings=4096)
    tiny = dict(intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    flagships = {"olmoe_1b_7b": olmoe_1b_7b}
    published = {
        "olmoe_1b_7b": Published(6.9e9, 1.3e9, "Muennighoff et al. 2024, OLMoE (arXiv:2409.02060)")
    }

    def to_moekit(self, hf: dict) -> ModelConfig:
        hf = self.read(hf)
        hf.require((*STRUCTURE, "intermediate_size", "num_experts"))
        refuse_gqa_options(hf)
        head_dim = hf.get("head_dim")
        if head_dim not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
            hf.refuse(f"head_dim {head_dim} (OLMoE's q/k norm widths assume hidden/heads)")
        rope_theta, _ = hf.rope()
        hf.check()
        moe = moe_config(
            hf,
            d_hidden=hf["intermediate_size"],
            num_experts=hf["num_experts"],
            renormalize=bool(hf.get("norm_topk_prob", False)),
        )
        bias = bool(hf.get("attention_bias", False))
        return gqa_model_config(
            hf, moe, rope_theta, qkv_bias=bias, attn_out_bias=bias, qk_norm="full"
        )

    def inexpressible(self, config: ModelConfig) -> list[str]:
        problems = gqa_problems(config, self.name, qk_norm="full") + no_shared_expert(config)
        if dense_layer_indices(config):
            problems.append(f"dense layers {dense_layer_indices(config)}")
        problems += one_attention_bias(config)
        if config.head_dim * config.num_heads != config.d_model:
            problems.append(f"head_dim {config.head_dim} (OLMoE needs d_model / num_heads)")
        return problems

    def hf_keys(self, config: ModelConfig) -> dict:
        return {
            "intermediate_size": config.moe.d_hidden,
            "num_experts": config.moe.num_experts,
            "norm_topk_prob": config.moe.renormalize,
            "attention_bias": config.qkv_bias,
            "clip_qkv": None,
        }

    def tables(self, config, hf):
        return {"per_expert": DECODER + PER_EXPERT, "fused": DECODER + FUSED_EXPERTS}
