"""Phi-3.5-MoE (model_type phimoe): Microsoft 2024, Phi-3.5-MoE-instruct, in Abdin et al.,
"Phi-3 Technical Report" (arXiv:2404.14219); its router is GRIN's SparseMixer (Liu et al.
2024, arXiv:2409.12136).

Mixtral's decoder (mixtral.py) with:
    norms      LayerNorms with biases for the block and final norms (eps rms_norm_eps)
               -> ModelConfig.norm "layer"
    attention  one attention_bias switch for q/k/v and the output projection
               -> qkv_bias and attn_out_bias; head_dim read and written when given
    head       lm_head_bias -> ModelConfig.lm_head_bias
    router     SparseMixer, always top-2 (transformers ignores num_experts_per_tok), with
               router_jitter_noise its mask threshold -> router "sparsemixer",
               MoEConfig.jitter_eps; evaluation routing equals transformers' exactly
    experts    Mixtral's SwiGLU experts; every layer MoE, no shared expert
Refused: rope types other than default (the published models use LongRoPE, "longrope",
with per-frequency short/long factors and mscales, which moekit does not implement), a
sliding_window shorter than max_position_embeddings, input_jitter_noise (a training-only
multiplicative jitter U(1 - eps, 1 + eps) of the MoE input that moekit does not have;
refused, as Mixtral's identical router_jitter_noise is, so that a fine-tune neither drops
it silently nor writes it back as 0), and num_experts_per_tok other than 2.

On disk, save_pretrained writes Mixtral's names (`block_sparse_moe.gate`,
`block_sparse_moe.experts.{e}.w1/w2/w3`); in memory transformers holds `mlp.router` and
the fused `mlp.experts.gate_up_proj` / `down_proj`, which PEFT adapts.
"""

from __future__ import annotations

from ...models import ModelConfig
from ...routing import SparseMixer, router_class
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
    refuse_common,
)
from .rules import DECODER, LAYER, TRANSPOSE_EXPERTS, Rule, per_expert

# transformers' sparsemixer picks two experts whatever num_experts_per_tok says
_TOP_K = 2

# microsoft/Phi-3.5-MoE-instruct's config.json (transformers 4.43.3), as the Hub holds it;
# transcribed key by key in github.com/xinyuwei-david/david-share,
# Deep-Learning/Phi-3.5-MoE-and-Mini-Fine-tuning/README.md, and matching transformers'
# PhimoeConfig defaults (its docstring's checkpoint). rope_scaling is LongRoPE; its 64
# short_factor / long_factor entries and the two mscales are left out here (parameters
# do not depend on them).
PHI_3_5_MOE_INSTRUCT = {
    "architectures": ["PhiMoEForCausalLM"],
    "model_type": "phimoe",
    "attention_bias": True,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "hidden_dropout": 0.0,
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "input_jitter_noise": 0.01,
    "intermediate_size": 6400,
    "lm_head_bias": True,
    "max_position_embeddings": 131072,
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 16,
    "original_max_position_embeddings": 4096,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"type": "longrope", "original_max_position_embeddings": 4096},
    "rope_theta": 10000.0,
    "router_aux_loss_coef": 0.0,
    "router_jitter_noise": 0.01,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 32064,
    "bos_token_id": 1,
    "eos_token_id": 32000,
}


def phi_3_5_moe() -> ModelConfig:
    """Phi-3.5-MoE-instruct as phimoe converts it, for counting: its config.json with the
    LongRoPE scaling and input_jitter_noise removed (both refused by to_moekit; neither
    changes a parameter)."""
    hf = dict(PHI_3_5_MOE_INSTRUCT, input_jitter_noise=0.0)
    del hf["rope_scaling"]
    return Phimoe().to_moekit(hf)


_MLP = f"{LAYER}.mlp"
# the LayerNorms' biases and the head's bias, beside DECODER's weights
_BIASES = (
    Rule("norm.bias", ("model.norm.bias",)),
    Rule("layers.{i}.attn_norm.bias", (f"{LAYER}.input_layernorm.bias",)),
    Rule("layers.{i}.ffn_norm.bias", (f"{LAYER}.post_attention_layernorm.bias",)),
    Rule("lm_head.bias", ("lm_head.bias",)),
)
TABLES = {
    "per_expert": DECODER + _BIASES + per_expert("block_sparse_moe", "w1", "w3", "w2"),
    # transformers' in-memory names: the router is `mlp.router`, the experts fused
    "fused": DECODER
    + _BIASES
    + (
        Rule("layers.{i}.ffn.router.weight", (f"{_MLP}.router.weight",)),
        Rule("layers.{i}.ffn.experts.w_up", (f"{_MLP}.experts.gate_up_proj",), TRANSPOSE_EXPERTS),
        Rule("layers.{i}.ffn.experts.w_down", (f"{_MLP}.experts.down_proj",), TRANSPOSE_EXPERTS),
    ),
}


class Phimoe(Architecture):
    name = "phimoe"
    hf_class = "PhimoeForCausalLM"
    aliases = {"num_local_experts": "num_experts"}
    priority = 11
    # transformers 5.25's PhimoeConfig defaults (default_theta 1e6)
    defaults = dict(
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        num_local_experts=16,
        num_experts_per_tok=2,
        router_jitter_noise=0.01,
        input_jitter_noise=0.0,
        router_aux_loss_coef=0.001,
        attention_bias=False,
        lm_head_bias=False,
        tie_word_embeddings=False,
        initializer_range=0.02,
    )
    # biases everywhere they can be; a wide jitter threshold (0.4: on the suite's input
    # about a third of the weights are below 1, so the masked softmax matters); a window
    # as long as the positions (accepted: it masks nothing)
    tiny = dict(
        intermediate_size=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        attention_bias=True,
        lm_head_bias=True,
        router_jitter_noise=0.4,
        sliding_window=64,
    )
    flagships = {"phi_3_5_moe": phi_3_5_moe}
    published = {
        "phi_3_5_moe": Published(
            41.9e9,
            6.6e9,
            "Abdin et al., 'Phi-3 Technical Report' (arXiv:2404.14219, Aug 2024 revision): "
            "6.6B active; Microsoft, Phi-3.5-MoE-instruct on the Hugging Face Hub: 41.9B",
        )
    }

    def to_moekit(self, hf: dict) -> ModelConfig:
        hf = self.read(hf)
        hf.require((*STRUCTURE, "intermediate_size", "num_local_experts"))
        refuse_common(hf)
        hf.refuse_set("input_jitter_noise")
        top_k, jitter = hf.get("num_experts_per_tok"), hf.get("router_jitter_noise")
        if top_k != _TOP_K:
            hf.refuse(
                f"num_experts_per_tok {top_k} (transformers' phimoe router always picks "
                f"{_TOP_K} experts)"
            )
        if not 0 < jitter < 1:
            hf.refuse(f"router_jitter_noise {jitter} (moekit's sparsemixer reads (0, 1))")
        window = hf.get("sliding_window")
        if window is not None and window < hf.get("max_position_embeddings"):
            hf.refuse(f"sliding_window {window} (shorter than max_position_embeddings)")
        rope = hf.hf.get("rope_parameters") or hf.hf.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            hf.refuse(
                f"rope type {kind!r} (moekit reads phimoe's default rotary only; LongRoPE's "
                "per-frequency short/long factors and mscales are not implemented)"
            )
        rope_theta = float(rope.get("rope_theta") or hf.get("rope_theta"))
        hf.check()
        moe = moe_config(
            hf,
            d_hidden=hf["intermediate_size"],
            num_experts=hf["num_local_experts"],
            top_k=top_k,
            router="sparsemixer",
            jitter_eps=float(jitter),
            renormalize=False,  # each weight is its own stage's masked probability
        )
        bias = bool(hf.get("attention_bias"))
        return gqa_model_config(
            hf,
            moe,
            rope_theta,
            qkv_bias=bias,
            attn_out_bias=bias,
            norm="layer",
            lm_head_bias=bool(hf.get("lm_head_bias")),
        )

    def inexpressible(self, config: ModelConfig) -> list[str]:
        moe = config.moe
        problems = gqa_problems(
            config, self.name, router="sparsemixer", norm="layer", lm_head_bias=True
        )
        if router_class(moe.router) is SparseMixer and moe.top_k != _TOP_K:
            problems.append(f"top_k {moe.top_k} (phimoe's sparsemixer picks {_TOP_K})")
        problems += no_shared_expert(config) + one_attention_bias(config)
        if dense_layer_indices(config):
            problems.append(
                f"dense layers {dense_layer_indices(config)} (every phimoe layer is MoE)"
            )
        if config.mtp_depth:
            problems.append(f"mtp_depth {config.mtp_depth} (phimoe has no MTP layers)")
        return problems

    def hf_keys(self, config: ModelConfig) -> dict:
        return {
            "intermediate_size": config.moe.d_hidden,
            "num_local_experts": config.moe.num_experts,
            "head_dim": config.head_dim,
            "attention_bias": config.qkv_bias,
            "lm_head_bias": config.lm_head_bias,
            "router_jitter_noise": config.moe.jitter_eps,
            "input_jitter_noise": 0.0,
            "sliding_window": None,
        }

    def tables(self, config, hf):
        return TABLES
