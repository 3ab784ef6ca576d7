"""Multi-head latent attention: the cache holds the latent, the absorbed decode step equals
the decompressed attention (decoding equals the full forward: test_decoding.py), the config
is checked, and the module has transformers' DeepseekV3Attention's parameters."""

from __future__ import annotations

import math

import pytest
import torch
from builders import MLA, decoder

from moekit import MoEConfig
from moekit.generate import KVCache, generate
from moekit.models import ModelConfig, Transformer
from moekit.models.accounting import kv_cache_bytes_per_token
from moekit.models.mla import softmax_scale
from moekit.models.rope import apply_rope

pytestmark = pytest.mark.usefixtures("one_thread")


def prompt(B: int = 2, T: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 32, (B, T), generator=torch.Generator().manual_seed(seed))


def test_cache_holds_the_latent_and_the_rotary_key_only():
    model = decoder("mla")
    cache = KVCache.for_model(model, batch_size=2, max_len=9)
    assert all(t.shape == (2, 1, 9, 12) for t in cache.k_BGSDh)  # kv_lora_rank
    assert all(t.shape == (2, 1, 9, 4) for t in cache.v_BGSDh)  # qk_rope_head_dim
    # per token and layer: 12 + 4 values, against 4 heads * (6 + 4 + 5) decompressed
    assert kv_cache_bytes_per_token(model.config) == 2 * (12 + 4) * 2


def test_absorbed_decode_step_equals_the_decompressed_attention():
    """One decode step in the latent space (W_UK folded into the query, W_UV after the
    softmax) equals decompressing every cached latent into keys and values."""
    model = decoder("mla")
    cache = KVCache.for_model(model, batch_size=2, max_len=8)
    model(prompt(), kv_cache=cache)
    attn = model.layers[1].attn
    captured = {}
    attn.register_forward_pre_hook(lambda m, args: captured.update(args=args))
    model(prompt(T=1, seed=1), kv_cache=cache)
    x_BTD, where, _ = captured["args"]
    B, T, H = 2, 1, attn.num_heads
    q = attn.wq_up(attn.q_norm(attn.wq_down(x_BTD))).view(B, T, H, -1).transpose(1, 2)
    q_BHTN, q_rot_BHTR = q.split((attn.nope_dim, attn.rope_dim), dim=-1)
    q_rot_BHTR = apply_rope(q_rot_BHTR, where.cos, where.sin)
    latent_B1SC, k_rot_B1SR = cache.k_BGSDh[1], cache.v_BGSDh[1]
    args = (q_BHTN, q_rot_BHTR, latent_B1SC, k_rot_B1SR, where)
    torch.testing.assert_close(
        attn._attend_absorbed(*args), attn._attend(*args), atol=1e-5, rtol=1e-5
    )


@pytest.mark.slow  # about a minute of inductor compilation on two cores
def test_compiled_training_step_is_one_graph_and_equals_eager():
    torch._dynamo.reset()
    moe = MoEConfig(
        d_model=16, d_hidden=8, num_experts=4, top_k=2, router="sigmoid_topk", num_groups=2
    )
    model = decoder("mla", moe=moe, first_dense_layers=1).train()
    tokens_BT, targets_BT = prompt(seed=1), prompt(seed=2)

    def loss(tokens_BT, targets_BT):
        out = model(tokens_BT, targets=targets_BT)
        return out.loss + out.aux_loss

    grads = []
    for step in (loss, torch.compile(loss, fullgraph=True)):
        step(tokens_BT, targets_BT).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_softmax_scale_takes_yarn_mscale_all_dim_squared():
    plain = ModelConfig(vocab_size=8, d_model=16, num_layers=1, num_heads=2, **MLA)
    assert softmax_scale(plain) == pytest.approx(1 / math.sqrt(10))
    yarn = {"type": "yarn", "factor": 40.0, "original_max_seq_len": 8, "mscale_all_dim": 0.5}
    scaled = ModelConfig(
        vocab_size=8, d_model=16, num_layers=1, num_heads=2, rope_scaling=yarn, **MLA
    )
    mscale = 0.1 * 0.5 * math.log(40) + 1
    assert softmax_scale(scaled) == pytest.approx(mscale**2 / math.sqrt(10))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(kv_lora_rank=None), r"kv_lora_rank \(None\) must be a positive integer"),
        (dict(q_lora_rank=0), r"q_lora_rank \(0\) must be a positive integer"),
        (dict(qk_rope_head_dim=3), r"qk_rope_head_dim \(3\) must be even"),
        (dict(qk_norm="head"), r'attention "mla" has no qk_norm'),
    ],
)
def test_bad_mla_settings_are_named(overrides, message):
    fields = dict(vocab_size=8, d_model=16, num_layers=1, num_heads=2, **MLA) | overrides
    with pytest.raises(ValueError, match=message):
        ModelConfig(**fields)


def test_lora_on_latent_attention_decodes_as_the_merged_model():
    """The absorbed decode step reads wkv_up's weight directly: with an adapter on it, the
    adapted weight. So greedy decoding with adapters equals decoding their merge."""
    from moekit.models.lora import LoRAConfig, add_lora, merge_lora

    model = add_lora(decoder("mla"), LoRAConfig(rank=2, alpha=4.0, targets="attention,experts"))
    adapted = {n for n, _ in model.named_parameters() if ".lora_A" in n and ".attn." in n}
    assert {n.split(".")[3] for n in adapted} == {"wq_down", "wq_up", "wkv_down", "wkv_up", "wo"}
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    merged = merge_lora(model).eval()
    ours = generate(model.eval(), prompt(), max_new_tokens=4, temperature=0.0)
    want = generate(merged, prompt(), max_new_tokens=4, temperature=0.0)
    torch.testing.assert_close(ours.logits_BNV, want.logits_BNV, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours.tokens_BN, want.tokens_BN)


def test_overrides_switch_a_preset_to_mla_and_change_its_widths():
    from moekit.train.overrides import build_configs, parse_overrides

    widths = ["--model.kv_lora_rank", "16", "--model.qk_rope_head_dim", "8"]
    widths += ["--model.qk_nope_head_dim", "16", "--model.v_head_dim", "16"]
    model, _ = build_configs("tiny", parse_overrides(["--model.attention", "mla", *widths]))
    assert model.attention == "mla" and model.head_dim == 24  # derived: nope + rope
    model, _ = build_configs(
        "deepseek_v3_tiny", parse_overrides(["--model.q_lora_rank", "none", *widths])
    )
    assert model.q_lora_rank is None and model.head_dim == 24


def test_mla_widths_without_mla_warn():
    with pytest.warns(UserWarning, match='have no effect without attention "mla"'):
        ModelConfig(vocab_size=8, d_model=16, num_layers=1, num_heads=2, kv_lora_rank=4)


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_parameters_equal_transformers_deepseek_v3_attention(q_lora_rank):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    widths = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    hf = transformers.DeepseekV3Config(
        hidden_size=64,
        num_attention_heads=4,
        q_lora_rank=q_lora_rank,
        num_hidden_layers=1,
        **widths,
    )
    ours = ModelConfig(
        vocab_size=8,
        d_model=64,
        num_layers=1,
        num_heads=4,
        attention="mla",
        q_lora_rank=q_lora_rank,
        **widths,
    )
    with torch.device("meta"):
        attention = Transformer(ours).layers[0].attn
    expected = {n: p.numel() for n, p in DeepseekV3Attention(hf, 0).named_parameters()}
    assert sum(p.numel() for p in attention.parameters()) == sum(expected.values())
