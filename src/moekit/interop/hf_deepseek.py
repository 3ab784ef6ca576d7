"""DeepSeek-V2 and DeepSeek-V3 in the Hugging Face format: config.json and key tables.

# H heads, N qk_nope_head_dim, R qk_rope_head_dim, C kv_lora_rank, D model

Both are pre-norm decoders with multi-head latent attention (models/mla.py), the first
first_k_dense_replace layers dense and every later one MoE with shared experts:
    deepseek_v2  softmax scores; topk_method "greedy" (plain top-k) or
                 "group_limited_greedy" (n_group groups scored by their best probability,
                 topk_group kept); weights times routed_scaling_factor, not renormalised
    deepseek_v3  sigmoid scores plus e_score_correction_bias for the selection only;
                 n_group groups scored by the sum of their two best biased scores;
                 weights renormalised (norm_topk_prob) and times routed_scaling_factor
moekit: softmax_topk / sigmoid_topk with num_groups, topk_groups, routed_scaling,
renormalize; num_shared_experts = n_shared_experts of width moe_intermediate_size.

Rotary layout: DeepSeek's checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ... of
the rotary dims (DeepSeek-V2 as complex numbers; DeepSeek-V3 when rope_interleave, its
default), moekit the halves (x_i, x_{i+R/2}). Both rotate the same pairs by the same
angles, so reordering the rotary rows of the q and kv_a projections (even dims first,
then odd) gives moekit's layout exactly; the inverse order is written back on save, so
HF -> moekit -> HF is bit-exact. DeepSeek-V3 with rope_interleave false is read and
written as it is.

Multi-token prediction (DeepSeek-V3): the checkpoint stores num_nextn_predict_layers MTP
modules as the layers after the last decoder layer, model.layers.{L + k}: a decoder layer
plus enorm, hnorm, eh_proj, shared_head.norm, and copies of the embedding (embed_tokens)
and of the head (shared_head.head). load_hf skips them by default, as transformers does;
with mtp=True they become moekit's mtp.{k} (models/mtp.py). save_hf writes a model's MTP
modules there, with the copies. FP8 block-quantised weights (the published V3 / R1
checkpoints) are dequantized by the loader: interop/fp8.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import MoEConfig
from ..models import ModelConfig
from ..routing import SigmoidTopK, SoftmaxTopK, router_class
from .keys import _FUSED, COPY, FUSE_GLU, Rule, TensorOp, _per_expert

DEEPSEEK_ARCHITECTURES = {
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
_ROUTER = {"deepseek_v2": SoftmaxTopK, "deepseek_v3": SigmoidTopK}
_STRUCTURE = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "n_routed_experts",
    "num_experts_per_tok",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
)
# transformers' defaults for the keys a config.json may leave out.
_DEFAULTS = {
    "deepseek_v2": dict(
        rope_theta=1e4,
        rms_norm_eps=1e-6,
        max_position_embeddings=2048,
        first_k_dense_replace=0,
        n_shared_experts=2,
        routed_scaling_factor=1.0,
        topk_method="greedy",
        q_lora_rank=1536,
    ),
    "deepseek_v3": dict(
        rope_theta=1e4,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        first_k_dense_replace=3,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        n_group=8,
        topk_group=4,
        norm_topk_prob=True,
        q_lora_rank=1536,
    ),
}
# The Hub configs' keys for the original code, accepted at the values that match.
_ORIGINAL_CODE = {
    "deepseek_v2": dict(scoring_func="softmax", moe_layer_freq=1),
    "deepseek_v3": dict(scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1),
}
# rope_parameters (or rope_scaling) keys of YaRN -> moekit's rope_scaling keys
_YARN_KEYS = {
    "factor": "factor",
    "original_max_position_embeddings": "original_max_seq_len",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
    "mscale": "mscale",
    "mscale_all_dim": "mscale_all_dim",
    "attention_factor": "attention_factor",
    "truncate": "truncate",
}


def deepseek_config_from_hf(arch: str, hf: dict) -> ModelConfig:
    """The moekit ModelConfig of a deepseek_v2 / deepseek_v3 config.json (as a dict).

    Raises:
        ValueError: in one message, every missing key and every option moekit cannot
            reproduce.
    """
    if "n_routed_experts" not in hf and "num_local_experts" in hf:
        hf = hf | {"n_routed_experts": hf["num_local_experts"]}
    missing = [k for k in _STRUCTURE if hf.get(k) is None]
    if missing:
        raise ValueError(f"{arch} config.json lacks {missing}")

    def get(key: str, default=None):
        return hf[key] if key in hf else _DEFAULTS[arch].get(key, default)

    problems = _unsupported(arch, hf, get)
    rope_theta, rope_scaling = _rope(hf, get, problems)
    if problems:
        raise ValueError(
            f"{arch} config.json has options moekit cannot reproduce: {'; '.join(problems)}"
        )
    d_model, num_groups = hf["hidden_size"], get("n_group") or 1
    if arch == "deepseek_v2" and get("topk_method") == "greedy":
        num_groups = 1
    moe = MoEConfig(
        d_model=d_model,
        d_hidden=hf["moe_intermediate_size"],
        num_experts=hf["n_routed_experts"],
        top_k=hf["num_experts_per_tok"],
        router="sigmoid_topk" if arch == "deepseek_v3" else "softmax_topk",
        renormalize=bool(get("norm_topk_prob", False)),
        num_groups=num_groups,
        topk_groups=(get("topk_group") or 1) if num_groups > 1 else 1,
        routed_scaling=float(get("routed_scaling_factor")),
        num_shared_experts=get("n_shared_experts"),
        d_shared_hidden=hf["moe_intermediate_size"],
        balance_loss_coef=0.0,
        z_loss_coef=0.0,
    )
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        attention="mla",
        q_lora_rank=get("q_lora_rank"),
        kv_lora_rank=hf["kv_lora_rank"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        max_seq_len=get("max_position_embeddings"),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        norm_eps=float(get("rms_norm_eps")),
        tied_embeddings=bool(get("tie_word_embeddings", False)),
        init_std=float(get("initializer_range", 0.02)),
        d_hidden=hf["intermediate_size"],
        activation="swiglu",
        moe=moe,
        first_dense_layers=get("first_k_dense_replace"),
    )


def _unsupported(arch: str, hf: dict, get) -> list[str]:
    problems = []
    if get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (only silu, i.e. SwiGLU experts)")
    for key in ("attention_bias", "mlp_bias"):
        if get(key, False):
            problems.append(f"{key} true")
    if get("attention_dropout", 0.0):
        problems.append(f"attention_dropout {hf['attention_dropout']}")
    for key, value in _ORIGINAL_CODE[arch].items():
        if key in hf and hf[key] != value:
            problems.append(f"{key} {hf[key]!r} ({arch} has {value!r})")
    if arch == "deepseek_v2":
        method = get("topk_method")
        if method not in ("greedy", "group_limited_greedy"):
            problems.append(f"topk_method {method!r} (greedy or group_limited_greedy)")
        if get("norm_topk_prob", False):
            problems.append(
                "norm_topk_prob true (transformers' DeepSeek-V2 never renormalises the top-k "
                "weights, the original code does: ambiguous)"
            )
    elif hf["n_routed_experts"] // (get("n_group") or 1) < 2:
        problems.append(f"n_group {get('n_group')} (groups need two experts to be scored)")
    if get("n_shared_experts") is None or get("n_shared_experts") < 1:
        problems.append(f"n_shared_experts {get('n_shared_experts')!r} (at least one)")
    return problems


def _rope(hf: dict, get, problems: list[str]) -> tuple[float, dict | None]:
    """rope_theta and moekit's rope_scaling (None or YaRN) from either config form."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta") or get("rope_theta")
    if kind == "default":
        return theta, None
    if kind != "yarn":
        problems.append(f"rope type {kind!r} (default or yarn)")
        return theta, None
    scaling = {"type": "yarn"}
    scaling |= {ours: rope[key] for key, ours in _YARN_KEYS.items() if rope.get(key) is not None}
    scaling.setdefault("original_max_seq_len", get("max_position_embeddings"))
    if "factor" not in scaling:
        scaling["factor"] = get("max_position_embeddings") / scaling["original_max_seq_len"]
    return theta, scaling


def deepseek_architecture(config: ModelConfig) -> str:
    """deepseek_v3 for sigmoid routing (its selection bias), else deepseek_v2."""
    sigmoid = config.moe is not None and router_class(config.moe.router) is SigmoidTopK
    return "deepseek_v3" if sigmoid else "deepseek_v2"


def deepseek_hf_config(config: ModelConfig, arch: str, *, dtype: str = "float32") -> dict:
    """The config.json (as a dict) of an MLA config as deepseek_v2 / deepseek_v3.

    Raises:
        ValueError: naming every setting the architecture cannot express.
    """
    problems = _inexpressible(config, arch)
    if problems:
        raise ValueError(f"the {arch} architecture cannot express: {'; '.join(problems)}")
    moe = config.moe
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        back = {ours: key for key, ours in _YARN_KEYS.items()}
        scaling = {back[k]: v for k, v in config.rope_scaling.items() if k != "type"}
        rope = {"rope_type": "yarn", "rope_theta": config.rope_theta} | scaling
    out = {
        "architectures": [DEEPSEEK_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_hidden,
        "moe_intermediate_size": moe.d_hidden,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_heads,
        "n_shared_experts": moe.num_shared_experts,
        "n_routed_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "routed_scaling_factor": moe.routed_scaling,
        "n_group": moe.num_groups,
        "topk_group": moe.topk_groups,
        "norm_topk_prob": moe.renormalize,
        "first_k_dense_replace": config.first_dense_layers,
        "q_lora_rank": config.q_lora_rank,
        "kv_lora_rank": config.kv_lora_rank,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "qk_nope_head_dim": config.qk_nope_head_dim,
        "v_head_dim": config.v_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tied_embeddings,
        "initializer_range": config.init_std,
        "rope_theta": config.rope_theta,
        "rope_parameters": rope,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "dtype": dtype,
    }
    if arch == "deepseek_v3":
        return out | {"rope_interleave": True, "num_nextn_predict_layers": config.mtp_depth}
    greedy = moe.num_groups == 1
    return out | {
        "topk_method": "greedy" if greedy else "group_limited_greedy",
        "n_group": None if greedy else moe.num_groups,
        "topk_group": None if greedy else moe.topk_groups,
        "mlp_bias": False,
    }


def _inexpressible(config: ModelConfig, arch: str) -> list[str]:
    moe, problems = config.moe, []
    if config.attention != "mla":
        problems.append(f"attention {config.attention!r} ({arch} has multi-head latent attention)")
    wanted = _ROUTER[arch]
    if router_class(moe.router) is not wanted:
        problems.append(f"router {moe.router!r} ({arch} has {wanted.__name__})")
    if moe.capacity_factor is not None:
        problems.append(f"capacity_factor {moe.capacity_factor} (Hugging Face MoEs are dropless)")
    if moe.activation != "swiglu":
        problems.append(f"expert activation {moe.activation!r} (only swiglu)")
    if config.first_dense_layers and config.activation != "swiglu":
        problems.append(f"dense activation {config.activation!r} (only swiglu)")
    expected = list(range(config.first_dense_layers, config.num_layers))
    if config.moe_layers != expected:
        problems.append(
            f"MoE layers {config.moe_layers} ({arch} makes every layer after "
            f"first_k_dense_replace MoE: {expected})"
        )
    if moe.num_shared_experts < 1 or moe.shared_expert_gate:
        problems.append(
            f"num_shared_experts {moe.num_shared_experts} with shared_expert_gate "
            f"{moe.shared_expert_gate} ({arch} has at least one ungated shared expert)"
        )
    if moe.d_shared_hidden not in (None, moe.d_hidden):
        problems.append(
            f"d_shared_hidden {moe.d_shared_hidden} ({arch}'s shared experts are "
            f"moe_intermediate_size ({moe.d_hidden}) wide)"
        )
    if arch == "deepseek_v2" and moe.renormalize:
        problems.append("renormalize true (transformers' DeepSeek-V2 never renormalises)")
    if arch == "deepseek_v3" and moe.num_experts // moe.num_groups < 2:
        problems.append(f"num_groups {moe.num_groups} (groups of one expert cannot be scored)")
    return problems


# ---------------------------------------------------------------- key tables


def _to_rotate_half(t: Tensor, rows: int, start: int, width: int) -> Tensor:
    """Reorder the rotary rows of every block of `rows` rows: interleaved -> halves."""
    blocks = t.reshape(-1, rows, *t.shape[1:])
    rotary = blocks[:, start : start + width]
    reordered = torch.cat((rotary[:, 0::2], rotary[:, 1::2]), dim=1)
    return torch.cat((blocks[:, :start], reordered, blocks[:, start + width :]), dim=1).reshape(
        t.shape
    )


def _to_interleaved(t: Tensor, rows: int, start: int, width: int) -> Tensor:
    """The inverse of _to_rotate_half: halves -> interleaved pairs."""
    blocks = t.reshape(-1, rows, *t.shape[1:]).clone()
    rotary = blocks[:, start : start + width].clone()
    blocks[:, start : start + width : 2] = rotary[:, : width // 2]
    blocks[:, start + 1 : start + width : 2] = rotary[:, width // 2 :]
    return blocks.reshape(t.shape)


def _rope_rows(name: str, rows: int, start: int, width: int) -> TensorOp:
    return TensorOp(
        name,
        lambda hf: _to_rotate_half(hf[0], rows, start, width),
        lambda t: [_to_interleaved(t, rows, start, width)],
    )


def deepseek_tables(config: ModelConfig, interleaved: bool) -> dict[str, tuple[Rule, ...]]:
    """The key tables ({layout: rules}) of one MLA model; `interleaved`: the checkpoint's
    rotary dims are in interleaved pairs (DeepSeek-V2 always, V3 with rope_interleave)."""
    L = "model.layers.{i}"
    N, R, C = config.qk_nope_head_dim, config.qk_rope_head_dim, config.kv_lora_rank
    q_op = _rope_rows("rope_rows_q", N + R, N, R) if interleaved else COPY
    kv_op = _rope_rows("rope_rows_kv", C + R, C, R) if interleaved else COPY
    attn = f"{L}.self_attn"
    common = (
        Rule("tok_embed.weight", ("model.embed_tokens.weight",)),
        Rule("norm.weight", ("model.norm.weight",)),
        Rule("lm_head.weight", ("lm_head.weight",)),
        Rule("layers.{i}.attn_norm.weight", (f"{L}.input_layernorm.weight",)),
        Rule("layers.{i}.ffn_norm.weight", (f"{L}.post_attention_layernorm.weight",)),
        Rule("layers.{i}.attn.wq.weight", (f"{attn}.q_proj.weight",), q_op),
        Rule("layers.{i}.attn.wq_down.weight", (f"{attn}.q_a_proj.weight",)),
        Rule("layers.{i}.attn.q_norm.weight", (f"{attn}.q_a_layernorm.weight",)),
        Rule("layers.{i}.attn.wq_up.weight", (f"{attn}.q_b_proj.weight",), q_op),
        Rule("layers.{i}.attn.wkv_down.weight", (f"{attn}.kv_a_proj_with_mqa.weight",), kv_op),
        Rule("layers.{i}.attn.kv_norm.weight", (f"{attn}.kv_a_layernorm.weight",)),
        Rule("layers.{i}.attn.wkv_up.weight", (f"{attn}.kv_b_proj.weight",)),
        Rule("layers.{i}.attn.wo.weight", (f"{attn}.o_proj.weight",)),
        Rule(
            "layers.{i}.ffn.up.weight",
            (f"{L}.mlp.gate_proj.weight", f"{L}.mlp.up_proj.weight"),
            FUSE_GLU,
        ),
        Rule("layers.{i}.ffn.down.weight", (f"{L}.mlp.down_proj.weight",)),
        Rule("layers.{i}.ffn.router.bias", (f"{L}.mlp.gate.e_score_correction_bias",)),
        Rule(
            "layers.{i}.ffn.shared.up.weight",
            (f"{L}.mlp.shared_experts.gate_proj.weight", f"{L}.mlp.shared_experts.up_proj.weight"),
            FUSE_GLU,
        ),
        Rule("layers.{i}.ffn.shared.down.weight", (f"{L}.mlp.shared_experts.down_proj.weight",)),
    )
    per_expert = _per_expert("mlp", "gate_proj", "up_proj", "down_proj")
    return {"per_expert": common + per_expert, "fused": common + _FUSED}


def mtp_rules(config: ModelConfig, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """The key table of DeepSeek-V3's MTP modules, made from a model's per-layer rules.

    Module k is the checkpoint's layer L + k: its decoder layer maps as the main layers do
    (mtp.{k}.block.* <- model.layers.{L + k}.*). The copies of the embedding and head come
    first, so that on load the main model's own tensors (later in the table) win.
    """
    out: list[Rule] = []
    for k in range(config.mtp_depth):
        layer = f"model.layers.{config.num_layers + k}"
        out += [
            Rule("tok_embed.weight", (f"{layer}.embed_tokens.weight",)),
            Rule("lm_head.weight", (f"{layer}.shared_head.head.weight",)),
            Rule(f"mtp.{k}.embed_norm.weight", (f"{layer}.enorm.weight",)),
            Rule(f"mtp.{k}.hidden_norm.weight", (f"{layer}.hnorm.weight",)),
            Rule(f"mtp.{k}.proj.weight", (f"{layer}.eh_proj.weight",)),
            Rule(f"mtp.{k}.norm.weight", (f"{layer}.shared_head.norm.weight",)),
        ]
        i = str(config.num_layers + k)
        out += [
            Rule(
                f"mtp.{k}.block." + rule.moekit.removeprefix("layers.{i}."),
                tuple(name.replace("{i}", i) for name in rule.hf),
                rule.op,
            )
            for rule in rules
            if rule.moekit.startswith("layers.{i}.")
        ]
    return tuple(out)


def unloaded_prefixes(arch: str, hf: dict) -> tuple[str, ...]:
    """Tensor name prefixes a checkpoint may hold that are not loaded: DeepSeek-V3's
    multi-token-prediction layers, stored after the last decoder layer (as transformers,
    which does not load them either)."""
    if arch != "deepseek_v3":
        return ()
    first = hf.get("num_hidden_layers", 0)
    return tuple(f"model.layers.{first + i}." for i in range(hf.get("num_nextn_predict_layers", 0)))


def rope_interleaved(arch: str, hf: dict) -> bool:
    """Whether a DeepSeek config.json's checkpoint has its rotary dims in interleaved pairs."""
    return arch == "deepseek_v2" or bool(hf.get("rope_interleave", True))


__all__ = [
    "DEEPSEEK_ARCHITECTURES",
    "deepseek_architecture",
    "deepseek_config_from_hf",
    "deepseek_hf_config",
    "deepseek_tables",
    "mtp_rules",
    "rope_interleaved",
    "unloaded_prefixes",
]
