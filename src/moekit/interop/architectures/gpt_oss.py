"""gpt-oss (model_type gpt_oss): OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card"
(arXiv:2508.10925).

A pre-norm decoder like Mixtral's, with:
    attention  q/k/v and output biases (attention_bias), one learned sink logit per head,
               layer_types alternating sliding_attention (window sliding_window) and
               full_attention -> ModelConfig attention "sinks", sliding_window,
               sliding_layers
    rotary     YaRN -> ModelConfig.rope_scaling; the published models use truncate false
    router     a linear layer with a bias; top-k of the logits, softmax over those k ->
               softmax_topk with renormalize and router_bias (the same weights: see
               tests/test_moe_reference.py)
    experts    biases on both projections and the clamped SwiGLU (swiglu_alpha,
               swiglu_limit) -> expert_bias, activation "swiglu_clamped"
hidden_act is not read by transformers' gpt-oss experts, so it is not either. There is no
per-expert layout: the experts are stored fused, gate_up_proj (E, D, 2F) with the gate and
up columns interleaved (gate at even, up at odd; moekit keeps halves, so the table permutes
them), down_proj (E, F, D), plus their biases; the published checkpoints store the two
matrices in MXFP4 (interop/mxfp4.py), as their quantization_config says: `quantization`
reads it for the loader.
"""

from __future__ import annotations

from ...models import ModelConfig
from ...models.published import gpt_oss_20b, gpt_oss_120b
from ...routing import SoftmaxTopK, router_class
from .base import (
    Architecture,
    Published,
    decoder_options,
    dense_layer_indices,
    gqa_model_config,
    moe_config,
    no_shared_expert,
    one_attention_bias,
    rope_parameters,
)
from .rules import (
    DECODER,
    DEINTERLEAVE_GLU,
    LAYER,
    MXFP4_EXPERTS,
    MXFP4_GLU_EXPERTS,
    Rule,
)

_DEFAULT_ROPE = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}
_QUANT_METHODS = ("mxfp4",)
# The model card's Table 1; its active count leaves out the input embedding (it counts the
# unembedding): 5.13B = 4.55B of active transformer blocks + 0.58B of output head.
_CARD = "OpenAI, 'gpt-oss-120b & gpt-oss-20b Model Card' (arXiv:2508.10925), Table 1"
_MLP = f"{LAYER}.mlp"
_GPT_OSS = DECODER + (
    Rule("layers.{i}.attn.sinks", (f"{LAYER}.self_attn.sinks",)),
    Rule("layers.{i}.ffn.router.weight", (f"{_MLP}.router.weight",)),
    Rule("layers.{i}.ffn.router.logit_bias", (f"{_MLP}.router.bias",)),
    Rule("layers.{i}.ffn.experts.b_up", (f"{_MLP}.experts.gate_up_proj_bias",), DEINTERLEAVE_GLU),
    Rule("layers.{i}.ffn.experts.b_down", (f"{_MLP}.experts.down_proj_bias",)),
)
TABLES = {
    "fused": _GPT_OSS
    + (
        Rule("layers.{i}.ffn.experts.w_up", (f"{_MLP}.experts.gate_up_proj",), DEINTERLEAVE_GLU),
        Rule("layers.{i}.ffn.experts.w_down", (f"{_MLP}.experts.down_proj",)),
    ),
    # the experts quantized, as published
    "mxfp4": _GPT_OSS
    + (
        Rule(
            "layers.{i}.ffn.experts.w_up",
            (f"{_MLP}.experts.gate_up_proj_blocks", f"{_MLP}.experts.gate_up_proj_scales"),
            MXFP4_GLU_EXPERTS,
        ),
        Rule(
            "layers.{i}.ffn.experts.w_down",
            (f"{_MLP}.experts.down_proj_blocks", f"{_MLP}.experts.down_proj_scales"),
            MXFP4_EXPERTS,
        ),
    ),
}


class GptOss(Architecture):
    name = "gpt_oss"
    hf_class = "GptOssForCausalLM"
    aliases = {"num_local_experts": "num_experts"}
    priority = 6
    written_layout = "fused"
    defaults = dict(
        rope_theta=150000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        sliding_window=128,
        attention_bias=True,
        swiglu_alpha=1.702,
        swiglu_limit=7.0,
        router_aux_loss_coef=0.001,
        tie_word_embeddings=False,
        initializer_range=0.02,
        head_dim=None,
    )
    tiny = dict(
        intermediate_size=32,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4,
        swiglu_limit=1.5,
    )
    flagships = {"gpt_oss_120b": gpt_oss_120b, "gpt_oss_20b": gpt_oss_20b}
    published = {
        "gpt_oss_120b": Published(116.83e9, 5.13e9, _CARD, active_without_input_embedding=True),
        "gpt_oss_20b": Published(20.91e9, 3.61e9, _CARD, active_without_input_embedding=True),
    }

    def to_moekit(self, hf: dict) -> ModelConfig:
        hf = self.read(hf)
        hf.require(
            (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_local_experts",
                "num_experts_per_tok",
            )
        )
        hf.refuse_set("attention_dropout")
        num_layers = hf["num_hidden_layers"]
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)
        ]
        unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
        if unknown or len(layer_types) != num_layers:
            hf.refuse(f"layer_types {layer_types} (sliding/full_attention, one per layer)")
        sliding = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
        window = hf.get("sliding_window") if sliding else None
        if hf.partial_rotary_factor() != 1.0:
            hf.refuse(f"partial_rotary_factor {hf.partial_rotary_factor()}")
        rope_theta, rope_scaling = hf.rope(("default", "yarn"), default_rope=_DEFAULT_ROPE)
        hf.check()
        moe = moe_config(
            hf,
            d_hidden=hf["intermediate_size"],
            num_experts=hf["num_local_experts"],
            renormalize=True,
            router_bias=True,
            expert_bias=True,
            activation="swiglu_clamped",
            swiglu_alpha=float(hf.get("swiglu_alpha")),
            swiglu_limit=float(hf.get("swiglu_limit")),
        )
        bias = bool(hf.get("attention_bias"))
        return gqa_model_config(
            hf,
            moe,
            rope_theta,
            qkv_bias=bias,
            attn_out_bias=bias,
            attention="sinks",
            sliding_window=window,
            sliding_layers=sliding if window is not None else None,
            rope_scaling=rope_scaling,
        )

    def inexpressible(self, config: ModelConfig) -> list[str]:
        moe, problems = config.moe, decoder_options(config)
        if config.attention != "sinks":
            problems.append(f"attention {config.attention!r} (gpt_oss has 'sinks')")
        problems += one_attention_bias(config)
        if config.qk_norm is not None:
            problems.append(f"qk_norm {config.qk_norm!r}")
        if dense_layer_indices(config):
            problems.append("dense layers (every gpt_oss layer is MoE)")
        softmax_topk = router_class(moe.router) is SoftmaxTopK  # what gpt_oss's router computes
        if not softmax_topk or not moe.renormalize or not moe.router_bias:
            problems.append(
                f"router {moe.router!r} with renormalize {moe.renormalize} and router_bias "
                f"{moe.router_bias} (gpt_oss: softmax_topk, renormalised, with a bias)"
            )
        if moe.activation != "swiglu_clamped" or not moe.expert_bias:
            problems.append(
                f"expert activation {moe.activation!r} with expert_bias {moe.expert_bias} "
                "(gpt_oss: swiglu_clamped with biases)"
            )
        problems += no_shared_expert(config)
        if moe.capacity_factor is not None:
            problems.append(
                f"capacity_factor {moe.capacity_factor} (Hugging Face MoEs are dropless)"
            )
        if config.rope_scaling is not None and config.rope_scaling.get("type") != "yarn":
            problems.append(f"rope_scaling {config.rope_scaling}")
        return problems

    def hf_keys(self, config: ModelConfig) -> dict:
        moe = config.moe
        if config.sliding_window is None:
            sliding = set()
        elif config.sliding_layers is None:
            sliding = set(range(config.num_layers))
        else:
            sliding = set(config.sliding_layers)
        return {
            "intermediate_size": moe.d_hidden,
            "num_local_experts": moe.num_experts,
            "head_dim": config.head_dim,
            "attention_bias": config.qkv_bias,
            "sliding_window": config.sliding_window,
            "layer_types": [
                "sliding_attention" if i in sliding else "full_attention"
                for i in range(config.num_layers)
            ],
            "rope_parameters": rope_parameters(config),
            "swiglu_alpha": moe.swiglu_alpha,
            "swiglu_limit": moe.swiglu_limit,
        }

    def tables(self, config, hf):
        return TABLES

    def stored_layout(self, hf: dict, tensor_names) -> str:
        return self.quantization(hf) or "fused"

    def quantization(self, hf: dict) -> str | None:
        """ "mxfp4" when config.json says the experts are MXFP4 (the layout of that name).

        Raises:
            ValueError: a quantization_config whose quant_method moekit cannot read, named.
        """
        quantization = hf.get("quantization_config")
        if quantization is None:
            return None
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        if method not in _QUANT_METHODS:
            raise ValueError(
                f"quantization_config quant_method {method!r} is not supported (moekit reads "
                f"{', '.join(_QUANT_METHODS)} experts and unquantized weights)"
            )
        return method

    def peft_expert_columns(self, lora_B_up):
        return DEINTERLEAVE_GLU.to_hf(lora_B_up)[0]  # halves -> gate/up interleaved
