"""Tiny random Hugging Face MoE folders for the doctor's tests, and the faults injected
into them (on the transformers model, then saved: the faults live in the files).

Each builder returns a transformers model; `save(model, folder)` writes it with a
tokenizer.json, so the doctor's routing checks run on its built-in text.
"""

from __future__ import annotations

import torch

VOCAB = 256
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
ARCHS = ("mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss")
# every family moekit converts (the false-positive measurement, bench/doctor_false_positives.py)
ALL_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss")


def build(arch: str, seed: int = 0):
    """A tiny random model of arch with 8 experts, top-2 (weights std 0.1, routers 0.3)."""
    import transformers as t

    if arch in ("qwen3_moe", "olmoe"):
        config = (t.Qwen3MoeConfig if arch == "qwen3_moe" else t.OlmoeConfig)(
            **COMMON, intermediate_size=40, moe_intermediate_size=16, num_experts=8,
            num_experts_per_tok=2,
        )  # fmt: skip
        if arch == "olmoe":
            config.intermediate_size = 16
        cls = t.Qwen3MoeForCausalLM if arch == "qwen3_moe" else t.OlmoeForCausalLM
    elif arch == "deepseek_v2":
        settings = COMMON | dict(intermediate_size=48, moe_intermediate_size=16)
        settings.pop("num_key_value_heads")
        config = t.DeepseekV2Config(
            **settings, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
            kv_lora_rank=12, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=6, n_shared_experts=1, topk_method="greedy",
        )  # fmt: skip
        cls = t.DeepseekV2ForCausalLM
    elif arch == "mixtral":
        config = t.MixtralConfig(
            **COMMON, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2
        )
        cls = t.MixtralForCausalLM
    elif arch == "qwen2_moe":
        config = t.Qwen2MoeConfig(
            **COMMON,
            intermediate_size=40,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
        )
        cls = t.Qwen2MoeForCausalLM
    elif arch == "deepseek_v3":
        settings = COMMON | dict(intermediate_size=48, moe_intermediate_size=16)
        settings.pop("num_key_value_heads")
        config = t.DeepseekV3Config(
            **settings,
            n_routed_experts=8,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            kv_lora_rank=12,
            q_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=6,
            n_group=2,
            topk_group=2,
        )
        cls = t.DeepseekV3ForCausalLM
    else:
        config = t.GptOssConfig(
            **COMMON,
            intermediate_size=16,
            head_dim=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=16,
        )
        config._attn_implementation = "eager"
        cls = t.GptOssForCausalLM
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.3 if _is_router(name) else 0.1)
    return model


def save(model, folder, tokenizer: bool = False) -> None:
    """save_pretrained, and with tokenizer a byte-level BPE tokenizer.json of VOCAB tokens
    (without, the doctor calibrates on random token ids: every expert's share is then
    near uniform in these random models)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    model.save_pretrained(folder)
    if not tokenizer:
        return
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([_TEXT] * 4, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))


_TEXT = "the quick brown fox jumps over the lazy dog; def f(x): return x * 2 + 1\n" * 8


def _is_router(name: str) -> bool:
    return name.endswith(("mlp.gate.weight", "mlp.router.weight", "mlp.router.bias"))


def experts_of(model, layer: int) -> dict[str, torch.Tensor]:
    """The layer's routed experts' 3-D parameters (E first), by name."""
    experts = model.model.layers[layer].mlp.experts
    return {n: p for n, p in experts.named_parameters(recurse=False) if p.dim() >= 2}


def router_of(model, layer: int) -> torch.Tensor:
    """The layer's router weight (E, D)."""
    mlp = model.model.layers[layer].mlp
    return (mlp.router if hasattr(mlp, "router") else mlp.gate).weight


@torch.no_grad()
def copy_expert(model, layer: int, source: int, copy: int, noise: float = 0.0) -> None:
    for param in experts_of(model, layer).values():
        param[copy] = param[source] * (1 + noise * torch.randn_like(param[source]))


@torch.no_grad()
def zero_expert(model, layer: int, expert: int) -> None:
    for param in experts_of(model, layer).values():
        param[expert] = 0.0


@torch.no_grad()
def nan_expert(model, layer: int, expert: int) -> None:
    param = next(iter(experts_of(model, layer).values()))
    param[expert, 0, 0] = float("nan")


@torch.no_grad()
def scale_expert(model, layer: int, expert: int, factor: float) -> None:
    for param in experts_of(model, layer).values():
        param[expert] *= factor


@torch.no_grad()
def copy_router_row(model, layer: int, source: int, copy: int) -> None:
    router = router_of(model, layer)
    router[copy] = router[source]


@torch.no_grad()
def push_router(model, layer: int, experts: list[int], sign: float) -> None:
    """Every token's residual stream gets a large positive channel 0 (the embedding), which
    no router reads (column 0 zeroed) but the rows of `experts` in `layer`, with a weight of
    sign * 1000: -1 makes them never chosen (dead), +1 makes every token choose them
    (collapse)."""
    model.model.embed_tokens.weight[:, 0] = 2.0
    for i in range(len(model.model.layers)):
        if hasattr(model.model.layers[i].mlp, "experts"):
            router_of(model, i)[:, 0] = 0.0
    router_of(model, layer)[experts, 0] = sign * 1000.0


@torch.no_grad()
def balance(model, rounds: int = 2) -> None:
    """Make the routers spread random tokens near evenly, as a balance loss would: each
    router row loses its component along the mean of its layer's router input (the
    direction every token shares) and is scaled so that every expert's logits vary alike;
    router biases are zeroed."""
    layers = [i for i, block in enumerate(model.model.layers) if hasattr(block.mlp, "experts")]
    tokens = torch.randint(0, VOCAB, (4, 256), generator=torch.Generator().manual_seed(7))
    for _ in range(rounds):
        inputs = {}
        handles = [
            _router_module(model, i).register_forward_pre_hook(
                lambda module, args, i=i, store=inputs: store.setdefault(
                    i, args[0].reshape(-1, args[0].shape[-1])
                )
            )
            for i in layers
        ]
        model(tokens)
        for handle in handles:
            handle.remove()
        for i in layers:
            mean = inputs[i].mean(0)
            direction = mean / mean.norm()
            router = router_of(model, i)
            router -= torch.outer(router @ direction, direction)
            spread_E = (inputs[i] @ router.T).std(0)  # every expert's logits equally wide
            router *= (spread_E.mean() / spread_E)[:, None]
    for name, buffer in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith(("router.bias", "e_score_correction_bias")):
            buffer.zero_()


def _router_module(model, layer: int):
    mlp = model.model.layers[layer].mlp
    return mlp.router if hasattr(mlp, "router") else mlp.gate
