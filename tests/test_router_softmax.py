"""softmax_topk (GShard / Mixtral / DeepSeek-V2): softmax over experts, top-k, optional
renormalisation; DeepSeek-V2's group-limited selection and routed scaling.

The router weight is set to the identity so the logits are the input itself.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from helpers import make_moe

LOGITS = torch.tensor([[2.0, -1.0, 1.0, 0.0], [0.0, 0.5, -2.0, 3.0]])


def router(**overrides):
    moe = make_moe(d_model=4, num_experts=4, top_k=2, **overrides)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4))
    return moe.router


def test_top_k_renormalised():
    routing = router()(LOGITS)
    # Token 0: experts 0 and 2 (logits 2 and 1), weights e^2 : e^1 -> e/(e+1), 1/(e+1).
    # Token 1: experts 3 and 1 (logits 3 and 0.5), weights 1/(1+e^-2.5), e^-2.5/(1+e^-2.5).
    assert routing.ids_TK.tolist() == [[0, 2], [3, 1]]
    r = math.exp(-2.5)
    expected = torch.tensor([[math.e / (math.e + 1), 1 / (math.e + 1)], [1 / (1 + r), r / (1 + r)]])
    torch.testing.assert_close(routing.weights_TK, expected)
    assert routing.valid_TK is None


def test_top_k_raw_probabilities_without_renormalisation():
    routing = router(renormalize=False)(LOGITS)
    z = math.exp(2) + math.exp(-1) + math.exp(1) + 1
    torch.testing.assert_close(
        routing.weights_TK[0], torch.tensor([math.exp(2) / z, math.exp(1) / z])
    )
    torch.testing.assert_close(routing.probs_TE, LOGITS.softmax(-1))
    assert routing.weights_TK.sum(-1).lt(1).all()


def test_gate_rank_and_logits_are_the_softmax_and_raw_logits():
    routing = router()(LOGITS)
    torch.testing.assert_close(routing.gate_TE, LOGITS.softmax(-1))
    torch.testing.assert_close(routing.rank_TE, LOGITS.softmax(-1))
    torch.testing.assert_close(routing.logits_TE, LOGITS)
    assert routing.load_E is None


def test_weights_are_differentiable_in_the_router_weight():
    r = router()
    weights = r(LOGITS).weights_TK
    (weights[:, 0]).sum().backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


def test_router_math_is_fp32_for_low_precision_input():
    r = router()
    routing = r(LOGITS.to(torch.bfloat16))
    assert routing.logits_TE.dtype == torch.float32 and routing.weights_TK.dtype == torch.float32


def test_group_limited_worked_example():
    # DeepSeek-V2's device-limited routing. Logits of 8 experts in groups of two:
    # g0 = (e0, e1), g1 = (e2, e3), g2 = (e4, e5), g3 = (e6, e7). A group scores its best
    # probability, in logit order g0 2.0, g1 1.9, g2 1.8, g3 -4.0. With topk_groups = 2
    # only g0 and g1 remain, so the top-3 is e0 (2.0), e2 (1.9) and e1 (-2.0), although
    # e4 (1.8) and e5 (1.75) of g2 score higher than e1.
    logits = torch.tensor([[2.0, -2.0, 1.9, -3.0, 1.8, 1.75, -4.0, -5.0]])
    moe = make_moe(
        d_model=8,
        num_experts=8,
        top_k=3,
        num_groups=4,
        topk_groups=2,
        routed_scaling=16.0,
        renormalize=False,
    )
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(8))
    routing = moe.router(logits)
    assert routing.ids_TK.tolist() == [[0, 2, 1]]
    allowed = torch.isfinite(routing.rank_TE[0]).tolist()
    assert allowed == [True, True, True, True, False, False, False, False]
    # weights: the raw probabilities (no renormalisation) times routed_scaling
    probs = logits.softmax(dim=-1)[0]
    torch.testing.assert_close(routing.weights_TK[0], probs[[0, 2, 1]] * 16.0)
    # without groups e4 takes the third slot
    plain = make_moe(d_model=8, num_experts=8, top_k=3)
    with torch.no_grad():
        plain.router.weight.copy_(torch.eye(8))
    assert plain.router(logits).ids_TK.tolist() == [[0, 2, 4]]


def test_selection_bias_equals_transformers_ernie4_5_router():
    # ERNIE 4.5: top-k of softmax + e_score_correction_bias, weights the unbiased
    # probabilities of the chosen experts, renormalised.
    ernie = pytest.importorskip("transformers.models.ernie4_5_moe.modeling_ernie4_5_moe")
    settings = SimpleNamespace(num_experts=8, hidden_size=16, num_experts_per_tok=3)
    theirs = ernie.Ernie4_5_MoeTopKRouter(SimpleNamespace(**vars(settings), moe_norm_min=1e-12))
    ours = make_moe(d_model=16, num_experts=8, top_k=3, selection_bias=True).router
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        theirs.weight.copy_(ours.weight)
        bias = torch.randn(8, generator=generator) * 0.2
        theirs.moe_statics.e_score_correction_bias.copy_(bias[None])
        ours.bias.copy_(bias)
    x = torch.randn(64, 16, generator=generator)
    _, weights, ids = theirs(x)
    routing = ours(x)
    assert torch.equal(routing.ids_TK, ids)
    torch.testing.assert_close(routing.weights_TK, weights, rtol=1e-6, atol=1e-7)
    # The bias changes the selection of some tokens (else this test proves little).
    assert not torch.equal(routing.ids_TK, routing.probs_TE.topk(3, dim=-1).indices)


def test_selection_bias_is_a_zero_buffer_and_at_zero_is_plain_softmax_topk():
    plain = make_moe(d_model=16, num_experts=8, top_k=3).router
    biased = make_moe(d_model=16, num_experts=8, top_k=3, selection_bias=True).router
    assert "bias" not in dict(plain.named_buffers())
    assert "bias" in biased.state_dict() and "bias" not in dict(biased.named_parameters())
    assert biased.bias.dtype == torch.float32
    biased.reset_parameters()
    assert torch.equal(biased.bias, torch.zeros(8))
    with torch.no_grad():
        biased.weight.copy_(plain.weight)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    a, b = plain(x), biased(x)
    assert torch.equal(a.ids_TK, b.ids_TK) and torch.equal(a.weights_TK, b.weights_TK)
    # The bias never gets a gradient: the weights are the unbiased probabilities.
    b.weights_TK.sum().backward()
    assert biased.bias.grad is None
