"""Hugging Face config.json <-> moekit ModelConfig for gpt-oss (model_type gpt_oss).

gpt-oss (OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card", arXiv:2508.10925) is a
pre-norm decoder like the other architectures, with:
    attention  q/k/v and output biases (attention_bias), one learned sink logit per head,
               layer_types alternating sliding_attention (window sliding_window) and
               full_attention -> ModelConfig attention "sinks", sliding_window,
               sliding_layers
    rotary     YaRN (rope_parameters, or rope_scaling + rope_theta in older files) ->
               ModelConfig.rope_scaling; the published models use truncate false
    router     a linear layer with a bias; top-k of the logits, softmax over those k ->
               softmax_topk with renormalize and router_bias (the same weights: see
               tests/test_moe_reference.py)
    experts    biases on both projections and the clamped SwiGLU (swiglu_alpha,
               swiglu_limit) -> expert_bias, activation "swiglu_clamped"
hidden_act is not read by transformers' gpt-oss experts, so it is not either. The
quantization_config of the published checkpoints (MXFP4 experts) says how the weights
are stored, not what the model computes: `checkpoint_layout` reads it for the loader.
Options that change the function with no moekit equivalent are refused in one error.
"""

from __future__ import annotations

from ..config import MoEConfig
from ..models import ModelConfig
from ..routing import SoftmaxTopK, router_class

# transformers' defaults (GptOssConfig) for keys a config.json may leave out.
_DEFAULTS = dict(
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
_DEFAULT_ROPE = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_local_experts",
    "num_experts_per_tok",
)
# transformers' YaRN keys -> ModelConfig.rope_scaling keys (models/rope.py)
_YARN_KEYS = {
    "factor": "factor",
    "original_max_position_embeddings": "original_max_seq_len",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
    "truncate": "truncate",
    "attention_factor": "attention_factor",
    "mscale": "mscale",
    "mscale_all_dim": "mscale_all_dim",
}
_QUANT_METHODS = ("mxfp4",)


def model_config_from_gpt_oss(hf: dict) -> ModelConfig:
    """The moekit ModelConfig of a gpt_oss config.json (as a dict).

    Raises:
        ValueError: in one message, every missing key and every option moekit cannot
            reproduce.
    """
    hf = dict(hf)
    if "num_local_experts" not in hf and "num_experts" in hf:  # transformers' attribute_map
        hf["num_local_experts"] = hf["num_experts"]
    missing = [k for k in _REQUIRED if hf.get(k) is None]
    if missing:
        raise ValueError(f"gpt_oss config.json lacks {missing}")

    def get(key: str):
        return hf[key] if hf.get(key) is not None else _DEFAULTS.get(key)

    problems = []
    if hf.get("attention_dropout"):
        problems.append(f"attention_dropout {hf['attention_dropout']}")
    num_layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)
    ]
    unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
    if unknown or len(layer_types) != num_layers:
        problems.append(f"layer_types {layer_types} (sliding/full_attention, one per layer)")
    sliding = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    window = get("sliding_window") if sliding else None
    rope_theta, rope_scaling = _rope(hf, get, problems)
    if problems:
        raise ValueError(
            f"gpt_oss config.json has options moekit cannot reproduce: {'; '.join(problems)}"
        )
    d_model, top_k = hf["hidden_size"], hf["num_experts_per_tok"]
    bias = bool(get("attention_bias"))
    moe = MoEConfig(
        d_model=d_model,
        d_hidden=hf["intermediate_size"],
        num_experts=hf["num_local_experts"],
        top_k=top_k,
        router="softmax_topk",
        renormalize=True,
        router_bias=True,
        expert_bias=True,
        activation="swiglu_clamped",
        swiglu_alpha=float(get("swiglu_alpha")),
        swiglu_limit=float(get("swiglu_limit")),
        # transformers' loss sums f_i over the k choices: top_k times Switch's (hf_config.py)
        balance_loss_coef=float(get("router_aux_loss_coef")) * top_k,
        z_loss_coef=0.0,
    )
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        num_layers=num_layers,
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=get("head_dim"),
        qkv_bias=bias,
        attn_out_bias=bias,
        attention="sinks",
        sliding_window=window,
        sliding_layers=sliding if window is not None else None,
        max_seq_len=get("max_position_embeddings"),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        norm_eps=float(get("rms_norm_eps")),
        tied_embeddings=bool(get("tie_word_embeddings")),
        init_std=float(get("initializer_range")),
        moe=moe,
    )


def _rope(hf: dict, get, problems: list[str]) -> tuple[float, dict | None]:
    """rope_theta and a ModelConfig.rope_scaling from rope_parameters / rope_scaling."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or dict(_DEFAULT_ROPE)
    theta = rope.get("rope_theta") or get("rope_theta")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor {rope['partial_rotary_factor']}")
    if kind == "default":
        return theta, None
    if kind != "yarn":
        problems.append(f"rope type {kind!r} (only yarn and default)")
        return theta, None
    scaling = {"type": "yarn"}
    scaling |= {ours: rope[theirs] for theirs, ours in _YARN_KEYS.items() if theirs in rope}
    if scaling.get("factor") is None:  # transformers: max_position / original
        scaling["factor"] = get("max_position_embeddings") / scaling["original_max_seq_len"]
    return theta, scaling


def checkpoint_layout(hf: dict) -> str:
    """ "mxfp4" when config.json says the experts are MXFP4, else "fused" (keys.TABLES).

    Raises:
        ValueError: a quantization_config whose quant_method moekit cannot read, named.
    """
    quantization = hf.get("quantization_config")
    if quantization is None:
        return "fused"
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method not in _QUANT_METHODS:
        raise ValueError(
            f"quantization_config quant_method {method!r} is not supported (moekit reads "
            f"{', '.join(_QUANT_METHODS)} experts and unquantized weights)"
        )
    return method


def gpt_oss_config(config: ModelConfig) -> dict:
    """The gpt_oss-specific keys of a config.json (hf_config adds the common ones)."""
    moe = config.moe
    if config.sliding_window is None:
        sliding = set()
    elif config.sliding_layers is None:
        sliding = set(range(config.num_layers))
    else:
        sliding = set(config.sliding_layers)
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope = {"rope_type": "yarn", "rope_theta": config.rope_theta}
        rope |= {
            theirs: config.rope_scaling[ours]
            for theirs, ours in _YARN_KEYS.items()
            if ours in config.rope_scaling
        }
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
        "rope_parameters": rope,
        "swiglu_alpha": moe.swiglu_alpha,
        "swiglu_limit": moe.swiglu_limit,
    }


def gpt_oss_inexpressible(config: ModelConfig) -> list[str]:
    """The settings of config that gpt_oss has no way to write, by name."""
    moe, problems = config.moe, []
    if config.attention != "sinks":
        problems.append(f"attention {config.attention!r} (gpt_oss has 'sinks')")
    if config.qkv_bias != config.attn_out_bias:
        problems.append(
            f"qkv_bias {config.qkv_bias} with attn_out_bias {config.attn_out_bias} "
            "(one attention_bias)"
        )
    if config.qk_norm is not None:
        problems.append(f"qk_norm {config.qk_norm!r}")
    if config.moe_layers != list(range(config.num_layers)):
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
    if moe.num_shared_experts:
        problems.append(f"num_shared_experts {moe.num_shared_experts}")
    if moe.capacity_factor is not None:
        problems.append(f"capacity_factor {moe.capacity_factor} (Hugging Face MoEs are dropless)")
    if config.rope_scaling is not None and config.rope_scaling.get("type") != "yarn":
        problems.append(f"rope_scaling {config.rope_scaling}")
    return problems
