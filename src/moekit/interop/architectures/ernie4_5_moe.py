"""ERNIE 4.5 MoE (model_type ernie4_5_moe): Baidu, "ERNIE 4.5 Technical Report" (2025);
ERNIE-4.5-300B-A47B and ERNIE-4.5-21B-A3B.

# E experts, F expert hidden (moe_intermediate_size), L layers

A Llama decoder (grouped-query attention, RMSNorm, SwiGLU) whose layers i with
(i + 1) % moe_layer_interval == 0 and moe_layer_start_index <= i <= moe_layer_end_index
(-1: the last) are MoE; the others are dense of width intermediate_size.

    attention      moekit's GQA. ERNIE rotates interleaved pairs (x0, x1), (x2, x3), ...
                   over the whole head, moekit the halves: the output rows of q_proj and
                   k_proj are reordered per head on load and back on save
                   (rules.rope_rows), so HF -> moekit -> HF is bit-exact.
    router         softmax_topk with selection_bias and renormalize: softmax over the
                   logits, the top-k chosen on probs + e_score_correction_bias (stored
                   (1, E) -> router.bias (E,)), the weights the unbiased probabilities of
                   the chosen experts over their sum clamped to >= moe_norm_min.
    shared         moe_num_shared_experts experts of width F run as one ungated SwiGLU
                   MLP of width moe_num_shared_experts * F: moekit's num_shared_experts
                   with d_shared_hidden F. On save, any moekit shared width that is a
                   multiple of F is written as that many experts of width F.

The clamp: moekit divides by the sum clamped to >= 1e-20, ERNIE to >= moe_norm_min (1e-12),
so both are the same division whenever the chosen probabilities sum to at least
moe_norm_min. Without a bias the best expert is chosen and its probability is at least 1/E;
moe_norm_min above 1/E is refused, so there the clamp never acts. With a bias, a chosen j
beats the best expert b: p_j + bias_j >= p_b + bias_b, so p_j >= 1/E - (max bias -
min bias); the clamp can only act for a token whose chosen experts all have probabilities
below 1e-12 (softmax logits more than 27 below the best), which a bias range under
1/E - moe_norm_min rules out. Its contribution is then below 1e-12 of a normal one in
ERNIE and renormalised in moekit: the one input where the two differ.

A moekit model without selection_bias is written with zero biases (transformers needs
the tensor; with zeros selection is by the probabilities alone): the router rule then
carries the zeros itself (ROUTER_ZERO_BIAS). Every model read back has selection_bias.

Refused: use_bias (biases on the attention, the dense and shared MLPs and the head;
moekit's MLPs have none), rope types other than default, moe_norm_min above 1/E, a layer
pattern without an MoE layer. The multi-token-prediction layer some checkpoints hold
(model.mtp_*) is skipped, as transformers skips it.
"""

from __future__ import annotations

import torch

from ...models import ModelConfig
from .base import (
    Architecture,
    Published,
    common_keys,
    gqa_model_config,
    gqa_problems,
    moe_config,
    refuse_gqa_options,
)
from .rules import (
    DECODER,
    FUSE_GLU,
    FUSED_EXPERTS,
    LAYER,
    PER_EXPERT,
    Rule,
    TensorOp,
    rope_rows,
)

REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
ROUTER = "layers.{i}.ffn.router.weight"
# the projections whose output rows are rotated: interleaved in ERNIE, halves in moekit
ROPE_ROWS = {"layers.{i}.attn.wq.weight": "rope_rows_q", "layers.{i}.attn.wk.weight": "rope_rows_k"}
# where the selection bias lives: on disk (save_pretrained) and in transformers' memory
BIAS_ON_DISK = f"{LAYER}.mlp.moe_statics.e_score_correction_bias"
BIAS_IN_MEMORY = f"{LAYER}.mlp.gate.moe_statics.e_score_correction_bias"

# e_score_correction_bias (1, E) <-> router.bias (E,): a reshape, its own exact inverse
ROW_BIAS = TensorOp("row_bias", lambda hf: hf[0].reshape(-1), lambda t: [t.reshape(1, -1)])


def _router_without_bias(hf: list) -> torch.Tensor:
    weight_ED, bias_1E = hf
    if torch.any(bias_1E != 0):
        raise ValueError("a nonzero e_score_correction_bias needs MoEConfig.selection_bias")
    return weight_ED


# a router without selection bias: gate.weight (E, D) plus zeros (1, E) for transformers
ROUTER_ZERO_BIAS = TensorOp(
    "router_zero_bias",
    _router_without_bias,
    lambda t: [t, torch.zeros(1, t.shape[0], dtype=torch.float32)],
)


def moe_layers(num_layers: int, start: int, end: int, interval: int) -> list[int]:
    """The MoE layers of transformers' Ernie4_5_MoeDecoderLayer (end -1: the last)."""
    end = num_layers - 1 if end == -1 else end
    return [i for i in range(num_layers) if (i + 1) % interval == 0 and start <= i <= end]


def layer_pattern(num_layers: int, layers: list[int]) -> tuple[int, int, int] | None:
    """(moe_layer_start_index, moe_layer_end_index, moe_layer_interval) giving exactly
    `layers`, or None. Every valid interval divides each i + 1; the smallest that works
    is written."""
    if not layers:
        return None
    start, end = layers[0], layers[-1]
    for interval in range(1, end + 2):
        if all((i + 1) % interval == 0 for i in layers):
            if moe_layers(num_layers, start, end, interval) == layers:
                return start, end, interval
    return None


def ernie_layer_fields(num_layers: int, layers: list[int], interval: int) -> dict:
    """ModelConfig's first_dense_layers, moe_every and dense_layers for these MoE layers:
    moekit's layer i is MoE when i >= first_dense_layers and (i - first_dense_layers + 1)
    % moe_every == 0, unless dense_layers lists it."""
    first = layers[0] if layers[0] % interval == 0 else 0
    candidates = [i for i in range(first, num_layers) if (i - first + 1) % interval == 0]
    return dict(
        first_dense_layers=first,
        moe_every=interval,
        dense_layers=[i for i in candidates if i not in layers],
    )


# config.json of baidu/ERNIE-4.5-300B-A47B-PT (Hugging Face Hub, 30 Jun 2025); 54 layers,
# the first three dense, no shared expert. Its one MTP layer (num_nextn_predict_layers) is
# not counted (transformers does not load it).
ERNIE_4_5_300B_A47B = {
    "model_type": "ernie4_5_moe",
    "vocab_size": 103424,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 54,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000,
    "use_bias": False,
    "moe_num_experts": 64,
    "moe_num_shared_experts": 0,
    "moe_layer_start_index": 3,
    "moe_layer_end_index": 53,
    "moe_layer_interval": 1,
    "moe_intermediate_size": 3584,
    "moe_k": 8,
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False,
}
# config.json of baidu/ERNIE-4.5-21B-A3B-PT (transformers' defaults are this model's)
ERNIE_4_5_21B_A3B = {
    "model_type": "ernie4_5_moe",
    "vocab_size": 103424,
    "hidden_size": 2560,
    "intermediate_size": 12288,
    "num_hidden_layers": 28,
    "num_attention_heads": 20,
    "num_key_value_heads": 4,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000,
    "use_bias": False,
    "moe_num_experts": 64,
    "moe_num_shared_experts": 2,
    "moe_layer_start_index": 1,
    "moe_layer_end_index": 27,
    "moe_layer_interval": 1,
    "moe_intermediate_size": 1536,
    "moe_k": 6,
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": True,
}


def ernie_4_5_300b_a47b() -> ModelConfig:
    return Ernie4_5Moe().to_moekit(ERNIE_4_5_300B_A47B)


def ernie_4_5_21b_a3b() -> ModelConfig:
    return Ernie4_5Moe().to_moekit(ERNIE_4_5_21B_A3B)


class Ernie4_5Moe(Architecture):
    name = "ernie4_5_moe"
    hf_class = "Ernie4_5_MoeForCausalLM"
    priority = 7
    # PEFT rewrites target_modules named gate_proj / up_proj / down_proj onto the routed
    # experts for this model_type, as for DeepSeek: the shared experts go as parameters
    shared_as_parameters = True
    # transformers 5's Ernie4_5_MoeConfig defaults
    defaults = dict(
        rope_theta=5e5,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        num_key_value_heads=4,
        intermediate_size=12288,
        moe_intermediate_size=1536,
        moe_k=6,
        moe_num_experts=64,
        moe_num_shared_experts=2,
        moe_layer_start_index=1,
        moe_layer_end_index=-1,
        moe_layer_interval=1,
        moe_norm_min=1e-12,
        tie_word_embeddings=True,
        use_bias=False,
        router_aux_loss_coef=0.001,
    )
    aliases = {
        "moe_num_experts": "num_experts",
        "moe_k": "num_experts_per_tok",
        "num_nextn_predict_layers": "num_mtp_layers",
    }
    # layer 0 dense; two shared experts of the routed width (one MLP of width 32); the
    # head untied (presets.tiny covers the tied one)
    tiny = dict(
        intermediate_size=40,
        moe_intermediate_size=16,
        moe_num_experts=8,
        moe_k=2,
        moe_num_shared_experts=2,
        moe_layer_start_index=1,
        tie_word_embeddings=False,
    )
    flagships = {
        "ernie_4_5_300b_a47b": ernie_4_5_300b_a47b,
        "ernie_4_5_21b_a3b": ernie_4_5_21b_a3b,
    }
    # 300B: counted 299.48B total, 47.08B active without the input-embedding lookup
    # (47.93B with it); 21B-A3B: 21.83B and 3.35B (3.35B with its tied table), the names'
    # rounding
    published = {
        "ernie_4_5_300b_a47b": Published(
            300e9,
            47e9,
            "Baidu, 'ERNIE 4.5 Technical Report' (30 Jun 2025), model table",
            active_without_input_embedding=True,
        ),
        "ernie_4_5_21b_a3b": Published(
            21e9, 3e9, "Baidu, 'ERNIE 4.5 Technical Report' (30 Jun 2025), model table"
        ),
    }

    # ------------------------------------------------------------ config.json

    def to_moekit(self, hf: dict) -> ModelConfig:
        hf = self.read(hf)
        hf.require(REQUIRED)
        refuse_gqa_options(hf)
        if hf.get("use_bias"):
            hf.refuse(
                "use_bias true (biases on the attention, the dense and shared MLPs and the "
                "head; moekit's MLPs have none)"
            )
        num_experts, num_layers = hf.get("moe_num_experts"), hf["num_hidden_layers"]
        norm_min = float(hf.get("moe_norm_min"))
        if norm_min > 1 / num_experts:
            hf.refuse(
                f"moe_norm_min {norm_min} (above 1/moe_num_experts: the clamp would act "
                "where moekit renormalises)"
            )
        interval = hf.get("moe_layer_interval")
        layers = moe_layers(
            num_layers, hf.get("moe_layer_start_index"), hf.get("moe_layer_end_index"), interval
        )
        if not layers:
            hf.refuse(
                f"moe_layer_start_index {hf.get('moe_layer_start_index')}, moe_layer_end_index "
                f"{hf.get('moe_layer_end_index')}, moe_layer_interval {interval} (no MoE layer)"
            )
        rope_theta, _ = hf.rope()
        hf.check()
        shared = hf.get("moe_num_shared_experts") or 0
        moe = moe_config(
            hf,
            d_hidden=hf.get("moe_intermediate_size"),
            num_experts=num_experts,
            top_k=hf.get("moe_k"),
            renormalize=True,
            selection_bias=True,
            num_shared_experts=shared,
            d_shared_hidden=hf.get("moe_intermediate_size") if shared else None,
        )
        fields = ernie_layer_fields(num_layers, layers, interval)
        config = gqa_model_config(
            hf, moe, rope_theta, d_hidden=hf.get("intermediate_size"), **fields
        )
        assert config.moe_layers == layers, (config.moe_layers, layers)
        return config

    def inexpressible(self, config: ModelConfig) -> list[str]:
        moe, problems = config.moe, gqa_problems(config, self.name, selection_bias=True)
        if config.qkv_bias or config.attn_out_bias:
            problems.append(
                "attention biases (ERNIE's use_bias also adds MLP biases, which moekit lacks)"
            )
        if not moe.renormalize:
            problems.append(f"renormalize false ({self.name} always renormalises)")
        if moe.num_shared_experts and moe.shared_expert_gate:
            problems.append(f"shared_expert_gate true ({self.name}'s shared experts are ungated)")
        if moe.num_shared_experts and moe.shared_hidden % moe.d_hidden:
            problems.append(
                f"shared width {moe.shared_hidden} (ERNIE's is a multiple of the experts' "
                f"width {moe.d_hidden})"
            )
        if layer_pattern(config.num_layers, config.moe_layers) is None:
            problems.append(
                f"MoE layers {config.moe_layers} (ERNIE's are every moe_layer_interval-th "
                "layer between two indices)"
            )
        if config.mtp_depth:
            problems.append(f"mtp_depth {config.mtp_depth} (ERNIE's MTP layer is not read)")
        return problems

    def to_hf(self, config: ModelConfig, dtype: str) -> dict:
        keys = common_keys(self, config, dtype)
        for key in ("num_experts_per_tok", "attention_dropout"):  # moe_k; not a setting
            del keys[key]
        return keys | self.hf_keys(config)

    def hf_keys(self, config: ModelConfig) -> dict:
        moe = config.moe
        start, end, interval = layer_pattern(config.num_layers, config.moe_layers)
        return {
            "intermediate_size": config.d_hidden,
            "head_dim": config.head_dim,
            "use_bias": False,
            "moe_intermediate_size": moe.d_hidden,
            "moe_num_experts": moe.num_experts,
            "moe_k": moe.top_k,
            "moe_num_shared_experts": moe.shared_hidden // moe.d_hidden,
            "moe_layer_start_index": start,
            "moe_layer_end_index": end,
            "moe_layer_interval": interval,
            "moe_norm_min": 1e-12,
        }

    # ------------------------------------------------------------ tensors

    def tables(self, config: ModelConfig, hf: dict) -> dict[str, tuple[Rule, ...]]:
        # one block of head_dim rows per head, all of them rotated
        rows = {
            name: rope_rows(op, config.head_dim, 0, config.head_dim)
            for name, op in ROPE_ROWS.items()
        }
        decoder = tuple(
            Rule(rule.moekit, rule.hf, rows[rule.moekit]) if rule.moekit in rows else rule
            for rule in DECODER
        )
        mlp = f"{LAYER}.mlp"
        shared = (
            Rule(
                "layers.{i}.ffn.shared.up.weight",
                (f"{mlp}.shared_experts.gate_proj.weight", f"{mlp}.shared_experts.up_proj.weight"),
                FUSE_GLU,
            ),
            Rule("layers.{i}.ffn.shared.down.weight", (f"{mlp}.shared_experts.down_proj.weight",)),
        )
        return {
            "per_expert": decoder
            + self.router(config, BIAS_ON_DISK)
            + _experts(PER_EXPERT)
            + shared,
            "fused": decoder
            + self.router(config, BIAS_IN_MEMORY)
            + _experts(FUSED_EXPERTS)
            + shared,
        }

    def router(self, config: ModelConfig, bias: str) -> tuple[Rule, ...]:
        """The gate and its selection bias (zeros on save when the model has none)."""
        gate = f"{LAYER}.mlp.gate.weight"
        if config.moe.selection_bias:
            return (Rule(ROUTER, (gate,)), Rule("layers.{i}.ffn.router.bias", (bias,), ROW_BIAS))
        return (Rule(ROUTER, (gate, bias), ROUTER_ZERO_BIAS),)

    def unloaded_prefixes(self, hf: dict) -> tuple[str, ...]:
        """The multi-token-prediction layer (model.mtp_block.0, mtp_emb_norm, ...), which
        transformers does not load either."""
        return ("model.mtp_", "mtp_")


def _experts(rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    return tuple(rule for rule in rules if rule.moekit != ROUTER)
