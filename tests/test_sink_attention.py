"""Attention sinks and sliding windows (gpt-oss): SDPA with a sink column equals the
explicit softmax, forward and backward; the KV cache, padding and compile keep it exact."""

from __future__ import annotations

import math

import pytest
import torch
from builders import SINK_WINDOW as WINDOW
from builders import decoder, decoder_config

from moekit.models.attention import Placement
from moekit.models.kv_cache import padded_positions
from moekit.models.sink_attention import SinkAttention


def reference_attention(q_BHTDh, k_BGSDh, v_BGSDh, sinks_H, allowed_B1TS):
    """The definition: scores over the allowed keys and the sink logit, softmax, drop the
    sink's column (it has no value)."""
    groups = q_BHTDh.shape[1] // k_BGSDh.shape[1]
    k_BHSDh = k_BGSDh.repeat_interleave(groups, dim=1)
    v_BHSDh = v_BGSDh.repeat_interleave(groups, dim=1)
    scores_BHTS = q_BHTDh @ k_BHSDh.transpose(-1, -2) / math.sqrt(q_BHTDh.shape[-1])
    scores_BHTS = scores_BHTS.masked_fill(~allowed_B1TS, float("-inf"))
    B, H, T, _ = q_BHTDh.shape
    sink_BHT1 = sinks_H.view(1, H, 1, 1).expand(B, H, T, 1)
    probs = torch.cat([scores_BHTS, sink_BHT1], dim=-1).softmax(dim=-1)[..., :-1]
    return probs @ v_BHSDh


@pytest.mark.parametrize("window", [None, 1, WINDOW])
@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padded"])
def test_sdpa_with_a_sink_column_equals_the_explicit_softmax(window, padded):
    torch.manual_seed(1)
    attn = SinkAttention(
        decoder_config("sinks", sliding_window=window or 8, sliding_layers=[0]), layer=0
    )
    attn.window = window
    with torch.no_grad():
        attn.sinks.normal_(0.0, 2.0)
    B, H, G, T, Dh = 2, 4, 2, 7, 4
    q = torch.randn(B, H, T, Dh, requires_grad=True)
    k = torch.randn(B, G, T, Dh, requires_grad=True)
    v = torch.randn(B, G, T, Dh, requires_grad=True)
    slots_T = torch.arange(T)
    allowed_B1TT = (slots_T.view(1, T) <= slots_T.view(T, 1)).expand(B, 1, T, T)
    mask = None
    if padded:
        real_BT = torch.ones(B, T, dtype=torch.bool)
        real_BT[0, :3] = False  # left padding
        _, mask = padded_positions(real_BT)
        allowed_B1TT = mask
    if window is not None:
        allowed_B1TT = allowed_B1TT & (slots_T.view(T, 1) - slots_T.view(1, T) < window)
    where = Placement(torch.empty(0), torch.empty(0), mask, None)
    got = attn.attend(q, k, v, where)
    expected = reference_attention(q, k, v, attn.sinks, allowed_B1TT)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, [q, k, v, attn.sinks], grad)
    expected_grads = torch.autograd.grad(expected, [q, k, v, attn.sinks], grad)
    for name, a, b in zip("qkv", got_grads, expected_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(got_grads[3], expected_grads[3], atol=1e-5, rtol=1e-5)
    assert got_grads[3].abs().sum() > 0


def test_window_limits_what_a_token_sees():
    """Changing token 0 changes token 5's logits in a full model, but not when every layer
    slides with window 3 (5 - 3 < 0 < 5: token 0 is out of every window, two layers deep
    it still reaches only 5 - 2 * (3 - 1) = 1)."""
    tokens = torch.randint(0, 32, (1, 8), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[0, 0] = (tokens[0, 0] + 1) % 32
    sliding = decoder("sinks", sliding_layers=None)
    full = decoder("sinks", sliding_window=None, sliding_layers=None)
    with torch.no_grad():
        assert torch.equal(sliding(tokens).logits[0, 5], sliding(changed).logits[0, 5])
        assert not torch.equal(full(tokens).logits[0, 5], full(changed).logits[0, 5])


def test_training_forward_compiles_whole():
    torch._dynamo.reset()
    model = decoder("sinks").train()
    tokens = torch.randint(0, 32, (2, 12))

    def loss(tokens):
        out = model(tokens, tokens)
        return out.loss + out.aux_loss

    explanation = torch._dynamo.explain(loss)(tokens)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(tokens), loss(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(attention="gqa"), "sliding_window needs attention 'sinks'"),
        (dict(sliding_window=0), r"sliding_window \(0\) must be a positive integer"),
        (dict(sliding_layers=[5]), r"sliding_layers \[5\] are not layer indices"),
        (dict(sliding_window=None), "sliding_layers .* needs a sliding_window"),
    ],
)
def test_bad_window_settings_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        decoder_config("sinks", **overrides)
