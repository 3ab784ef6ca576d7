"""The published MoEs, written from their published hyperparameters, for `moekit inspect`.

Each entry gives the hyperparameters with their source (the ModelConfigs themselves are in
models/published.py) and the published total and active figures the accounting is checked against (tests/test_inspect.py, within 1%). Where
moekit's Transformer can express the model (DeepSeek-V2 and V3 with their multi-head latent
attention included), the entry is a ModelConfig counted on the meta device; where it
cannot (the encoder-decoder Switch Transformers, the rumoured GPT-4, DeepSeek-V3's
multi-token-prediction module), those parts are counted from their widths by formula,
and the notes say so.
"""

from __future__ import annotations

from collections.abc import Callable

from ..models import published
from ..models.published import (  # the configs, for callers that count one themselves
    deepseek_v2,
    gpt_oss_20b,
    gpt_oss_120b,
    grok_1,
    mixtral_8x7b,
    mixtral_8x22b,
    olmoe_1b_7b,
    qwen1_5_moe_a2_7b,
)
from .accounting import PARTS, Accounting, count_by_part
from .architectures import ARCHITECTURES, Published

__all__ = [
    "FAMOUS",
    "PUBLISHED",
    "Published",
    "deepseek_v2",
    "deepseek_v3",
    "gpt4_rumoured",
    "gpt_oss_20b",
    "gpt_oss_120b",
    "grok_1",
    "mixtral_8x7b",
    "mixtral_8x22b",
    "olmoe_1b_7b",
    "qwen1_5_moe_a2_7b",
    "switch_transformer",
]


def deepseek_v3() -> Accounting:
    """DeepSeek-V3 (671B / 37B): the runnable model (models/published.py) counted on the
    meta device, multi-head latent attention included.

    The multi-token-prediction module is not in the total (the paper's 671B excludes it);
    its size is listed under `excluded`.
    """
    config = published.deepseek_v3()
    accounting = count_by_part(config, "deepseek_v3")
    # One MTP module (paper section 2.2): an MLA + MoE block, the projection M (d x 2d), the
    # RMSNorms on its two inputs and its own final norm; embedding and head are shared.
    d, layers = config.d_model, config.num_layers
    attn = accounting.total["attention"] // layers
    block_norms = (accounting.total["norms"] - d) // layers  # the final norm is not a block's
    moe_layer = sum(
        accounting.total[p] for p in ("router", "routed_experts", "shared_experts")
    ) // len(config.moe_layers)
    mtp = attn + moe_layer + block_norms + 2 * d * d + 3 * d
    accounting.excluded["mtp_module"] = mtp
    accounting.excluded["mtp_module_with_stored_embedding_and_head"] = (
        mtp + accounting.total["embeddings"]
    )
    accounting.notes += [
        "router: the 256 x 7168 gate per MoE layer; its 256 balancing biases are buffers, not counted",
        "not included: the multi-token-prediction module (see excluded)",
    ]
    return accounting


def switch_transformer(
    num_experts: int,
    *,
    d_model: int = 768,
    num_heads: int = 12,
    head_dim: int = 64,
    d_ff: int = 3072,
    num_layers: int = 12,
    vocab_size: int = 32128,
    buckets: int = 32,
) -> Accounting:
    """Switch-Base (Fedus et al. 2022, JMLR, Table 9): a T5-Base encoder-decoder whose every
    other FFN (layers 2, 4, ... of both stacks) is a top-1 switch layer.

    Counted by formula, encoder and decoder together: d_model 768, 12 heads of 64, FFN
    width 3072 (ReLU, no gate), 12 + 12 layers, vocabulary 32128, T5's weight-only
    LayerNorms, relative position buckets (32 x 12 in the first layer of each stack), one
    embedding shared by both stacks and the output head (tie_word_embeddings).
    """
    d, heads, ff, layers, vocab = d_model, num_heads, d_ff, num_layers, vocab_size
    attn = 4 * d * heads * head_dim
    ffn = 2 * d * ff
    moe_layers = layers // 2  # per stack
    total = dict.fromkeys(PARTS, 0)
    total["embeddings"] = vocab * d
    total["attention"] = layers * attn + layers * 2 * attn + 2 * buckets * heads
    total["norms"] = layers * 2 * d + layers * 3 * d + 2 * d
    total["dense_ffn"] = 2 * (layers - moe_layers) * ffn
    total["routed_experts"] = 2 * moe_layers * num_experts * ffn
    total["router"] = 2 * moe_layers * num_experts * d
    active = dict(total, routed_experts=2 * moe_layers * ffn)
    notes = [
        "encoder and decoder both counted (the published figures count the whole model)",
        "attention includes the decoder's cross-attention and the relative position buckets",
        "KV cache: the decoder's self-attention per generated token (cross-attention keys "
        "and values are cached once per source token on top)",
    ]
    return Accounting(
        f"switch_base_{num_experts}",
        total,
        active,
        notes=notes,
        kv_bytes_per_layer=2 * heads * head_dim * 2,
        kv_layers=layers,
    )


def gpt4_rumoured() -> Accounting:
    """The rumoured GPT-4 arithmetic (Patel & Wong, SemiAnalysis, "GPT-4 Architecture,
    Infrastructure, Training Dataset, Costs, Vision, MoE", 10 July 2023).

    The source states: 120 layers; 16 experts of about 111B MLP parameters each, 2 routed
    per token; about 55B shared attention parameters; about 1.8T in total and about 280B
    used per token. It gives no widths, so these are assumed: d_model 10752 (84 heads of
    128, multi-head attention: 4 * d^2 * 120 = 55.5B), non-gated experts of width 4 * d
    (2 * d * 4d * 120 = 111.0B each), the cl100k vocabulary (100277 tokens), untied.
    """
    d, layers, experts, vocab = 10752, 120, 16, 100277
    ffn = 2 * d * 4 * d
    total = dict.fromkeys(PARTS, 0)
    total["embeddings"] = 2 * vocab * d
    total["attention"] = layers * 4 * d * d
    total["norms"] = layers * 2 * d + d
    total["routed_experts"] = layers * experts * ffn
    total["router"] = layers * experts * d
    active = dict(total, routed_experts=layers * 2 * ffn)
    notes = [
        "hyperparameters assumed from a rumour, not published by OpenAI (see the docstring)",
        "published: the source's parts, 16 x ~111B + ~55B = ~1.83T (its headline rounds to ~1.8T)",
    ]
    return Accounting(
        "gpt4_rumoured",
        total,
        active,
        input_embedding=vocab * d,
        notes=notes,
        kv_bytes_per_layer=2 * d * 2,  # keys and values of the assumed multi-head attention
        kv_layers=layers,
    )


def _with_grok_norms(accounting: Accounting) -> Accounting:
    accounting.add("norms", 2 * 64 * 6144)  # two more RMSNorms per layer than moekit's block
    accounting.notes.append("norms: four RMSNorms per layer, as in Grok-1")
    return accounting


def _counted(name: str, build) -> Callable[[], Accounting]:
    return lambda: count_by_part(build(), name)


# The Hugging Face families' flagships (each architecture's file names them and their
# published figures), then the models moekit counts here.
FAMOUS: dict[str, Callable[[], Accounting]] = {
    name: _counted(name, build)
    for arch in ARCHITECTURES.values()
    for name, build in arch.flagships.items()
}
FAMOUS |= {
    "deepseek_v3": deepseek_v3,
    "grok_1": lambda: _with_grok_norms(count_by_part(grok_1(), "grok_1")),
    "switch_base_8": lambda: switch_transformer(8),
    "switch_base_128": lambda: switch_transformer(128),
    "gpt4_rumoured": gpt4_rumoured,
}
_SWITCH = (
    "Fedus et al. 2022, Switch Transformers (JMLR), distillation tables: T5-Base 223M; Switch-Base"
)
PUBLISHED: dict[str, Published] = {
    name: figures for arch in ARCHITECTURES.values() for name, figures in arch.published.items()
}
PUBLISHED |= {
    # xAI states the active share only as "25% of the weights": top_k / E = 2 / 8 of the experts.
    "grok_1": Published(314e9, None, "xAI, 'Open Release of Grok-1' (17 Mar 2024)"),
    "switch_base_8": Published(None, 223e6, f"{_SWITCH} FLOP-matched to T5-Base"),
    "switch_base_128": Published(7.4e9, 223e6, f"{_SWITCH} with 128 experts 7.4B"),
    # The source's parts: 16 experts x ~111B + ~55B shared = ~1.83T (its headline rounds to ~1.8T).
    "gpt4_rumoured": Published(
        16 * 111e9 + 55e9,
        280e9,
        "Patel & Wong, SemiAnalysis, 'GPT-4 Architecture, Infrastructure, ...' (10 Jul 2023)",
    ),
}
