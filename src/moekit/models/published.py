"""Published MoE language models as moekit ModelConfigs, from their papers and config.json.

The configs alone (interop/famous.py adds the published parameter counts and the parts
those counts leave out, such as DeepSeek-V3's multi-token-prediction module); `moekit
inspect` and `moekit bench comm` use them.
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


def deepseek_v3() -> ModelConfig:
    """DeepSeek-V3: DeepSeek-AI 2024 (arXiv:2412.19437), section 4.2, and its config.json.

    61 layers, d_model 7168, the first 3 dense (FFN width 18432), the other 58 with 256
    routed experts of width 2048 (top 8, sigmoid scores, 8 groups of which 4 are used,
    routed scaling 2.5) plus one shared expert of width 2048; vocabulary 129280, untied.
    Multi-head latent attention: 128 heads, q rank 1536, kv rank 512, per-head no-rope
    dim 128, rope dim 64, value dim 128; YaRN to 160K positions (factor 40 over 4096,
    mscale = mscale_all_dim = 1). The multi-token-prediction module is not part of it
    (mtp_depth 0, as in the paper's 671B; the released model has mtp_depth 1).
    """
    d_model = 7168
    return ModelConfig(
        vocab_size=129280,
        d_model=d_model,
        num_layers=61,
        **_deepseek_attention(mscale=1.0),
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


def deepseek_v2() -> ModelConfig:
    """DeepSeek-V2: DeepSeek-AI 2024 (arXiv:2405.04434), section 3.1.2, and its config.json.

    60 layers, d_model 5120, the first dense (FFN width 12288), the other 59 with 160
    routed experts of width 1536 (top 6 of softmax scores, device-limited to 3 of 8
    groups, weights times 16 and not renormalised) plus two shared experts of width
    1536; vocabulary 102400, untied. Multi-head latent attention: 128 heads, q rank 1536,
    kv rank 512, per-head no-rope dim 128, rope dim 64, value dim 128; YaRN to 160K
    positions (factor 40 over 4096, mscale = mscale_all_dim = 0.707).
    """
    d_model = 5120
    return ModelConfig(
        vocab_size=102400,
        d_model=d_model,
        num_layers=60,
        **_deepseek_attention(mscale=0.707),
        d_hidden=12288,
        first_dense_layers=1,
        moe=MoEConfig(
            d_model=d_model,
            d_hidden=1536,
            num_experts=160,
            top_k=6,
            router="softmax_topk",
            renormalize=False,
            num_groups=8,
            topk_groups=3,
            routed_scaling=16.0,
            num_shared_experts=2,
        ),
    )


def _deepseek_attention(mscale: float) -> dict:
    """The ModelConfig fields DeepSeek-V2 and V3 share: multi-head latent attention (128
    heads, q rank 1536, kv rank 512, no-rope 128, rope 64, value 128), YaRN to 160K
    positions (factor 40 over 4096, mscale = mscale_all_dim = mscale), RMSNorm eps 1e-6,
    untied embeddings."""
    yarn = {
        "type": "yarn",
        "factor": 40.0,
        "original_max_seq_len": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": mscale,
        "mscale_all_dim": mscale,
    }
    return dict(
        num_heads=128,
        attention="mla",
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        max_seq_len=163840,
        rope_scaling=yarn,
        norm_eps=1e-6,
        tied_embeddings=False,
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
    "deepseek_v3": deepseek_v3,
    "deepseek_v2": deepseek_v2,
    "gpt_oss_120b": gpt_oss_120b,
    "gpt_oss_20b": gpt_oss_20b,
}
