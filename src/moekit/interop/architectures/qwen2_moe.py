"""Qwen2-MoE (model_type qwen2_moe): Qwen1.5-MoE and Qwen2-57B-A14B.

Mixtral's decoder (mixtral.py) with q/k/v biases; a shared expert of its own width
scaled by sigmoid(x . w) beside the routed ones; norm_topk_prob (renormalise or not);
dense layers chosen by decoder_sparse_step and mlp_only_layers (Qwen3-MoE reuses these,
qwen3_moe.py).
"""

from __future__ import annotations

from ...models import ModelConfig
from ...models.published import qwen1_5_moe_a2_7b
from .base import (
    STRUCTURE,
    Architecture,
    HFConfig,
    Published,
    gqa_model_config,
    gqa_problems,
    moe_config,
    refuse_gqa_options,
)
from .rules import DECODER, FUSED_EXPERTS, PER_EXPERT, SHARED_EXPERT


def read_qwen(hf: HFConfig, required=(), **moe_fields) -> tuple[float, dict]:
    """The Qwen-MoE families' shared reading: rope_theta, and the ModelConfig fields of
    their dense layers and MoE settings."""
    hf.require((*STRUCTURE, "moe_intermediate_size", *required, "intermediate_size", "num_experts"))
    refuse_gqa_options(hf)
    rope_theta, _ = hf.rope()
    hf.check()
    moe = moe_config(
        hf,
        d_hidden=hf["moe_intermediate_size"],
        num_experts=hf["num_experts"],
        renormalize=bool(hf.get("norm_topk_prob", False)),
        **moe_fields,
    )
    return rope_theta, dict(
        moe=moe,
        d_hidden=hf["intermediate_size"],
        moe_every=hf.get("decoder_sparse_step", 1),
        dense_layers=list(hf.get("mlp_only_layers", [])),
    )


def qwen_layer_keys(config: ModelConfig) -> dict:
    """The Qwen-MoE config.json keys: the MoE layers as decoder_sparse_step + mlp_only_layers."""
    moe_layers = set(config.moe_layers)
    step = config.moe_every if config.first_dense_layers == 0 else 1
    dense = sorted(
        i for i in range(config.num_layers) if (i + 1) % step == 0 and i not in moe_layers
    )
    return {
        "intermediate_size": config.d_hidden,
        "moe_intermediate_size": config.moe.d_hidden,
        "num_experts": config.moe.num_experts,
        "norm_topk_prob": config.moe.renormalize,
        "decoder_sparse_step": step,
        "mlp_only_layers": dense,
        "head_dim": config.head_dim,
        "use_sliding_window": False,
        "sliding_window": None,
    }


class Qwen2Moe(Architecture):
    name = "qwen2_moe"
    hf_class = "Qwen2MoeForCausalLM"
    aliases = {"num_experts": "num_local_experts"}
    priority = 1
    defaults = dict(rope_theta=1e4, rms_norm_eps=1e-6, max_position_embeddings=32768, qkv_bias=True)
    # layer 1 dense (mlp_only_layers); no renormalisation of the top-k weights
    tiny = dict(
        intermediate_size=40,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
        norm_topk_prob=False,
    )
    flagships = {"qwen1_5_moe_a2_7b": qwen1_5_moe_a2_7b}
    published = {
        "qwen1_5_moe_a2_7b": Published(
            14.3e9,
            2.7e9,
            "Qwen team, 'Qwen1.5-MoE: Matching 7B Model Performance with 1/3 Activated "
            "Parameters' (28 Mar 2024)",
        )
    }

    def to_moekit(self, hf: dict) -> ModelConfig:
        hf = self.read(hf)
        rope_theta, fields = read_qwen(
            hf,
            ("shared_expert_intermediate_size",),
            num_shared_experts=1,
            d_shared_hidden=hf.get("shared_expert_intermediate_size"),
            shared_expert_gate=True,
        )
        return gqa_model_config(
            hf, qkv_bias=bool(hf.get("qkv_bias")), rope_theta=rope_theta, **fields
        )

    def inexpressible(self, config: ModelConfig) -> list[str]:
        moe, problems = config.moe, gqa_problems(config, self.name)
        if config.attn_out_bias:
            problems.append("attn_out_bias true")
        if not moe.num_shared_experts or not moe.shared_expert_gate:
            problems.append(
                f"num_shared_experts {moe.num_shared_experts} with shared_expert_gate "
                f"{moe.shared_expert_gate} (qwen2_moe has one gated shared expert)"
            )
        return problems

    def hf_keys(self, config: ModelConfig) -> dict:
        return qwen_layer_keys(config) | {
            "shared_expert_intermediate_size": config.moe.shared_hidden,
            "qkv_bias": config.qkv_bias,
        }

    def tables(self, config, hf):
        return {
            "per_expert": DECODER + PER_EXPERT + SHARED_EXPERT,
            "fused": DECODER + FUSED_EXPERTS + SHARED_EXPERT,
        }
