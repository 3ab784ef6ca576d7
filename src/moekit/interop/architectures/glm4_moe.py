"""GLM-4.5 MoE (model_type glm4_moe): Zhipu AI / Z.ai 2025, "GLM-4.5: Agentic, Reasoning,
and Coding (ARC) Foundation Models" (arXiv:2508.06471); GLM-4.5, GLM-4.5-Air (also 4.6, 4.7).

# R rotary dims of a head, Dh head dim

A pre-norm decoder (RMSNorm) with grouped-query attention whose head_dim is set apart;
attention_bias adds biases to q, k and v only (the output projection has none ->
qkv_bias, never attn_out_bias); use_qk_norm is an RMSNorm over each head of q and k
(qk_norm "head"). Partial rotary: the first R = Dh * partial_rotary_factor (default 0.5)
dims of each head are rotated in the rotate-half layout, the rest passed (rotary_dim R).

The FFN is DeepSeek-V3's (deepseek_v3.py): the first first_k_dense_replace layers dense
(intermediate_size), every later one MoE with n_routed_experts of width
moe_intermediate_size and n_shared_experts ungated shared experts of that width. Routing:
sigmoid scores plus e_score_correction_bias for the selection only, n_group groups scored
by the sum of their two best biased scores, topk_group kept, weights renormalised when
norm_topk_prob and times routed_scaling_factor -> moekit's sigmoid_topk; the bias is the
router's `bias` buffer (mlp.gate.e_score_correction_bias). transformers has no balance loss
for it (balance_loss_coef 0).

Multi-token prediction: the checkpoints store num_nextn_predict_layers MTP layers after the
last decoder layer, in DeepSeek-V3's layout (model.layers.{L + k}: a decoder layer plus
enorm, hnorm, eh_proj, shared_head.norm and copies of the embedding and head).
transformers skips them, and so does load_hf by default; with mtp=True they become
moekit's mtp.{k} (models/mtp.py), and save_hf writes a model's MTP modules there.

Refused: a rotary width that is odd or zero, rope types other than default and YaRN, no
shared expert, groups of one expert, hidden_act other than silu, attention dropout, the
original code's topk_method / scoring_func at other values, quantized checkpoints.
"""

from __future__ import annotations

import dataclasses

from ...models import ModelConfig
from .base import (
    STRUCTURE,
    Architecture,
    Published,
    common_keys,
    expect,
    gqa_model_config,
    moe_config,
    refuse_common,
    trailing_layers,
)
from .deepseek_v2 import ffn_layout_problems
from .deepseek_v3 import mtp_rules
from .rules import DECODER, FUSE_GLU, FUSED_EXPERTS, LAYER, PER_EXPERT, Rule

# GLM-4.5's config.json, the keys moekit reads: the structural sizes as NVIDIA's Megatron-Bridge
# GLM 4.5 page gives them; head_dim, partial_rotary_factor, attention_bias and rope_theta as
# in the identically shaped GLM-4.7 config.json on the Hugging Face Hub.
GLM_4_5 = {
    "model_type": "glm4_moe",
    "vocab_size": 151552,
    "hidden_size": 5120,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 92,
    "num_attention_heads": 96,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "partial_rotary_factor": 0.5,
    "attention_bias": True,
    "use_qk_norm": True,
    "n_routed_experts": 160,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 3,
    "num_nextn_predict_layers": 1,
    "max_position_embeddings": 131072,
    "rope_theta": 1000000,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
}
# GLM-4.5-Air's config.json (sources as above; the remaining keys as in Air-shaped fine-tunes
# on the Hub, e.g. PrimeIntellect/INTELLECT-3-Base): narrower and half as deep, no q/k norm.
GLM_4_5_AIR = GLM_4_5 | {
    "hidden_size": 4096,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 46,
    "use_qk_norm": False,
    "n_routed_experts": 128,
    "routed_scaling_factor": 1.0,
    "first_k_dense_replace": 1,
}
# The keys of the original (remote) code, which transformers ignores: accepted at the
# values transformers computes anyway.
ORIGINAL_CODE = dict(scoring_func="sigmoid", topk_method="noaux_tc")


def glm_4_5() -> ModelConfig:
    """GLM-4.5 (355B total / 32B active), its config.json (GLM_4_5), MTP layer not loaded."""
    return Glm4Moe().to_moekit(GLM_4_5)


def glm_4_5_air() -> ModelConfig:
    """GLM-4.5-Air (106B / 12B), its config.json (GLM_4_5_AIR), MTP layer not loaded."""
    return Glm4Moe().to_moekit(GLM_4_5_AIR)


_PAPER = "Z.ai, GLM-4.5: Agentic, Reasoning, and Coding (ARC) Foundation Models (arXiv:2508.06471)"


class Glm4Moe(Architecture):
    name = "glm4_moe"
    hf_class = "Glm4MoeForCausalLM"
    priority = 9
    shared_as_parameters = True  # PEFT: transformers converts glm4_moe as DeepSeek's
    aliases = {
        "n_routed_experts": "num_local_experts",
        "num_nextn_predict_layers": "num_mtp_layers",
    }
    # transformers' Glm4MoeConfig defaults
    defaults = dict(
        rope_theta=1e4,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        partial_rotary_factor=0.5,
        n_routed_experts=128,
        n_shared_experts=1,
        routed_scaling_factor=1.0,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        num_nextn_predict_layers=1,
    )
    # layer 0 dense; head_dim 12 apart from hidden / heads, 6 of its dims rotated (the
    # default factor 0.5); q/k/v biases and q/k norms; 4 groups of 2 experts, 2 kept; two
    # shared experts; weights renormalised and scaled by 2.5
    tiny = dict(
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        head_dim=12,
        attention_bias=True,
        use_qk_norm=True,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
    )
    # The published totals leave the MTP layer out (the paper's Table 1 lists it apart):
    # with it GLM-4.5-Air would count 109.2B, not 106B. The active figures match the count
    # without both embedding matrices (32.1B, 12.2B), which Published cannot say; the
    # counts without the input table are 32.9B and 12.8B (tests/test_interop_glm4_moe.py).
    flagships = {"glm_4_5": glm_4_5, "glm_4_5_air": glm_4_5_air}
    published = {
        "glm_4_5": Published(
            355e9, 32e9, f"{_PAPER}, abstract", active_without_input_embedding=True
        ),
        "glm_4_5_air": Published(
            106e9,
            12e9,
            "Z.ai, zai-org/GLM-4.5-Air model card (Hugging Face Hub, 28 Jul 2025)",
            active_without_input_embedding=True,
        ),
    }

    # ------------------------------------------------------------ config.json

    def to_moekit(self, hf: dict) -> ModelConfig:
        hf = self.read(hf)
        hf.require((*STRUCTURE, "intermediate_size", "moe_intermediate_size"))
        refuse_common(hf)
        for key, value in ORIGINAL_CODE.items():
            if key in hf.hf and hf[key] != value:
                hf.refuse(f"{key} {hf[key]!r} ({self.name} has {value!r})")
        if hf.get("n_shared_experts") < 1:
            hf.refuse(f"n_shared_experts {hf.get('n_shared_experts')} (at least one)")
        num_groups, topk_groups = hf.get("n_group"), hf.get("topk_group")
        if hf["n_routed_experts"] // num_groups < 2 or topk_groups > num_groups:
            hf.refuse(
                f"n_group {num_groups} with topk_group {topk_groups} (groups of at least two "
                f"of the {hf['n_routed_experts']} experts, at most n_group kept)"
            )
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        rotary = int(head_dim * hf.partial_rotary_factor())  # transformers' truncation
        if rotary < 2 or rotary % 2:
            hf.refuse(
                f"partial_rotary_factor {hf.partial_rotary_factor()} (rotates {rotary} of "
                f"{head_dim} dims; moekit needs an even number)"
            )
        rope_theta, rope_scaling = hf.rope(kinds=("default", "yarn"))
        hf.check()
        moe = moe_config(
            hf,
            d_hidden=hf["moe_intermediate_size"],
            num_experts=hf["n_routed_experts"],
            router="sigmoid_topk",
            renormalize=bool(hf.get("norm_topk_prob")),
            num_groups=num_groups,
            topk_groups=topk_groups,
            routed_scaling=float(hf.get("routed_scaling_factor")),
            num_shared_experts=hf.get("n_shared_experts"),
            d_shared_hidden=hf["moe_intermediate_size"],
            balance_loss_coef=0.0,
        )
        return gqa_model_config(
            hf,
            moe,
            rope_theta,
            head_dim=head_dim,
            qkv_bias=bool(hf.get("attention_bias", False)),
            qk_norm="head" if hf.get("use_qk_norm", False) else None,
            rotary_dim=None if rotary == head_dim else rotary,
            rope_scaling=rope_scaling,
            d_hidden=hf["intermediate_size"],
            first_dense_layers=hf.get("first_k_dense_replace"),
        )

    def inexpressible(self, config: ModelConfig) -> list[str]:
        moe = config.moe
        problems = expect(config, self.name, router="sigmoid_topk", groups=True, rotary_dim=True)
        if config.qk_norm not in (None, "head"):
            problems.append(f"qk_norm {config.qk_norm!r} ({self.name} has None or 'head')")
        if config.attn_out_bias:
            problems.append(f"attn_out_bias true ({self.name} has q/k/v biases only)")
        if moe.router_bias or moe.expert_bias:
            problems.append(f"router_bias {moe.router_bias}, expert_bias {moe.expert_bias}")
        problems += ffn_layout_problems(config, self.name)
        if moe.num_experts // moe.num_groups < 2:
            problems.append(f"num_groups {moe.num_groups} (groups of one expert cannot be scored)")
        rotary = config.rotary_dim or config.head_dim
        if int(config.head_dim * (rotary / config.head_dim)) != rotary:
            problems.append(f"rotary_dim {rotary} (not a factor of head_dim {config.head_dim})")
        return problems

    def hf_keys(self, config: ModelConfig) -> dict:
        moe = config.moe
        return {
            "intermediate_size": config.d_hidden,
            "moe_intermediate_size": moe.d_hidden,
            "head_dim": config.head_dim,
            "attention_bias": config.qkv_bias,
            "use_qk_norm": config.qk_norm == "head",
            "n_routed_experts": moe.num_experts,
            "n_shared_experts": moe.num_shared_experts,
            "n_group": moe.num_groups,
            "topk_group": moe.topk_groups,
            "norm_topk_prob": moe.renormalize,
            "routed_scaling_factor": moe.routed_scaling,
            "first_k_dense_replace": config.first_dense_layers,
            "num_nextn_predict_layers": config.mtp_depth,
        }

    def to_hf(self, config: ModelConfig, dtype: str) -> dict:
        out = common_keys(self, config, dtype) | self.hf_keys(config)
        del out["router_aux_loss_coef"]  # no balance loss in transformers' glm4_moe
        rotary = config.rotary_dim or config.head_dim
        out["rope_parameters"]["partial_rotary_factor"] = rotary / config.head_dim
        return out

    def load_options(self, config: ModelConfig, hf: dict, *, mtp: bool) -> ModelConfig:
        if not mtp:
            return config
        depth = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 1))
        return dataclasses.replace(config, mtp_depth=depth or 0)

    def unloaded_prefixes(self, hf: dict) -> tuple[str, ...]:
        """The MTP layers, stored after the last decoder layer (transformers does not load
        them either)."""
        return trailing_layers(hf, hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 1)))

    # ------------------------------------------------------------ tensors

    def tables(self, config: ModelConfig, hf: dict) -> dict[str, tuple[Rule, ...]]:
        mlp = f"{LAYER}.mlp"
        moe = (
            Rule("layers.{i}.ffn.router.bias", (f"{mlp}.gate.e_score_correction_bias",)),
            Rule(
                "layers.{i}.ffn.shared.up.weight",
                (f"{mlp}.shared_experts.gate_proj.weight", f"{mlp}.shared_experts.up_proj.weight"),
                FUSE_GLU,
            ),
            Rule("layers.{i}.ffn.shared.down.weight", (f"{mlp}.shared_experts.down_proj.weight",)),
        )
        tables = {
            "per_expert": DECODER + moe + PER_EXPERT,
            "fused": DECODER + moe + FUSED_EXPERTS,
        }
        return {layout: mtp_rules(config, rules) + rules for layout, rules in tables.items()}
