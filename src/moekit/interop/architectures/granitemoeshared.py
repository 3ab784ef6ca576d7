"""IBM Granite MoE with a shared expert (model_type granitemoeshared): GraniteMoE (Shen et
al. 2024, "Power Scheduler", arXiv:2408.13359) plus an always-on shared MLP.

Mixtral's decoder (mixtral.py) with:
    multipliers  embeddings times embedding_multiplier; each block adds its attention and
                 FFN outputs times residual_multiplier; attention_multiplier is the softmax
                 scale (in place of 1/sqrt(head_dim)); logits divided by logits_scaling ->
                 the ModelConfig fields of those names. transformers' default
                 attention_multiplier is 1.0, not 1/sqrt(head_dim); a value equal to
                 head_dim ** -0.5 reads as moekit's None and None writes that value, so
                 both round trips are exact.
    router       `block_sparse_moe.router` (E, D), no bias: top-k of the logits, then a
                 softmax over those k -> softmax_topk, renormalised (the same weights as
                 softmax over all E, top-k, divided by their sum: see gpt_oss.py and
                 tests/test_moe_reference.py)
    experts      SwiGLU, fused: (E, 2F, D) with the gate rows first, then up (the halves
                 moekit keeps, transposed), and (E, D, F)
    shared       `shared_mlp.input_linear` (2S, D) [gate; up] and `output_linear` (D, S),
                 a SwiGLU of width shared_intermediate_size (0 = none), added to the routed
                 output with no gate -> one shared expert of that width, shared_expert_gate
                 false (moekit's N shared experts of width S are written as one of N * S,
                 the same function)
    attention    one attention_bias switch for q/k/v and o_proj; head_dim, when the
                 config.json names it, is honoured by transformers' attention
Every layer is MoE; default rotary only. On disk, save_pretrained writes the original
checkpoints' names (`block_sparse_moe.input_linear.weight`, `.output_linear.weight`,
`.router.layer.weight`, the "checkpoint" layout); transformers renames them on load to the
in-memory `experts.gate_up_proj`, `experts.down_proj`, `router.weight` (the "fused" layout,
read too and used for PEFT's names).

No published flagship: the one public checkpoint of this model_type that could be found is
ibm-research/moe-7b-1b-active-shared-experts (named in transformers' granitemoeshared docs,
tagged granitemoeshared on the Hugging Face Hub), but its config.json values and parameter
counts could not be read here, so nothing is counted rather than a config invented. Granite
4.0's MoEs (granite-4.0-tiny-preview, -h-small, ...) are model_type granitemoehybrid.
"""

from __future__ import annotations

from ...models import ModelConfig
from ...routing import SoftmaxTopK, router_class
from .base import (
    STRUCTURE,
    Architecture,
    dense_layer_indices,
    gqa_model_config,
    gqa_problems,
    moe_config,
    one_attention_bias,
    refuse_gqa_options,
)
from .rules import DECODER, LAYER, TRANSPOSE_EXPERTS, Rule

_MOE = f"{LAYER}.block_sparse_moe"
_SHARED = (
    Rule("layers.{i}.ffn.shared.up.weight", (f"{LAYER}.shared_mlp.input_linear.weight",)),
    Rule("layers.{i}.ffn.shared.down.weight", (f"{LAYER}.shared_mlp.output_linear.weight",)),
)
TABLES = {
    # the original checkpoints' names, which save_pretrained writes
    "checkpoint": DECODER
    + _SHARED
    + (
        Rule("layers.{i}.ffn.router.weight", (f"{_MOE}.router.layer.weight",)),
        Rule("layers.{i}.ffn.experts.w_up", (f"{_MOE}.input_linear.weight",), TRANSPOSE_EXPERTS),
        Rule("layers.{i}.ffn.experts.w_down", (f"{_MOE}.output_linear.weight",), TRANSPOSE_EXPERTS),
    ),
    # transformers' in-memory names
    "fused": DECODER
    + _SHARED
    + (
        Rule("layers.{i}.ffn.router.weight", (f"{_MOE}.router.weight",)),
        Rule("layers.{i}.ffn.experts.w_up", (f"{_MOE}.experts.gate_up_proj",), TRANSPOSE_EXPERTS),
        Rule("layers.{i}.ffn.experts.w_down", (f"{_MOE}.experts.down_proj",), TRANSPOSE_EXPERTS),
    ),
}
_FUSED_MARKER = ".block_sparse_moe.experts.gate_up_proj"
MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "logits_scaling")


class GraniteMoeShared(Architecture):
    name = "granitemoeshared"
    hf_class = "GraniteMoeSharedForCausalLM"
    priority = 8
    written_layout = "checkpoint"
    # transformers 5.25's GraniteMoeSharedConfig defaults
    defaults = dict(
        intermediate_size=11008,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        embedding_multiplier=1.0,
        logits_scaling=1.0,
        residual_multiplier=1.0,
        attention_multiplier=1.0,
        num_local_experts=8,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.001,
        shared_intermediate_size=0,
    )
    # every multiplier away from 1 (attention_multiplier away from 1/sqrt(head_dim)),
    # attention biases, tied embeddings, a shared expert wider than the routed ones
    tiny = dict(
        intermediate_size=16,
        shared_intermediate_size=24,
        num_local_experts=4,
        num_experts_per_tok=2,
        attention_bias=True,
        tie_word_embeddings=True,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=0.2,
        logits_scaling=4.0,
    )

    def to_moekit(self, hf: dict) -> ModelConfig:
        hf = self.read(hf)
        hf.require(STRUCTURE)
        refuse_gqa_options(hf)
        rope_theta, _ = hf.rope()
        scales = {key: hf.get(key) for key in (*MULTIPLIERS, "attention_multiplier")}
        for key, value in scales.items():
            if not (isinstance(value, (int, float)) and value > 0):
                hf.refuse(f"{key} {value!r} (moekit's multipliers are numbers > 0)")
        hf.check()
        shared = hf.get("shared_intermediate_size")
        moe = moe_config(
            hf,
            d_hidden=hf.get("intermediate_size"),
            num_experts=hf.get("num_local_experts"),
            renormalize=True,
            num_shared_experts=1 if shared else 0,
            d_shared_hidden=shared or None,
        )
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        attention = float(scales["attention_multiplier"])
        bias = bool(hf.get("attention_bias"))
        return gqa_model_config(
            hf,
            moe,
            rope_theta,
            qkv_bias=bias,
            attn_out_bias=bias,
            attention_multiplier=None if attention == head_dim**-0.5 else attention,
            **{key: float(scales[key]) for key in MULTIPLIERS},
        )

    def inexpressible(self, config: ModelConfig) -> list[str]:
        moe = config.moe
        problems = gqa_problems(config, self.name, multipliers=True) + one_attention_bias(config)
        if dense_layer_indices(config):
            problems.append(f"dense layers {dense_layer_indices(config)} (every layer is MoE)")
        softmax_topk = router_class(moe.router) is SoftmaxTopK
        if softmax_topk and not moe.renormalize:
            problems.append("renormalize false (the softmax over the top-k logits sums to 1)")
        if softmax_topk and (moe.num_groups != 1 or moe.routed_scaling != 1.0):
            problems.append(
                f"num_groups {moe.num_groups} with routed_scaling {moe.routed_scaling} "
                f"({self.name} routes over all experts, unscaled)"
            )
        if moe.num_shared_experts and moe.shared_expert_gate:
            problems.append("shared_expert_gate true (the shared MLP is added ungated)")
        return problems

    def hf_keys(self, config: ModelConfig) -> dict:
        moe = config.moe
        attention = config.attention_multiplier
        return {
            "intermediate_size": moe.d_hidden,
            "num_local_experts": moe.num_experts,
            "shared_intermediate_size": moe.shared_hidden,
            "head_dim": config.head_dim,
            "attention_bias": config.qkv_bias,
            "embedding_multiplier": config.embedding_multiplier,
            "residual_multiplier": config.residual_multiplier,
            "attention_multiplier": config.head_dim**-0.5 if attention is None else attention,
            "logits_scaling": config.logits_scaling,
        }

    def tables(self, config, hf):
        return TABLES

    def stored_layout(self, hf: dict, tensor_names) -> str:
        fused = any(name.endswith(_FUSED_MARKER) for name in tensor_names)
        return "fused" if fused else "checkpoint"
