"""DeepSeek-V2 (model_type deepseek_v2): DeepSeek-AI 2024 (arXiv:2405.04434).

# H heads, N qk_nope_head_dim, R qk_rope_head_dim, C kv_lora_rank, D model

A pre-norm decoder with multi-head latent attention (models/mla.py), the first
first_k_dense_replace layers dense and every later one MoE with n_shared_experts shared
experts of width moe_intermediate_size. Routing: softmax scores; topk_method "greedy"
(plain top-k) or "group_limited_greedy" (n_group groups scored by their best probability,
topk_group kept); weights times routed_scaling_factor, never renormalised. DeepSeek-V3
(deepseek_v3.py) builds on this file.

Rotary layout: DeepSeek's checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ... of
the rotary dims (V2 as complex numbers; V3 when rope_interleave, its default), moekit the
halves: the rotary rows of the q and kv_a projections are reordered on load and back on
save (rules.rope_rows), so HF -> moekit -> HF is bit-exact.
"""

from __future__ import annotations

from ...models import ModelConfig
from ...models.published import deepseek_v2
from .base import (
    Architecture,
    HFConfig,
    Published,
    common_keys,
    expect,
    moe_config,
    refuse_common,
)
from .rules import COPY, FUSE_GLU, FUSED_EXPERTS, LAYER, PER_EXPERT, Rule, rope_rows

STRUCTURE = (
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


def ffn_layout_problems(config: ModelConfig, arch: str) -> list[str]:
    """DeepSeek's FFN layout (GLM-4.5's too): every layer after the dense prefix MoE, with at
    least one ungated shared expert as wide as a routed one."""
    moe, problems = config.moe, []
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
    return problems


class DeepseekV2(Architecture):
    name = "deepseek_v2"
    hf_class = "DeepseekV2ForCausalLM"
    priority = 4
    router = "softmax_topk"
    aliases = {"n_routed_experts": "num_local_experts"}
    none_is_missing = False  # a null q_lora_rank is a full query projection
    defaults = dict(
        rope_theta=1e4,
        rms_norm_eps=1e-6,
        max_position_embeddings=2048,
        first_k_dense_replace=0,
        n_shared_experts=2,
        routed_scaling_factor=1.0,
        topk_method="greedy",
        q_lora_rank=1536,
    )
    # The Hub configs' keys for the original code, accepted at the values that match.
    original_code = dict(scoring_func="softmax", moe_layer_freq=1)
    # group-limited greedy routing over 4 groups of 2 experts; routed_scaling_factor 1.5
    tiny = dict(
        num_key_value_heads=4,
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        kv_lora_rank=12,
        q_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=6,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.5,
    )
    flagships = {"deepseek_v2": deepseek_v2}
    published = {
        "deepseek_v2": Published(
            236e9,
            21e9,
            "DeepSeek-AI, DeepSeek-V2 (arXiv:2405.04434), abstract",
            active_without_input_embedding=True,
        )
    }

    # ------------------------------------------------------------ config.json

    def to_moekit(self, hf: dict) -> ModelConfig:
        hf = self.read(hf)
        hf.require(STRUCTURE)
        refuse_common(hf)
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key, False):
                hf.refuse(f"{key} true")
        for key, value in self.original_code.items():
            if key in hf.hf and hf[key] != value:
                hf.refuse(f"{key} {hf[key]!r} ({self.name} has {value!r})")
        self.refuse_routing(hf)
        if hf.get("n_shared_experts") is None or hf.get("n_shared_experts") < 1:
            hf.refuse(f"n_shared_experts {hf.get('n_shared_experts')!r} (at least one)")
        rope_theta, rope_scaling = hf.rope(kinds=("default", "yarn"))
        hf.check()
        num_groups = self.num_groups(hf)
        moe = moe_config(
            hf,
            d_hidden=hf["moe_intermediate_size"],
            num_experts=hf["n_routed_experts"],
            router=self.router,
            renormalize=bool(hf.get("norm_topk_prob", False)),
            num_groups=num_groups,
            topk_groups=(hf.get("topk_group") or 1) if num_groups > 1 else 1,
            routed_scaling=float(hf.get("routed_scaling_factor")),
            num_shared_experts=hf.get("n_shared_experts"),
            d_shared_hidden=hf["moe_intermediate_size"],
            balance_loss_coef=0.0,
        )
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            attention="mla",
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=hf["kv_lora_rank"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            max_seq_len=hf.get("max_position_embeddings"),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            norm_eps=float(hf.get("rms_norm_eps")),
            tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=float(hf.get("initializer_range", 0.02)),
            d_hidden=hf["intermediate_size"],
            activation="swiglu",
            moe=moe,
            first_dense_layers=hf.get("first_k_dense_replace"),
        )

    def refuse_routing(self, hf: HFConfig) -> None:
        method = hf.get("topk_method")
        if method not in ("greedy", "group_limited_greedy"):
            hf.refuse(f"topk_method {method!r} (greedy or group_limited_greedy)")
        if hf.get("norm_topk_prob", False):
            hf.refuse(
                "norm_topk_prob true (transformers' DeepSeek-V2 never renormalises the top-k "
                "weights, the original code does: ambiguous)"
            )

    def num_groups(self, hf: HFConfig) -> int:
        return 1 if hf.get("topk_method") == "greedy" else hf.get("n_group") or 1

    def inexpressible(self, config: ModelConfig) -> list[str]:
        moe = config.moe
        problems = expect(config, self.name, attention="mla", router=self.router, groups=True)
        problems += ffn_layout_problems(config, self.name)
        if moe.router_bias or moe.expert_bias:
            problems.append(f"router_bias {moe.router_bias}, expert_bias {moe.expert_bias}")
        return problems + self.routing_problems(config)

    def routing_problems(self, config: ModelConfig) -> list[str]:
        if config.moe.renormalize:
            return ["renormalize true (transformers' DeepSeek-V2 never renormalises)"]
        return []

    def to_hf(self, config: ModelConfig, dtype: str) -> dict:
        moe = config.moe
        out = common_keys(self, config, dtype) | {
            "intermediate_size": config.d_hidden,
            "moe_intermediate_size": moe.d_hidden,
            "num_key_value_heads": config.num_heads,  # MLA: every head has its own keys
            "n_shared_experts": moe.num_shared_experts,
            "n_routed_experts": moe.num_experts,
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
            "attention_bias": False,
        }
        # transformers' DeepSeek models add no balance loss (moekit reads none back)
        del out["router_aux_loss_coef"], out["output_router_logits"]
        return out | self.hf_keys(config)

    def hf_keys(self, config: ModelConfig) -> dict:
        greedy = config.moe.num_groups == 1
        return {
            "topk_method": "greedy" if greedy else "group_limited_greedy",
            "n_group": None if greedy else config.moe.num_groups,
            "topk_group": None if greedy else config.moe.topk_groups,
            "mlp_bias": False,
        }

    # ------------------------------------------------------------ tensors

    def rope_interleaved(self, hf: dict) -> bool:
        """Whether the checkpoint's rotary dims come in interleaved pairs (V2: always)."""
        return True

    def tables(self, config: ModelConfig, hf: dict) -> dict[str, tuple[Rule, ...]]:
        N, R, C = config.qk_nope_head_dim, config.qk_rope_head_dim, config.kv_lora_rank
        interleaved = self.rope_interleaved(hf)
        q_op = rope_rows("rope_rows_q", N + R, N, R) if interleaved else COPY
        kv_op = rope_rows("rope_rows_kv", C + R, C, R) if interleaved else COPY
        attn, mlp = f"{LAYER}.self_attn", f"{LAYER}.mlp"
        common = (
            Rule("tok_embed.weight", ("model.embed_tokens.weight",)),
            Rule("norm.weight", ("model.norm.weight",)),
            Rule("lm_head.weight", ("lm_head.weight",)),
            Rule("layers.{i}.attn_norm.weight", (f"{LAYER}.input_layernorm.weight",)),
            Rule("layers.{i}.ffn_norm.weight", (f"{LAYER}.post_attention_layernorm.weight",)),
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
                (f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"),
                FUSE_GLU,
            ),
            Rule("layers.{i}.ffn.down.weight", (f"{mlp}.down_proj.weight",)),
            Rule("layers.{i}.ffn.router.bias", (f"{mlp}.gate.e_score_correction_bias",)),
            Rule(
                "layers.{i}.ffn.shared.up.weight",
                (f"{mlp}.shared_experts.gate_proj.weight", f"{mlp}.shared_experts.up_proj.weight"),
                FUSE_GLU,
            ),
            Rule("layers.{i}.ffn.shared.down.weight", (f"{mlp}.shared_experts.down_proj.weight",)),
        )
        return {"per_expert": common + PER_EXPERT, "fused": common + FUSED_EXPERTS}

    def quantization(self, hf: dict) -> str | None:
        """FP8 block-quantised weights (the published V3 / R1 checkpoints; interop/fp8.py)."""
        return None if hf.get("quantization_config") is None else "fp8_blocks"

    shared_as_parameters = True  # PEFT: see interop/peft.py
