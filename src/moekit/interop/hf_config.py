"""Hugging Face config.json <-> moekit ModelConfig for the supported architectures.

DeepSeek-V2 and DeepSeek-V3 (multi-head latent attention) are mapped in hf_deepseek.py and
gpt-oss in hf_gpt_oss.py; this module dispatches to them and maps the other four.

Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE are all pre-norm decoders with RMSNorm, rotary
positions in the rotate-half layout, grouped-query attention, SwiGLU experts and a softmax
top-k router, so each maps onto ModelConfig + MoEConfig; they differ in:
    mixtral    top-k weights always renormalised; every layer MoE
    qwen2_moe  q/k/v biases; a shared expert scaled by sigmoid(x . w); norm_topk_prob;
               dense layers by decoder_sparse_step and mlp_only_layers
    qwen3_moe  RMSNorm over each head of q and k; head_dim apart from hidden/heads;
               norm_topk_prob; dense layers as qwen2_moe
    olmoe      RMSNorm over the whole q and k projections; norm_topk_prob; every layer MoE
Options that change the function and have no moekit equivalent (sliding windows, rope
scaling, clip_qkv, activations other than silu, dropout, router jitter) are refused, all
of them in one error.

gpt-oss (attention sinks, sliding windows, YaRN, biased router and clamped SwiGLU experts)
maps in hf_gpt_oss.py.

Router loss: transformers' load-balancing loss sums f_i over the top_k choices of each
token, so it is top_k times Switch's N * sum_i f_i P_i that moekit computes;
balance_loss_coef = router_aux_loss_coef * top_k keeps the training objective.
"""

from __future__ import annotations

from ..config import MoEConfig
from ..models import ModelConfig
from ..routing import SoftmaxTopK, router_class
from .hf_deepseek import (
    DEEPSEEK_ARCHITECTURES,
    deepseek_architecture,
    deepseek_config_from_hf,
    deepseek_hf_config,
)
from .hf_gpt_oss import gpt_oss_config, gpt_oss_inexpressible, model_config_from_gpt_oss

ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    **DEEPSEEK_ARCHITECTURES,  # deepseek_v2, deepseek_v3: interop/hf_deepseek.py
    "gpt_oss": "GptOssForCausalLM",
}
# transformers' defaults for keys a config.json may leave out.
_DEFAULTS = {
    "mixtral": dict(rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=131072),
    "qwen2_moe": dict(
        rope_theta=1e4, rms_norm_eps=1e-6, max_position_embeddings=32768, qkv_bias=True
    ),
    "qwen3_moe": dict(rope_theta=1e4, rms_norm_eps=1e-6, max_position_embeddings=32768),
    "olmoe": dict(rope_theta=1e4, rms_norm_eps=1e-5, max_position_embeddings=4096),
}
_REQUIRED = {
    "mixtral": ("intermediate_size", "num_local_experts"),
    "qwen2_moe": (
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "intermediate_size",
        "num_experts",
    ),
    "qwen3_moe": ("moe_intermediate_size", "intermediate_size", "num_experts"),
    "olmoe": ("intermediate_size", "num_experts"),
}
_STRUCTURE = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_experts_per_tok",
)
# transformers' attribute_map aliases: the same setting under another name.
_ALIASES = {"num_local_experts": "num_experts", "num_experts": "num_local_experts"}


def model_type_of(hf: dict) -> str:
    """The config's model_type, checked against the supported architectures."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {model_type!r} (config.json model_type, architectures "
            f"{hf.get('architectures')}); moekit reads {', '.join(ARCHITECTURES)}"
        )
    return model_type


def model_config_from_hf(hf: dict) -> ModelConfig:
    """The moekit ModelConfig of a Hugging Face config.json (as a dict).

    Raises:
        ValueError: an unsupported model_type; or, in one message, every missing key and
            every option moekit cannot reproduce.
    """
    arch = model_type_of(hf)
    if arch in DEEPSEEK_ARCHITECTURES:
        return deepseek_config_from_hf(arch, hf)
    if arch == "gpt_oss":
        return model_config_from_gpt_oss(hf)
    hf = dict(hf)
    for name, alias in _ALIASES.items():
        if name not in hf and alias in hf:
            hf[name] = hf[alias]
    missing = [k for k in _STRUCTURE + _REQUIRED[arch] if hf.get(k) is None]
    if missing:
        raise ValueError(f"{arch} config.json lacks {missing}")

    def get(key: str, default=None):
        """The config's value, else transformers' default for this architecture."""
        return hf[key] if hf.get(key) is not None else _DEFAULTS[arch].get(key, default)

    problems = _unsupported(arch, hf, get)
    rope_theta = _rope_theta(hf, get, problems)
    if problems:
        raise ValueError(
            f"{arch} config.json has options moekit cannot reproduce: {'; '.join(problems)}"
        )

    top_k = hf["num_experts_per_tok"]
    num_experts = hf["num_local_experts" if arch == "mixtral" else "num_experts"]
    d_model = hf["hidden_size"]
    moe = MoEConfig(
        d_model=d_model,
        d_hidden=hf[
            "intermediate_size" if arch in ("mixtral", "olmoe") else "moe_intermediate_size"
        ],
        num_experts=num_experts,
        top_k=top_k,
        router="softmax_topk",
        renormalize=True if arch == "mixtral" else bool(get("norm_topk_prob", False)),
        num_shared_experts=1 if arch == "qwen2_moe" else 0,
        d_shared_hidden=hf["shared_expert_intermediate_size"] if arch == "qwen2_moe" else None,
        shared_expert_gate=arch == "qwen2_moe",
        balance_loss_coef=float(get("router_aux_loss_coef", 0.0)) * top_k,
        z_loss_coef=0.0,
    )
    attention_bias = bool(get("attention_bias", False))
    qwen = arch in ("qwen2_moe", "qwen3_moe")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=get("num_key_value_heads", hf["num_attention_heads"]),
        head_dim=get("head_dim"),
        qkv_bias=bool(get("qkv_bias")) if arch == "qwen2_moe" else attention_bias,
        attn_out_bias=False if arch == "qwen2_moe" else attention_bias,
        qk_norm={"qwen3_moe": "head", "olmoe": "full"}.get(arch),
        max_seq_len=get("max_position_embeddings"),
        rope_theta=float(rope_theta),
        norm_eps=float(get("rms_norm_eps")),
        tied_embeddings=bool(get("tie_word_embeddings", False)),
        init_std=float(get("initializer_range", 0.02)),
        d_hidden=hf["intermediate_size"] if qwen else None,
        activation="swiglu",
        moe=moe,
        moe_every=get("decoder_sparse_step", 1) if qwen else 1,
        dense_layers=list(get("mlp_only_layers", [])) if qwen else [],
    )


def _unsupported(arch: str, hf: dict, get) -> list[str]:
    problems = []
    if get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (only silu, i.e. SwiGLU experts)")
    if get("attention_dropout", 0.0):
        problems.append(f"attention_dropout {hf['attention_dropout']}")
    if get("router_jitter_noise", 0.0):
        problems.append(f"router_jitter_noise {hf['router_jitter_noise']}")
    if get("clip_qkv") is not None:
        problems.append(f"clip_qkv {hf['clip_qkv']}")
    if get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor {hf['partial_rotary_factor']}")
    window = get("sliding_window")
    if arch == "mixtral" and window is not None and window < get("max_position_embeddings"):
        problems.append(f"sliding_window {window} (shorter than max_position_embeddings)")
    if arch != "mixtral" and get("use_sliding_window", False):
        problems.append("use_sliding_window true")
    layer_types = hf.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        problems.append(f"layer_types {sorted(set(layer_types))} (only full_attention)")
    head_dim = get("head_dim")
    if arch == "olmoe" and head_dim not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
        problems.append(f"head_dim {head_dim} (OLMoE's q/k norm widths assume hidden/heads)")
    return problems


def _rope_theta(hf: dict, get, problems: list[str]) -> float:
    """rope_theta from rope_parameters (transformers 5) or the older top-level keys."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        problems.append(f"rope type {kind!r} (only default rotary embeddings)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor {rope['partial_rotary_factor']}")
    return rope.get("rope_theta") or get("rope_theta")


def choose_architecture(config: ModelConfig) -> str:
    """The Hugging Face architecture that fits a moekit config best (checked by hf_config)."""
    moe = config.moe
    if config.attention == "mla":
        return deepseek_architecture(config)
    if config.attention == "sinks":
        return "gpt_oss"
    if config.qk_norm == "full":
        return "olmoe"
    if config.qk_norm == "head":
        return "qwen3_moe"
    if moe is not None and moe.num_shared_experts:
        return "qwen2_moe"
    return "mixtral"


def hf_config(
    config: ModelConfig, architecture: str | None = None, *, dtype: str = "float32"
) -> dict:
    """The Hugging Face config.json (as a dict) of a moekit config.

    Args:
        config: the moekit ModelConfig.
        architecture: a key of ARCHITECTURES, or None to choose (choose_architecture).
        dtype: the weights' dtype name, recorded in the config.
    Raises:
        ValueError: naming every setting the architecture cannot express.
    """
    arch = architecture or choose_architecture(config)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    moe = config.moe
    if moe is None:
        raise ValueError(
            "a dense model (moe None) has no Hugging Face MoE architecture; moekit writes MoE models only"
        )
    if arch in DEEPSEEK_ARCHITECTURES:
        return deepseek_hf_config(config, arch, dtype=dtype)
    problems = gpt_oss_inexpressible(config) if arch == "gpt_oss" else _inexpressible(config, arch)
    if problems:
        raise ValueError(f"the {arch} architecture cannot express: {'; '.join(problems)}")
    out = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tied_embeddings,
        "initializer_range": config.init_std,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_dropout": 0.0,
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": moe.balance_loss_coef / moe.top_k,
        "output_router_logits": False,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "dtype": dtype,
    }
    out |= gpt_oss_config(config) if arch == "gpt_oss" else _architecture_keys(config, arch)
    return out


def _architecture_keys(config: ModelConfig, arch: str) -> dict:
    moe = config.moe
    if arch == "mixtral":
        return {
            "intermediate_size": moe.d_hidden,
            "num_local_experts": moe.num_experts,
            "head_dim": config.head_dim,
            "sliding_window": None,
            "router_jitter_noise": 0.0,
        }
    if arch == "olmoe":
        return {
            "intermediate_size": moe.d_hidden,
            "num_experts": moe.num_experts,
            "norm_topk_prob": moe.renormalize,
            "attention_bias": config.qkv_bias,
            "clip_qkv": None,
        }
    # qwen: the MoE layers as decoder_sparse_step + mlp_only_layers
    moe_layers = set(config.moe_layers)
    step = config.moe_every if config.first_dense_layers == 0 else 1
    dense = sorted(
        i for i in range(config.num_layers) if (i + 1) % step == 0 and i not in moe_layers
    )
    out = {
        "intermediate_size": config.d_hidden,
        "moe_intermediate_size": moe.d_hidden,
        "num_experts": moe.num_experts,
        "norm_topk_prob": moe.renormalize,
        "decoder_sparse_step": step,
        "mlp_only_layers": dense,
        "head_dim": config.head_dim,
        "use_sliding_window": False,
        "sliding_window": None,
    }
    if arch == "qwen2_moe":
        return out | {
            "shared_expert_intermediate_size": moe.shared_hidden,
            "qkv_bias": config.qkv_bias,
        }
    return out | {"attention_bias": config.qkv_bias}


def _inexpressible(config: ModelConfig, arch: str) -> list[str]:
    """The settings of config that the architecture has no way to write, by name."""
    moe, problems = config.moe, []
    if config.attention != "gqa":
        problems.append(f"attention {config.attention!r} (only gqa; gpt_oss has 'sinks')")
    if moe.router_bias or moe.expert_bias:
        problems.append(f"router_bias {moe.router_bias}, expert_bias {moe.expert_bias}")
    if config.rope_scaling is not None:
        problems.append(f"rope_scaling {config.rope_scaling}")
    if router_class(moe.router) is not SoftmaxTopK:  # what every Hugging Face MoE format stores
        problems.append(f"router {moe.router!r} (only softmax_topk)")
    if moe.capacity_factor is not None:
        problems.append(f"capacity_factor {moe.capacity_factor} (Hugging Face MoEs are dropless)")
    if moe.activation != "swiglu":
        problems.append(f"expert activation {moe.activation!r} (only swiglu)")
    has_dense = len(config.moe_layers) < config.num_layers
    if has_dense and config.activation != "swiglu":
        problems.append(f"dense activation {config.activation!r} (only swiglu)")
    if has_dense and arch in ("mixtral", "olmoe"):
        problems.append(
            f"dense layers {[i for i in range(config.num_layers) if not config.is_moe_layer(i)]}"
        )
    wants_norm = {"qwen3_moe": "head", "olmoe": "full"}.get(arch)
    if config.qk_norm != wants_norm:
        problems.append(f"qk_norm {config.qk_norm!r} ({arch} has {wants_norm!r})")
    if arch == "qwen2_moe":
        if config.attn_out_bias:
            problems.append("attn_out_bias true")
        if not moe.num_shared_experts or not moe.shared_expert_gate:
            problems.append(
                f"num_shared_experts {moe.num_shared_experts} with shared_expert_gate "
                f"{moe.shared_expert_gate} (qwen2_moe has one gated shared expert)"
            )
    else:
        if moe.num_shared_experts:
            problems.append(
                f"num_shared_experts {moe.num_shared_experts} (only qwen2_moe has a shared expert, gated)"
            )
        if arch == "mixtral" and (config.qkv_bias or config.attn_out_bias):
            problems.append("attention biases")
        elif config.qkv_bias != config.attn_out_bias:
            problems.append(
                f"qkv_bias {config.qkv_bias} with attn_out_bias {config.attn_out_bias} (one attention_bias)"
            )
    if arch == "mixtral" and not moe.renormalize:
        problems.append("renormalize false (Mixtral always renormalises the top-k weights)")
    if arch == "olmoe" and config.head_dim * config.num_heads != config.d_model:
        problems.append(f"head_dim {config.head_dim} (OLMoE needs d_model / num_heads)")
    return problems
