"""Tiny models for the tests, built in one place.

Hugging Face (transformers' classes; offline, seeded, fp32):
- `hf_model(name)`: a tiny random model of any registered architecture, from the family's
  `tiny` settings (interop/architectures/) over COMMON: three layers, eager attention,
  weights drawn wide (std 0.3; attention sinks std 1; selection biases std 0.1) so that
  routing, norms and biases all matter;
- `deepseek_case(name)`: DeepSeek-V2 / V3 variants (DEEPSEEK_CASES); `gpt_oss_model()`.

moekit:
- `decoder(kind)` / `decoder_config(kind)`: two-layer decoders of each attention kind
  (KINDS: gqa, mla, sinks); `options_decoder()` / `options_config()`: the decoder the
  family options (rotary_dim, norm, multipliers, head bias) are tested on; `moe_config()`;
- `lm_config()` / `seeded_lm()`: the training-step oracles' model; `parallel_config()`,
  `sharded_config()`: the parallel tests' models;
- TOKEN_CHOICE: the token-choice routers' settings for `helpers.make_moe`;
- traces: `identity()`, `make_trace()`, `record_layer()`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from moekit import MoEConfig
from moekit.interop import ARCHITECTURES
from moekit.models import ModelConfig, Transformer
from moekit.traces import ModelIdentity, Trace, record_routing

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def hf_model(name: str, settings: dict | None = None, **overrides):
    """The family's tiny random transformers model, in eval mode.

    Args:
        name: a registered architecture.
        settings: the whole config (default: COMMON | the family's `tiny`).
        overrides: config keys replacing those.
    """
    import transformers

    settings = (COMMON | ARCHITECTURES[name].tiny if settings is None else settings) | overrides
    config = transformers.AutoConfig.for_model(name, **settings)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            param.normal_(0.0, 1.0 if param_name.endswith("sinks") else 0.3)
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.1)
    return model


# Every Hugging Face test input: 2 sequences of 12 tokens.
TOKENS_BT = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))

# --- DeepSeek-V2 / V3: the variants the interop tests convert ---

DEEPSEEK_YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 1.0,
}
DEEPSEEK_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    kv_lora_rank=12,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=6,
    max_position_embeddings=64,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
DEEPSEEK_CASES = {
    # DeepSeek-V3: low-rank query, YaRN, 4 groups of 2 experts, 2 groups kept
    "v3": (
        "deepseek_v3",
        dict(q_lora_rank=16, n_group=4, topk_group=2, rope_parameters=DEEPSEEK_YARN),
    ),
    # a full query projection, the rotary dims in halves, two shared experts
    "v3_q_proj_halves": (
        "deepseek_v3",
        dict(q_lora_rank=None, n_group=2, topk_group=1, rope_interleave=False, n_shared_experts=2),
    ),
    # DeepSeek-V2: device-limited routing (group score = best probability), scaled weights
    "v2_group_limited": (
        "deepseek_v2",
        dict(
            q_lora_rank=16,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
            n_shared_experts=1,
        ),
    ),
    # DeepSeek-V2-Lite's shape: no query compression, plain top-k, YaRN
    "v2_lite_greedy": (
        "deepseek_v2",
        dict(
            q_lora_rank=None,
            topk_method="greedy",
            n_shared_experts=2,
            rope_parameters=DEEPSEEK_YARN,
        ),
    ),
}


def deepseek_case(case: str):
    """DEEPSEEK_CASES[case]'s tiny random transformers model (three layers, the first dense,
    eight experts), in eval mode, weights std 0.3 and score-correction biases std 0.1."""
    import transformers as t

    arch, options = DEEPSEEK_CASES[case]
    if arch == "deepseek_v3":
        model = t.DeepseekV3ForCausalLM(t.DeepseekV3Config(**DEEPSEEK_COMMON, **options))
    else:
        model = t.DeepseekV2ForCausalLM(t.DeepseekV2Config(**DEEPSEEK_COMMON, **options))
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.1)
    return model


# --- gpt-oss: four layers (sliding 0 and 2), YaRN with truncate false, the clamp at 1.5 ---

GPT_OSS_ROPE = {
    "rope_type": "yarn",
    "rope_theta": 150000.0,
    "factor": 4.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 16,
}


def gpt_oss_model(**overrides):
    """A tiny random GptOssForCausalLM (eager attention), weights drawn wide (std 0.3,
    sinks std 1); overrides replace any config setting."""
    import transformers

    settings = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4,
        max_position_embeddings=64,
        rope_parameters=dict(GPT_OSS_ROPE),
        swiglu_limit=1.5,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    config = transformers.GptOssConfig(**(settings | overrides))
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 1.0 if name.endswith("sinks") else 0.3)
    return model


# --- moekit decoders: one per attention kind ---


def moe_config(**overrides) -> MoEConfig:
    """D 16, 4 experts of width 8, top-2, softmax top-k (overrides: MoEConfig fields)."""
    return MoEConfig(**(dict(d_model=16, d_hidden=8, num_experts=4, top_k=2) | overrides))


# Multi-head latent attention's widths (a latent of 12, rotary 4 and plain 6 per query head).
MLA = dict(attention="mla", kv_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=5)
SINK_WINDOW = 3


def _sinks_moe() -> MoEConfig:
    return moe_config(
        router_bias=True, expert_bias=True, activation="swiglu_clamped"
    )  # gpt-oss's layer


DECODER = dict(vocab_size=32, d_model=16, num_layers=2, num_heads=4, max_seq_len=32)
KINDS = {
    # grouped-query: 4 query heads over 2 key/value heads of width 4
    "gqa": lambda: dict(num_kv_heads=2, moe=moe_config()),
    # latent attention with a compressed query
    "mla": lambda: dict(q_lora_rank=8, **MLA, moe=moe_config()),
    # gpt-oss: layer 0 slides (window 3), layer 1 is full; biased projections and experts
    "sinks": lambda: dict(
        num_kv_heads=2,
        attention="sinks",
        sliding_window=SINK_WINDOW,
        sliding_layers=[0],
        qkv_bias=True,
        attn_out_bias=True,
        moe=_sinks_moe(),
    ),  # fmt: skip
}


def decoder_config(kind: str = "gqa", **overrides) -> ModelConfig:
    """Two layers, D 16, 4 heads, vocabulary 32, max_seq_len 32, of attention kind (KINDS)."""
    return ModelConfig(**(DECODER | KINDS[kind]() | overrides))


@torch.no_grad()
def _widen(model: Transformer, kind: str) -> None:
    """Weights that make every part of the attention matter: latent attention's all std
    0.3; the sinks and biases of sink attention std 1; grouped-query's as initialised."""
    for name, param in model.named_parameters():
        if kind == "mla":
            param.normal_(0.0, 0.3)
        elif kind == "sinks" and name.endswith(("sinks", "bias")):
            param.normal_(0.0, 1.0)


def decoder(kind: str = "gqa", seed: int = 0, **overrides) -> Transformer:
    """decoder_config(kind, **overrides)'s Transformer after torch.manual_seed(seed), in eval
    mode, its weights widened for the kind."""
    torch.manual_seed(seed)
    model = Transformer(decoder_config(kind, **overrides)).eval()
    _widen(model, kind)
    return model


# The decoder options of further families (models/options.py), all of them on.
ALL_OPTIONS = dict(
    rotary_dim=4,
    norm="layer",
    embedding_multiplier=3.0,
    residual_multiplier=0.5,
    attention_multiplier=0.2,
    logits_scaling=2.5,
    lm_head_bias=True,
)


def options_config(**overrides) -> ModelConfig:
    """Two layers, D 16, 2 query heads over 1 key/value head (head dim 8), max_seq_len 16."""
    fields = dict(
        vocab_size=32, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, max_seq_len=16,
        moe=moe_config(),
    )  # fmt: skip
    return ModelConfig(**(fields | overrides))


def options_decoder(seed: int = 0, **overrides) -> Transformer:
    """options_config(**overrides)'s Transformer after torch.manual_seed(seed), in eval mode;
    its biases and final norm weight (zero and one at init) drawn std 0.5, so they show."""
    torch.manual_seed(seed)
    built = Transformer(options_config(**overrides)).eval()
    with torch.no_grad():
        for name, param in built.named_parameters():
            if name.endswith(".bias") or name == "norm.weight":
                param.copy_(torch.randn_like(param) * 0.5)
    return built


# --- the training-step oracles' language model (gradient accumulation, balance scopes,
# parallel layouts): an MoE in every layer ---

LM_VOCAB, LM_LENGTH = 40, 6
# Router settings whose routing is deterministic in training (no noise).
ROUTER_SETTINGS = {
    "softmax_topk": {},
    "sigmoid_topk": dict(router="sigmoid_topk", num_groups=2, topk_groups=1, routed_scaling=2.5),
    "switch": dict(router="switch", top_k=1, jitter_eps=0.0),
    "top_p": dict(router="top_p", top_p=0.6),
}


def lm_config(**moe):
    """ModelConfig of 2 MoE layers (d_model 16, 4 experts of width 12, top-2) and moe's
    MoEConfig overrides."""
    settings = dict(d_model=16, d_hidden=12, num_experts=4, top_k=2) | moe
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return ModelConfig(
            vocab_size=LM_VOCAB,
            d_model=16,
            num_layers=2,
            num_heads=2,
            max_seq_len=LM_LENGTH,
            moe=MoEConfig(**settings),
        )


def seeded_lm(config, seed: int = 0):
    """Transformer(config) after torch.manual_seed(seed), with random selection biases
    (so the sigmoid router's selection and scores disagree)."""
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor) and not isinstance(bias, nn.Parameter):
                bias.normal_(0.0, 0.2)
    return model


# --- the parallel tests' models (FSDP, expert parallelism, sharded checkpoints) ---


def parallel_config(router: str, mtp_depth: int = 0) -> ModelConfig:
    """router: a router name, or "deepseek" (multi-head latent attention, sigmoid groups)
    or "gpt_oss" (attention sinks and a sliding window, biased router and experts, the
    clamped SwiGLU). mtp_depth: multi-token-prediction modules (models/mtp.py). Two layers,
    D 16, 4 experts of width 16, max_seq_len 16."""
    # No balance loss: each rank's f_i * P_i over its own tokens is not the global one (a
    # known property of data parallelism, not of the sharding); z-loss is a plain mean.
    common = dict(balance_loss_coef=0.0, z_loss_coef=1e-3, bias_update_rate=0.01)
    model = dict(
        vocab_size=64, d_model=16, num_layers=2, num_heads=2, max_seq_len=16, mtp_depth=mtp_depth
    )
    if router == "deepseek":
        common |= dict(router="sigmoid_topk", num_groups=2, topk_groups=1, num_shared_experts=1)
        model |= dict(
            attention="mla", q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=8,
            qk_rope_head_dim=4, v_head_dim=8,
        )  # fmt: skip
    elif router == "gpt_oss":
        common |= dict(
            router="softmax_topk", router_bias=True, expert_bias=True,
            activation="swiglu_clamped",
        )  # fmt: skip
        model |= dict(attention="sinks", sliding_window=4, sliding_layers=[0], qkv_bias=True)
    else:
        common["router"] = router
    moe = MoEConfig(d_model=16, d_hidden=16, num_experts=4, top_k=2, **common)
    return ModelConfig(moe=moe, **model)


def sharded_config(router: str = "sigmoid_topk") -> ModelConfig:
    """The sharded checkpoints' model: biased router and experts (the expert biases are
    sharded with the experts); two layers, D 16, 4 experts of width 16."""
    moe = MoEConfig(
        d_model=16, d_hidden=16, num_experts=4, top_k=2, router=router,
        router_bias=True, expert_bias=True,
    )  # fmt: skip
    return ModelConfig(
        vocab_size=64, d_model=16, num_layers=2, num_heads=2, max_seq_len=16, moe=moe
    )


# --- MoE layers: the token-choice routers' settings (make_moe's defaults: D 8, E 4, K 2) ---

TOKEN_CHOICE = {
    "softmax_topk": dict(router="softmax_topk"),
    "softmax_topk_raw": dict(router="softmax_topk", renormalize=False),
    # DeepSeek-V2: group-limited (group score = its best probability), scaled, raw weights
    "softmax_topk_groups": dict(
        router="softmax_topk",
        num_experts=8,
        top_k=3,
        num_groups=4,
        topk_groups=2,
        routed_scaling=1.5,
        renormalize=False,
    ),
    "noisy_topk": dict(router="noisy_topk"),
    "switch": dict(router="switch", top_k=1, jitter_eps=0.2),
    "sigmoid_topk": dict(
        router="sigmoid_topk", num_experts=8, num_groups=4, topk_groups=2, routed_scaling=2.5
    ),
    "top_p": dict(router="top_p", num_experts=6, top_k=3, top_p=0.6),
    "gshard": dict(router="gshard", top_k=2),
    # GRIN / Phi-3.5-MoE; a wide threshold so the masks keep several experts
    "sparsemixer": dict(router="sparsemixer", jitter_eps=0.2),
    "sparsemixer_top3": dict(router="sparsemixer", num_experts=6, top_k=3, jitter_eps=0.3),
    # gpt-oss: biased router and experts, clamped SwiGLU (a small limit so the clamps act)
    "gpt_oss": dict(
        router="softmax_topk",
        router_bias=True,
        expert_bias=True,
        activation="swiglu_clamped",
        swiglu_limit=0.8,
    ),
    "sigmoid_topk_bias": dict(
        router="sigmoid_topk", num_experts=8, num_groups=4, topk_groups=2, router_bias=True
    ),
}


# --- routing traces ---


def identity(layers: int = 2, experts: int = 4, top_k: int = 2) -> ModelIdentity:
    """A moekit softmax top-k model's identity: layers.{i}.ffn, vocabulary 50, D 8, fp32."""
    return ModelIdentity(
        architecture="moekit:softmax_topk", layers=[f"layers.{i}.ffn" for i in range(layers)],
        blocks=list(range(layers)), num_blocks=layers, num_experts=experts, top_k=top_k,
        vocab_size=50, d_model=8, dtype="float32",
    )  # fmt: skip


def make_trace(lengths=(3, 5), layers=2, experts=4, top_k=2, seed=0, **parts) -> Trace:
    """A random trace of sequences of the given lengths (parts: fields to replace)."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(T * layers)])
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    fields = dict(
        tokens=torch.randint(0, 50, (T,), generator=g), offsets=offsets,
        ids=ids.reshape(T, layers, top_k).to(torch.int32),
        weights=torch.rand(T, layers, top_k, generator=g),
        logits=torch.randn(T, layers, experts, generator=g),
    )  # fmt: skip
    fields.update(parts)
    return Trace(model=identity(layers, experts, top_k), recording={"engine": "test"}, **fields)


def record_layer(moe, x, seed):
    """The trace of one MoE layer's forward over x (one sequence), seeded so that noisy,
    jittered and GShard routers draw the same as a forward seeded alike."""
    with record_routing(moe) as recorder:
        torch.manual_seed(seed)
        moe(x)
    return recorder.trace(torch.zeros(1, x.shape[0], dtype=torch.long))
