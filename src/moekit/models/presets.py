"""Model presets: plain functions returning a ModelConfig, plus a registry for the CLI.

Parameter counts (from `count_parameters`, tied embeddings counted once):
    tiny        total   4.27 M, active  1.52 M per token
    tiny_dense  total   1.51 M, active  1.51 M
    small       total 119.08 M, active 42.01 M per token
    small_dense total  41.95 M, active 41.95 M
    deepseek_v3_tiny total 3.44 M, active 1.52 M per token (MLA, sigmoid groups)
    gpt_oss_tiny total 4.43 M, active 2.05 M per token (untied: the head is 0.5 M more)
A twin's active count is the MoE's minus its routers (E * D per MoE layer, plus the
router and expert biases where there are some).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..config import MoEConfig
from .accounting import active_expert_fraction
from .transformer import ModelConfig


def tiny() -> ModelConfig:
    """The CPU default: trains in a few minutes on 2 cores.

    The vocabulary (4096) matches a small BPE trained on the corpus; with d_model 128 the
    tied embedding is 0.5 M of the 1.51 M active parameters. DeepSeekMoE-style: 16
    fine-grained experts of width 128 with top_k 2 plus one always-on shared expert of
    width 256, so a token uses 2 x 128 + 256 = 512 hidden units (a dense SwiGLU of width
    512 is 4 x d_model) out of 16 x 128 + 256 = 2304: 4.5x the FFN parameters of its dense
    twin at the same FLOPs. On the default comparison this beat 8 experts of width 256
    with top_k 2 (no shared expert) and the top-1 variants (docs/results.md). Dropless
    (capacity_factor None): no token is lost, and generation with a KV cache equals the
    full forward. Two key/value heads (grouped-query attention) halve the cache as in
    Mixtral.
    """
    return ModelConfig(
        vocab_size=4096,
        d_model=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=256,
        moe=MoEConfig(
            d_model=128,
            d_hidden=128,
            num_experts=16,
            top_k=2,
            router="softmax_topk",
            num_shared_experts=1,
            d_shared_hidden=256,
            balance_loss_coef=0.01,
            z_loss_coef=1e-3,
        ),
    )


def small() -> ModelConfig:
    """A GPU-sized model (42 M active, 119 M total parameters).

    DeepSeekMoE-style: 16 fine-grained experts of width 512 with top_k 2 plus one always-on
    shared expert of width 512, so a token uses 1536 hidden units (about 8/3 * d_model, a
    dense SwiGLU's width). The first layer stays dense, as in DeepSeek-V3, since routing
    raw embeddings balances poorly. Vocabulary 32768 suits a BPE on a general corpus.
    """
    d_model = 512
    return ModelConfig(
        vocab_size=32768,
        d_model=d_model,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        max_seq_len=1024,
        d_hidden=1536,
        first_dense_layers=1,
        moe=MoEConfig(
            d_model=d_model,
            d_hidden=512,
            num_experts=16,
            top_k=2,
            router="softmax_topk",
            num_shared_experts=1,
            balance_loss_coef=0.01,
            z_loss_coef=1e-3,
        ),
    )


def deepseek_v3_tiny() -> ModelConfig:
    """DeepSeek-V3's recipe at tiny()'s size: trains in about the time tiny() does.

    Multi-head latent attention with small ranks (4 heads; q rank 64, kv rank 32, per-head
    no-rope 32, rope 16, value 32): the cache holds 32 + 16 = 48 values per token and layer
    against tiny()'s 2 x 2 x 32 = 128. Sigmoid routing over 16 experts of width 128, top 3
    inside the best 2 of 4 groups, balanced by the aux-loss-free bias updates (rate 1e-3,
    as DeepSeek-V3) with no balance loss; one shared expert of the experts' width, as in
    DeepSeek-V3, so a token uses 3 x 128 + 128 = 512 hidden units, as in tiny(); the first
    layer dense, of that width (so `dense_twin` applies). The top-3 weights are
    renormalised and not scaled (DeepSeek-V3's routed_scaling 2.5 goes with its top 8).
    Every setting has a deepseek_v3 config.json equivalent, so it converts to transformers.
    """
    d_model = 128
    return ModelConfig(
        vocab_size=4096,
        d_model=d_model,
        num_layers=4,
        num_heads=4,
        attention="mla",
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_seq_len=256,
        d_hidden=512,
        first_dense_layers=1,
        moe=MoEConfig(
            d_model=d_model,
            d_hidden=128,
            num_experts=16,
            top_k=3,
            router="sigmoid_topk",
            num_groups=4,
            topk_groups=2,
            bias_update_rate=1e-3,
            num_shared_experts=1,
            balance_loss_coef=0.0,
            z_loss_coef=1e-3,
        ),
    )


def gpt_oss_tiny() -> ModelConfig:
    """gpt-oss's recipe (OpenAI 2025, arXiv:2508.10925) at the size of tiny().

    Attention sinks, a 64-token sliding window in layers 0 and 2 and full attention in 1
    and 3 (gpt-oss alternates them), q/k/v and output biases; 16 experts of width 128 with
    biases and the clamped SwiGLU, top 4 by a router with a bias: 4 x 128 = 512 hidden
    units per token, as tiny's 2 x 128 + 256, with no shared expert (gpt-oss has none).
    Untied embeddings, as gpt-oss. Plain rotary positions: YaRN only matters past the
    trained context, and this one trains at its full 256.
    """
    d_model = 128
    return ModelConfig(
        vocab_size=4096,
        d_model=d_model,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        qkv_bias=True,
        attn_out_bias=True,
        attention="sinks",
        sliding_window=64,
        sliding_layers=[0, 2],
        max_seq_len=256,
        tied_embeddings=False,
        moe=MoEConfig(
            d_model=d_model,
            d_hidden=128,
            num_experts=16,
            top_k=4,
            router="softmax_topk",
            router_bias=True,
            expert_bias=True,
            activation="swiglu_clamped",
            balance_loss_coef=0.01,
            z_loss_coef=1e-3,
        ),
    )


def dense_twin(config: ModelConfig) -> ModelConfig:
    """A dense model with the same active FFN parameters (and FLOPs) per token as `config`.

    Every MoE FFN becomes a dense MLP of width
        active experts per token * expert d_hidden + shared experts' hidden
    (top_k * d_hidden + shared for token-choice routers; see active_expert_fraction for the
    others). Everything else is unchanged, so the twin's active count equals the MoE's
    minus the routers. A hybrid config's dense layers must already have that width, since
    the twin has one width for all layers.

    Args:
        config: a ModelConfig with moe set.
    Returns:
        The dense ModelConfig.
    """
    moe = config.moe
    if moe is None:
        raise ValueError("dense_twin needs a config with moe set; this one is already dense")
    if moe.activation == "swiglu_clamped" and (moe.swiglu_alpha, moe.swiglu_limit) != (1.702, 7.0):
        raise ValueError(
            f"the dense twin's MLP has the clamped SwiGLU's defaults (alpha 1.702, limit 7.0), "
            f"not swiglu_alpha {moe.swiglu_alpha}, swiglu_limit {moe.swiglu_limit}"
        )
    active_experts = active_expert_fraction(moe) * moe.num_experts
    width = round(active_experts * moe.d_hidden) + moe.shared_hidden
    if len(config.moe_layers) < config.num_layers and config.d_hidden != width:
        raise ValueError(
            f"the config's dense layers have d_hidden ({config.d_hidden}) but the twin's width "
            f"would be {width}; set d_hidden to {width} for a twin of a hybrid config"
        )
    return dataclasses.replace(
        config,
        moe=None,
        d_hidden=width,
        activation=moe.activation,
        moe_every=1,
        first_dense_layers=0,
    )


def tiny_dense() -> ModelConfig:
    """The dense twin of tiny(): the baseline for MoE-versus-dense runs."""
    return dense_twin(tiny())


def small_dense() -> ModelConfig:
    """The dense twin of small()."""
    return dense_twin(small())


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny,
    "tiny_dense": tiny_dense,
    "small": small,
    "small_dense": small_dense,
    "deepseek_v3_tiny": deepseek_v3_tiny,
    "gpt_oss_tiny": gpt_oss_tiny,
}
