"""MiniMax-M2 (model_type minimax_m2): MiniMax 2025, the MiniMax-M2 model card (Hugging Face
Hub, MiniMaxAI/MiniMax-M2, 27 Oct 2025).

Mixtral's decoder and experts (mixtral.py) with:
    attention  an RMSNorm over the whole q and k projections (FlexOlmo's) -> qk_norm "full",
               with a head_dim of its own; no attention biases
    rotary     partial: the first R dims of each head in the rotate-half layout, R =
               head_dim * partial_rotary_factor, which the released checkpoints give as
               the legacy key `rotary_dim` (transformers reads rope_parameters'
               partial_rotary_factor first, then a top-level one, then rotary_dim /
               head_dim) -> ModelConfig.rotary_dim; default or YaRN rope
    router     sigmoid of the logits; the top k chosen on sigmoid + e_score_correction_bias
               (a buffer on the MoE block, not on its gate); weights the unbiased sigmoid
               scores of those k, renormalised -> sigmoid_topk with one group, renormalize,
               routed_scaling 1, its `router.bias` the correction bias
Every layer MoE, no shared expert. On disk the block is `block_sparse_moe` (gate, experts
w1/w3/w2 one by one, e_score_correction_bias); in memory `mlp` with fused experts.

Refused: router_jitter_noise > 0, attention_bias, an odd rotary width, sliding windows
(transformers' MiniMax-M2 ignores sliding_window; a set one is refused as ambiguous), and
the original remote code's keys at values it honours and transformers does not (linear
attention layers in attn_type_list, shared experts, grouped or scaled routing, no q/k norm,
no routing bias, softmax scoring). The multi-token-prediction modules (num_mtp_modules)
are not part of transformers' model: a checkpoint's model.layers.{L + k} are skipped.
"""

from __future__ import annotations

from ...models import ModelConfig
from .base import (
    STRUCTURE,
    Architecture,
    HFConfig,
    Published,
    dense_layer_indices,
    gqa_model_config,
    gqa_problems,
    moe_config,
    no_shared_expert,
    refuse_common,
    rope_parameters,
    trailing_layers,
)
from .rules import DECODER, FUSED_EXPERTS, LAYER, Rule, per_expert

# Keys of the original remote code (configuration_minimax_m2.py on the Hub) that transformers
# does not read, accepted at the values whose function transformers computes.
_ORIGINAL_CODE = dict(
    scoring_func="sigmoid",
    use_routing_bias=True,
    use_qk_norm=True,
    qk_norm_type="per_layer",
    routed_scaling_factor=1.0,
)

# MiniMaxAI/MiniMax-M2 config.json on the Hugging Face Hub (Oct 2025), the keys that shape
# the model; transformers' MiniMaxM2Config defaults are the same numbers. Besides these the
# file has attn_type_list (62 x 1: full attention), num_mtp_modules 3 with
# mtp_transformer_layers 1, and an FP8 quantization_config (128 x 128 blocks).
MINIMAX_M2 = {
    "model_type": "minimax_m2",
    "vocab_size": 200064,
    "hidden_size": 3072,
    "intermediate_size": 1536,
    "num_hidden_layers": 62,
    "num_attention_heads": 48,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rotary_dim": 64,
    "rope_theta": 5000000,
    "max_position_embeddings": 196608,
    "rms_norm_eps": 1e-6,
    "num_local_experts": 256,
    "num_experts_per_tok": 8,
    "scoring_func": "sigmoid",
    "use_routing_bias": True,
    "use_qk_norm": True,
    "qk_norm_type": "per_layer",
    "shared_intermediate_size": 0,
    "num_mtp_modules": 3,
    "mtp_transformer_layers": 1,
    "router_aux_loss_coef": 0.001,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}


def minimax_m2() -> ModelConfig:
    """MiniMax-M2 (230B total, 10B active), from its config.json (MINIMAX_M2)."""
    return MiniMaxM2().to_moekit(MINIMAX_M2)


class MiniMaxM2(Architecture):
    name = "minimax_m2"
    hf_class = "MiniMaxM2ForCausalLM"
    aliases = {"num_local_experts": "num_experts"}
    priority = 10
    # transformers' MiniMaxM2Config defaults for the keys a config.json may leave out
    defaults = dict(
        rope_theta=5e6,
        rms_norm_eps=1e-6,
        max_position_embeddings=196608,
        num_key_value_heads=8,
        head_dim=128,
        router_aux_loss_coef=0.001,
        tie_word_embeddings=False,
        initializer_range=0.02,
    )
    # head_dim 12 != hidden / heads, so the q/k norms are 48 and 24 wide; the legacy
    # rotary_dim key rotates 6 of the 12 dims of each head
    tiny = dict(
        intermediate_size=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=12,
        rotary_dim=6,
    )
    flagships = {"minimax_m2": minimax_m2}
    # The model card's "230 billion total parameters with 10 billion active". moekit counts
    # 228.7B (-0.6%): the 62 layers, embedding and head, not the 3 MTP modules (they would
    # add 11B). Active: 10.41B with the head but not the input lookup, which rounds to the
    # card's two digits; with the lookup 11.0B would not.
    published = {
        "minimax_m2": Published(
            230e9,
            10e9,
            "MiniMax, MiniMax-M2 model card (Hugging Face Hub MiniMaxAI/MiniMax-M2, 27 Oct 2025)",
            active_without_input_embedding=True,
        )
    }

    # ------------------------------------------------------------ config.json

    def to_moekit(self, hf: dict) -> ModelConfig:
        hf = self.read(hf)
        hf.require((*STRUCTURE, "intermediate_size", "num_local_experts"))
        refuse_common(hf)
        self._refuse_options(hf)
        head_dim = hf.get("head_dim")
        rotary = rotary_width(hf, head_dim)
        if rotary % 2 or not 0 < rotary <= head_dim:
            hf.refuse(f"a rotary width of {rotary} of head_dim {head_dim} (even, at most it)")
        rope_theta, rope_scaling = hf.rope(kinds=("default", "yarn"))
        hf.check()
        moe = moe_config(
            hf,
            d_hidden=hf["intermediate_size"],
            num_experts=hf["num_local_experts"],
            router="sigmoid_topk",
            renormalize=True,
        )
        return gqa_model_config(
            hf,
            moe,
            rope_theta,
            rope_scaling=rope_scaling,
            qk_norm="full",
            rotary_dim=None if rotary == head_dim else rotary,
        )

    def _refuse_options(self, hf: HFConfig) -> None:
        hf.refuse_set("router_jitter_noise")
        if hf.get("attention_bias", False):
            hf.refuse("attention_bias true (transformers' MiniMax-M2 has no attention biases)")
        window = hf.get("sliding_window")
        if hf.get("use_sliding_window", False) or (
            window is not None and window < hf.get("max_position_embeddings")
        ):
            hf.refuse(
                f"sliding_window {window} (transformers' MiniMax-M2 ignores it, the original "
                "code may not: ambiguous)"
            )
        layer_types = hf.get("layer_types") or []
        if any(kind != "full_attention" for kind in layer_types):
            hf.refuse(f"layer_types {sorted(set(layer_types))} (only full_attention)")
        if any(kind != 1 for kind in hf.get("attn_type_list") or []):
            hf.refuse("attn_type_list with linear-attention layers (0); MiniMax-M2 has none")
        for key, value in _ORIGINAL_CODE.items():
            if hf.hf.get(key) is not None and hf[key] != value:
                hf.refuse(f"{key} {hf[key]!r} ({self.name} has {value!r})")
        if hf.get("shared_intermediate_size") or 0:
            hf.refuse(
                f"shared_intermediate_size {hf['shared_intermediate_size']} (transformers' "
                "MiniMax-M2 has no shared expert)"
            )
        if (hf.get("num_expert_group") or 1) != 1:
            hf.refuse(f"num_expert_group {hf['num_expert_group']} (transformers' has no groups)")

    def inexpressible(self, config: ModelConfig) -> list[str]:
        problems = gqa_problems(
            config, self.name, qk_norm="full", yarn=True, router="sigmoid_topk", rotary_dim=True
        )
        problems += no_shared_expert(config)
        if dense_layer_indices(config):
            problems.append(f"dense layers {dense_layer_indices(config)}")
        if config.qkv_bias or config.attn_out_bias:
            problems.append("attention biases")
        if not config.moe.renormalize:  # groups and routed scaling: expect's
            problems.append(f"renormalize false ({self.name} renormalises the top-k weights)")
        rotary = config.rotary_dim or config.head_dim
        if int(config.head_dim * (rotary / config.head_dim)) != rotary:
            problems.append(
                f"rotary_dim {rotary} (not a partial_rotary_factor of {config.head_dim})"
            )
        if config.mtp_depth:
            problems.append(f"mtp_depth {config.mtp_depth} (transformers' MiniMax-M2 has no MTP)")
        return problems

    def hf_keys(self, config: ModelConfig) -> dict:
        rotary = config.rotary_dim or config.head_dim
        return {
            "intermediate_size": config.moe.d_hidden,
            "num_local_experts": config.moe.num_experts,
            "head_dim": config.head_dim,
            "rope_parameters": rope_parameters(config)
            | {"partial_rotary_factor": rotary / config.head_dim},
            "rotary_dim": rotary,  # what the original code and vLLM read
            "router_jitter_noise": 0.0,
        }

    # ------------------------------------------------------------ tensors

    def tables(self, config, hf):
        return {
            "per_expert": DECODER
            + per_expert("block_sparse_moe", "w1", "w3", "w2")
            + (
                Rule(
                    "layers.{i}.ffn.router.bias",
                    (f"{LAYER}.block_sparse_moe.e_score_correction_bias",),
                ),
            ),
            "fused": DECODER
            + FUSED_EXPERTS
            + (Rule("layers.{i}.ffn.router.bias", (f"{LAYER}.mlp.e_score_correction_bias",)),),
        }

    def unloaded_prefixes(self, hf: dict) -> tuple[str, ...]:
        """The MTP modules, model.layers.{L + k} (transformers does not build them)."""
        return trailing_layers(hf, hf.get("num_mtp_modules"))


def rotary_width(hf: HFConfig, head_dim: int) -> int:
    """The rotated dims of each head, as transformers' MiniMaxM2Config reads them:
    rope_parameters' partial_rotary_factor, else a top-level one, else rotary_dim / head_dim,
    else the whole head; then int(head_dim * factor) as its rotary embedding does."""
    rope = hf.hf.get("rope_parameters") or hf.hf.get("rope_scaling") or {}
    factor = rope.get("partial_rotary_factor") or hf.hf.get("partial_rotary_factor")
    if factor is None and hf.hf.get("rotary_dim") is not None:
        factor = hf.hf["rotary_dim"] / head_dim
    return int(head_dim * float(factor or 1.0))
