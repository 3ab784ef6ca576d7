"""The decoder options of further families (models/options.py): partial rotary, LayerNorm,
Granite's multipliers and an output-head bias. Defaults leave the decoder as it was; each
option equals a hand-written reference and compiles (each decodes with the KV cache as the
full forward does: test_decoding.py)."""

# B batch, T tokens, D model, V vocab, H heads, Dh head dim, R rotated dims of a head

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from builders import ALL_OPTIONS as ALL_ON
from builders import options_config as config
from builders import options_decoder as model
from torch import nn

from moekit.interop.accounting import count_by_part
from moekit.models import ModelConfig, Transformer, count_parameters, presets
from moekit.models.rope import apply_rope, rope_tables

pytestmark = pytest.mark.usefixtures("one_thread")

DEFAULTS = dict(
    rotary_dim=None,
    norm="rms",
    embedding_multiplier=1.0,
    residual_multiplier=1.0,
    attention_multiplier=None,
    logits_scaling=1.0,
    lm_head_bias=False,
)


def tokens(B: int = 2, T: int = 7) -> torch.Tensor:
    return torch.randint(0, 32, (B, T), generator=torch.Generator().manual_seed(1))


def rotate_slow(x_HTDh: torch.Tensor, positions: list[int], R: int, theta: float) -> torch.Tensor:
    """Rotate-half RoPE over the first R dims of every head, the rest passed, one pair at a
    time: pair i is (x[i], x[i + R/2]) turned by position * theta^(-2i/R)."""
    out = x_HTDh.clone()
    for t, position in enumerate(positions):
        for i in range(R // 2):
            angle = position * theta ** (-2 * i / R)
            a, b = x_HTDh[:, t, i], x_HTDh[:, t, i + R // 2]
            out[:, t, i] = a * math.cos(angle) - b * math.sin(angle)
            out[:, t, i + R // 2] = b * math.cos(angle) + a * math.sin(angle)
    return out


# --- defaults ---


def test_defaults_keep_the_parameters_and_logits_of_the_decoder_without_options():
    plain, explicit = model(), model(**DEFAULTS)
    assert list(plain.state_dict()) == list(explicit.state_dict())
    assert not [name for name in plain.state_dict() if "norm.bias" in name or "lm_head.b" in name]
    x_BT = tokens()
    with torch.no_grad():
        logits_BTV = plain(x_BT).logits
        assert torch.equal(logits_BTV, explicit(x_BT).logits)
        # by hand: embed, two pre-norm residual branches per block, norm, head
        x_BTD = plain.tok_embed(x_BT)
        where = plain.place(x_BT, None, None)
        for block in plain.layers:
            x_BTD = x_BTD + block.attn(block.attn_norm(x_BTD), where, None)
            x_BTD = x_BTD + block.ffn(block.ffn_norm(x_BTD)).hidden
        expected_BTV = plain.lm_head(plain.norm(x_BTD))
    assert torch.equal(logits_BTV, expected_BTV)


# --- partial rotary ---


def test_partial_rotary_equals_the_slow_reference():
    R, Dh, theta = 4, 8, 10000.0
    cos_TP, sin_TP = rope_tables(R, 16, theta)
    x_BHTDh = torch.randn(1, 3, 5, Dh)
    positions = [0, 1, 2, 6, 11]
    rotated = apply_rope(x_BHTDh, cos_TP[positions], sin_TP[positions])
    torch.testing.assert_close(rotated[0], rotate_slow(x_BHTDh[0], positions, R, theta))
    assert torch.equal(rotated[..., R:], x_BHTDh[..., R:])


def test_partial_rotary_equals_transformers_glm4_moe():
    glm = pytest.importorskip("transformers.models.glm4_moe.modeling_glm4_moe")
    configuration = pytest.importorskip("transformers.models.glm4_moe.configuration_glm4_moe")
    hf_config = configuration.Glm4MoeConfig(
        hidden_size=32, num_attention_heads=2, head_dim=16, partial_rotary_factor=0.5,
        rope_theta=10000.0, max_position_embeddings=16,
    )  # fmt: skip
    q_BHTDh, k_BHTDh = torch.randn(2, 2, 6, 16), torch.randn(2, 1, 6, 16)
    positions_BT = torch.tensor([[0, 1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8]])
    cos_BTR, sin_BTR = glm.Glm4MoeRotaryEmbedding(hf_config)(q_BHTDh, positions_BT)
    hf_q, hf_k = glm.apply_rotary_pos_emb(q_BHTDh, k_BHTDh, cos_BTR, sin_BTR)
    ours = model(num_heads=2, head_dim=16, rotary_dim=8)
    assert ours.rope_cos.shape == (16, 4)  # the tables are R wide: R / 2 frequencies
    cos_B1TP = ours.rope_cos[positions_BT].unsqueeze(1)
    sin_B1TP = ours.rope_sin[positions_BT].unsqueeze(1)
    torch.testing.assert_close(apply_rope(q_BHTDh, cos_B1TP, sin_B1TP), hf_q)
    torch.testing.assert_close(apply_rope(k_BHTDh, cos_B1TP, sin_B1TP), hf_k)


@pytest.mark.parametrize("attention", ["gqa", "sinks"])
def test_attention_with_partial_rotary_equals_a_hand_reference(attention):
    built = model(rotary_dim=4, attention=attention, attention_multiplier=0.3)
    attn, (B, T, H, Dh) = built.layers[0].attn, (2, 5, 2, 8)
    x_BTD = torch.randn(B, T, 16)
    with torch.no_grad():
        if attention == "sinks":
            attn.sinks.copy_(torch.tensor([0.5, -1.0]))
        y_BTD = attn(x_BTD, built.place(tokens(T=T), None, None), None)
        q_BHTDh = attn.wq(x_BTD).view(B, T, H, Dh).transpose(1, 2)
        k_BHTDh = attn.wk(x_BTD).view(B, T, 1, Dh).transpose(1, 2).expand(B, H, T, Dh)
        v_BHTDh = attn.wv(x_BTD).view(B, T, 1, Dh).transpose(1, 2).expand(B, H, T, Dh)
        q_BHTDh = torch.stack([rotate_slow(q, list(range(T)), 4, 10000.0) for q in q_BHTDh])
        k_BHTDh = torch.stack([rotate_slow(k, list(range(T)), 4, 10000.0) for k in k_BHTDh])
        scores_BHTT = q_BHTDh @ k_BHTDh.transpose(-1, -2) * 0.3
        scores_BHTT = scores_BHTT.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        if attention == "sinks":  # the sink's logit joins the softmax's denominator
            sink_BHT1 = attn.sinks.view(1, H, 1, 1).expand(B, H, T, 1)
            weights = torch.cat([scores_BHTT, sink_BHT1], dim=-1).softmax(-1)[..., :T]
        else:
            weights = scores_BHTT.softmax(-1)
        expected_BTD = attn.wo((weights @ v_BHTDh).transpose(1, 2).reshape(B, T, H * Dh))
    torch.testing.assert_close(y_BTD, expected_BTD, atol=1e-5, rtol=1e-5)


# --- LayerNorm, multipliers, head bias ---


def test_layer_norm_puts_weights_and_biases_in_every_block_norm_and_the_final_one():
    built = model(norm="layer")
    names = set(built.state_dict())
    for prefix in ("layers.0.attn_norm", "layers.1.ffn_norm", "norm"):
        assert {f"{prefix}.weight", f"{prefix}.bias"} <= names
        module = built.get_submodule(prefix)
        assert isinstance(module, nn.LayerNorm) and module.eps == 1e-5
    x_BTD = torch.randn(2, 3, 16)
    norm = built.layers[0].attn_norm
    expected = (x_BTD - x_BTD.mean(-1, keepdim=True)) / torch.sqrt(
        x_BTD.var(-1, unbiased=False, keepdim=True) + 1e-5
    ) * norm.weight + norm.bias
    torch.testing.assert_close(norm(x_BTD), expected)
    fresh = Transformer(config(norm="layer"))  # initialised: weight 1, bias 0
    assert torch.equal(fresh.norm.bias, torch.zeros(16))


def test_logits_scaling_divides_the_logits():
    x_BT = tokens()
    with torch.no_grad():
        plain, scaled = model()(x_BT).logits, model(logits_scaling=2.0)(x_BT).logits
    assert torch.equal(scaled, plain / 2)


def test_embedding_multiplier_scales_what_block_0_receives():
    built, x_BT = model(embedding_multiplier=3.0), tokens()
    seen = []
    built.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        built(x_BT)
        assert torch.equal(seen[0], built.tok_embed(x_BT) * 3.0)


def test_residual_multiplier_scales_both_branches_of_a_block():
    built, x_BTD = model(residual_multiplier=0.25), torch.randn(2, 5, 16)
    block = built.layers[0]
    where = built.place(tokens(T=5), None, None)
    with torch.no_grad():
        y_BTD, _ = block(x_BTD, where, None)
        h_BTD = x_BTD + 0.25 * block.attn(block.attn_norm(x_BTD), where, None)
        expected_BTD = h_BTD + 0.25 * block.ffn(block.ffn_norm(h_BTD)).hidden
    torch.testing.assert_close(y_BTD, expected_BTD)


def test_attention_multiplier_of_one_over_sqrt_head_dim_is_the_default_scale():
    x_BT = tokens()
    with torch.no_grad():
        plain = model()(x_BT).logits
        same = model(attention_multiplier=1 / math.sqrt(8))(x_BT).logits
        other = model(attention_multiplier=1.0)(x_BT).logits
    torch.testing.assert_close(same, plain)
    assert not torch.allclose(other, plain)


@pytest.mark.parametrize("tied", [True, False])
def test_lm_head_bias_is_added_to_the_logits(tied):
    with_bias, without = model(lm_head_bias=True, tied_embeddings=tied), model(tied_embeddings=tied)
    assert "lm_head.bias" in dict(with_bias.named_parameters())
    assert (with_bias.lm_head.weight is with_bias.tok_embed.weight) == tied
    with_bias.load_state_dict(without.state_dict(), strict=False)  # all but the bias
    x_BT = tokens()
    with torch.no_grad():
        expected = without(x_BT).logits + with_bias.lm_head.bias
        torch.testing.assert_close(with_bias(x_BT).logits, expected)


# --- every path: MTP, compile, accounting (cached decoding: test_decoding.py) ---


def test_multi_token_prediction_uses_the_options():
    built, x_BT = model(mtp_depth=1, **ALL_ON), tokens()
    module = built.mtp[0]
    assert isinstance(module.block.attn_norm, nn.LayerNorm)
    assert module.block.residual_multiplier == 0.5
    hidden = []
    built.norm.register_forward_pre_hook(lambda m, args: hidden.append(args[0]))
    out = built(x_BT, targets=x_BT)
    out.mtp_loss.backward()
    assert built.lm_head.bias.grad.abs().sum() > 0
    # by hand (models/mtp.py, depth 1): the token one ahead embedded times the multiplier,
    # the head's logits divided by logits_scaling, lambda 0.3 times the cross entropy
    with torch.no_grad():
        embedded_BTD = built.tok_embed(F.pad(x_BT[:, 1:], (0, 1))) * 3.0
        _, normed_BTD, _ = module(hidden[0], embedded_BTD, built.place(x_BT, None, None))
        logits_BTV = built.lm_head(normed_BTD) / 2.5
        target_BT = F.pad(x_BT[:, 1:], (0, 1), value=-100)
        expected = 0.3 * F.cross_entropy(logits_BTV.flatten(0, 1), target_BT.flatten())
    torch.testing.assert_close(out.mtp_loss, expected)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_forward_with_every_option_equals_eager(backend):
    built, x_BT = model(**ALL_ON), tokens()
    compiled = torch.compile(built, fullgraph=False, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x_BT).logits, built(x_BT).logits)


def test_parameter_counts_and_dense_twin_include_the_new_parameters():
    L, D, V = 2, 16, 32
    base, extra = config(), config(norm="layer", lm_head_bias=True)
    added = (2 * L + 1) * D + V  # a bias per block norm and the final norm, the head's bias
    assert count_parameters(extra).total == count_parameters(base).total + added
    assert count_parameters(extra).active == count_parameters(base).active + added
    parts = count_by_part(extra)
    assert parts.total["norms"] == count_by_part(base).total["norms"] + (2 * L + 1) * D
    assert parts.total["embeddings"] == count_by_part(base).total["embeddings"] + V
    twin = presets.dense_twin(config(**ALL_ON))
    assert {name: getattr(twin, name) for name in ALL_ON} == ALL_ON
    assert "norm.bias" in Transformer(twin).state_dict()


# --- validation ---


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(rotary_dim=3), r"rotary_dim \(3\) must be an even integer"),
        (dict(rotary_dim=10), r"rotary_dim \(10\) must be in \(0, head_dim \(8\)\]"),
        (dict(rotary_dim=0), r"rotary_dim \(0\) must be in"),
        (dict(norm="foo"), r"unknown norm 'foo'"),
        (dict(embedding_multiplier=0.0), r"embedding_multiplier \(0.0\) must be a finite"),
        (dict(residual_multiplier=-1.0), r"residual_multiplier \(-1.0\) must be a finite"),
        (dict(attention_multiplier=0), r"attention_multiplier \(0\) must be a finite"),
        (dict(logits_scaling=float("nan")), r"logits_scaling \(nan\) must be a finite"),
        (dict(lm_head_bias="yes"), r"lm_head_bias \('yes'\) must be True or False"),
    ],
)
def test_bad_values_raise_naming_them(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(**overrides)


@pytest.mark.parametrize("option", [dict(rotary_dim=8), dict(attention_multiplier=0.1)])
def test_mla_refuses_the_options_it_has_its_own_of(option):
    fields = dict(presets.deepseek_v3_tiny().__dict__) | option
    with pytest.raises(ValueError, match=f"{next(iter(option))} .* attention 'mla'"):
        ModelConfig(**fields)
