"""Published MoE language models as moekit ModelConfigs, from their papers and config.json.

The configs alone (interop/famous.py adds the published parameter counts and the parts
moekit's Transformer cannot express); `moekit inspect` and `moekit bench --comm` use them.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import MoEConfig
from .transformer import ModelConfig


def mixtral_8x7b() -> ModelConfig:
    """Mixtral 8x7B: Jiang et al. 2024, "Mixtral of Experts" (arXiv:2401.04088), Table 1."""
    return ModelConfig(
        vocab_size=32000,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        max_seq_len=32768,
        rope_theta=1e6,
        norm_eps=1e-5,
        tied_embeddings=False,
        moe=MoEConfig(d_model=4096, d_hidden=14336, num_experts=8, top_k=2),
    )


def mixtral_8x22b() -> ModelConfig:
    """Mixtral 8x22B: the config.json of mistralai/Mixtral-8x22B-v0.1 (April 2024)."""
    return ModelConfig(
        vocab_size=32000,
        d_model=6144,
        num_layers=56,
        num_heads=48,
        num_kv_heads=8,
        max_seq_len=65536,
        rope_theta=1e6,
        norm_eps=1e-5,
        tied_embeddings=False,
        moe=MoEConfig(d_model=6144, d_hidden=16384, num_experts=8, top_k=2),
    )


def qwen1_5_moe_a2_7b() -> ModelConfig:
    """Qwen1.5-MoE-A2.7B: the config.json of Qwen/Qwen1.5-MoE-A2.7B (March 2024).

    60 routed experts of width 1408 (top 4) plus one gated shared expert of width 5632;
    q/k/v biases; untied embeddings.
    """
    return ModelConfig(
        vocab_size=151936,
        d_model=2048,
        num_layers=24,
        num_heads=16,
        num_kv_heads=16,
        qkv_bias=True,
        max_seq_len=8192,
        rope_theta=1e6,
        norm_eps=1e-6,
        tied_embeddings=False,
        d_hidden=5632,
        moe=MoEConfig(
            d_model=2048,
            d_hidden=1408,
            num_experts=60,
            top_k=4,
            renormalize=False,
            num_shared_experts=1,
            d_shared_hidden=5632,
            shared_expert_gate=True,
        ),
    )


def olmoe_1b_7b() -> ModelConfig:
    """OLMoE-1B-7B: Muennighoff et al. 2024, "OLMoE" (arXiv:2409.02060), Table 1 / config.json.

    64 experts of width 1024, top 8, no renormalisation; RMSNorm over the whole q and k.
    """
    return ModelConfig(
        vocab_size=50304,
        d_model=2048,
        num_layers=16,
        num_heads=16,
        num_kv_heads=16,
        qk_norm="full",
        max_seq_len=4096,
        rope_theta=1e4,
        norm_eps=1e-5,
        tied_embeddings=False,
        moe=MoEConfig(d_model=2048, d_hidden=1024, num_experts=64, top_k=8, renormalize=False),
    )


def grok_1() -> ModelConfig:
    """Grok-1: xAI's released code (github.com/xai-org/grok-1, run.py and model.py).

    64 layers, d_model 6144, 48 query / 8 key-value heads of 128, vocabulary 131072 with
    the input embedding reused as the output head, 8 experts (top 2) of width
    ffn_size(6144, widening 8) = int(8 * 6144) * 2 // 3 = 32768. Its four RMSNorms per
    layer (around attention and around the FFN) are added in `accounting_of`.
    """
    return ModelConfig(
        vocab_size=131072,
        d_model=6144,
        num_layers=64,
        num_heads=48,
        num_kv_heads=8,
        head_dim=128,
        max_seq_len=8192,
        tied_embeddings=True,
        moe=MoEConfig(d_model=6144, d_hidden=32768, num_experts=8, top_k=2),
    )


def deepseek_v3_skeleton() -> ModelConfig:
    """DeepSeek-V3 without its attention: DeepSeek-AI 2024 (arXiv:2412.19437), section 4.2.

    61 layers, d_model 7168, the first 3 dense (FFN width 18432), the other 58 with 256
    routed experts of width 2048 (top 8, sigmoid scores, 8 groups of which 4 are used,
    routed scaling 2.5) plus one shared expert of width 2048; vocabulary 129280, untied.
    The attention here is a placeholder that `deepseek_v3` replaces by the MLA count.
    """
    d_model = 7168
    return ModelConfig(
        vocab_size=129280,
        d_model=d_model,
        num_layers=61,
        num_heads=128,
        num_kv_heads=128,
        max_seq_len=4096,
        tied_embeddings=False,
        d_hidden=18432,
        first_dense_layers=3,
        moe=MoEConfig(
            d_model=d_model,
            d_hidden=2048,
            num_experts=256,
            top_k=8,
            router="sigmoid_topk",
            num_groups=8,
            topk_groups=4,
            routed_scaling=2.5,
            num_shared_experts=1,
        ),
    )


def _gpt_oss(num_layers: int, num_experts: int) -> ModelConfig:
    """gpt-oss: OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card" (arXiv:2508.10925),
    and the config.json of openai/gpt-oss-120b and openai/gpt-oss-20b.

    d_model 2880; 64 query and 8 key/value heads of 64 with q/k/v/output biases and one
    attention sink per head; layers alternate a 128-token sliding window (even layers,
    0-based) and full attention; YaRN rotary positions (theta 150000, factor 32 over 4096,
    131072 in all); experts of width 2880 with biases and the clamped SwiGLU (alpha
    1.702, limit 7), top 4 by a router with a bias; vocabulary 201088 (o200k_harmony),
    untied embeddings.
    """
    d_model = 2880
    return ModelConfig(
        vocab_size=201088,
        d_model=d_model,
        num_layers=num_layers,
        num_heads=64,
        num_kv_heads=8,
        head_dim=64,
        qkv_bias=True,
        attn_out_bias=True,
        attention="sinks",
        sliding_window=128,
        sliding_layers=list(range(0, num_layers, 2)),
        max_seq_len=131072,
        rope_theta=150000.0,
        rope_scaling={
            "type": "yarn",
            "factor": 32.0,
            "original_max_seq_len": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
        },
        norm_eps=1e-5,
        tied_embeddings=False,
        moe=MoEConfig(
            d_model=d_model,
            d_hidden=2880,
            num_experts=num_experts,
            top_k=4,
            router_bias=True,
            expert_bias=True,
            activation="swiglu_clamped",
        ),
    )


def gpt_oss_120b() -> ModelConfig:
    """gpt-oss-120b: 36 layers, 128 experts (see _gpt_oss for the source)."""
    return _gpt_oss(num_layers=36, num_experts=128)


def gpt_oss_20b() -> ModelConfig:
    """gpt-oss-20b: 24 layers, 32 experts (see _gpt_oss for the source)."""
    return _gpt_oss(num_layers=24, num_experts=32)


PUBLISHED_CONFIGS: dict[str, Callable[[], ModelConfig]] = {
    "mixtral_8x7b": mixtral_8x7b,
    "mixtral_8x22b": mixtral_8x22b,
    "qwen1_5_moe_a2_7b": qwen1_5_moe_a2_7b,
    "olmoe_1b_7b": olmoe_1b_7b,
    "grok_1": grok_1,
    "deepseek_v3_skeleton": deepseek_v3_skeleton,
    "gpt_oss_120b": gpt_oss_120b,
    "gpt_oss_20b": gpt_oss_20b,
}
