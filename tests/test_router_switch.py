"""switch (Fedus et al. 2021): top-1, weighted by the raw probability, jitter in training."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_moe, tokens

from moekit import MoEConfig


def layer(**overrides):
    return make_moe(router="switch", top_k=1, **overrides)


def test_switch_is_top_1():
    with pytest.raises(ValueError, match=r"top_k \(2\)"):
        MoEConfig(d_model=4, d_hidden=4, num_experts=4, router="switch", top_k=2)


def test_weight_is_the_raw_top_1_probability():
    moe = make_moe(router="switch", d_model=4, top_k=1).eval()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4))
    routing = moe.router(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    # softmax(1, 0, 0, 0)[0] = e / (e + 3), not renormalised to 1.
    assert routing.ids_TK.tolist() == [[0]]
    assert routing.weights_TK.item() == pytest.approx(math.e / (math.e + 3))


def test_task_loss_trains_the_router():
    # With a renormalised top-1 the weight would be 1 and this gradient would vanish.
    moe = layer().eval()
    moe(tokens(8)).hidden.square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_jitter_only_in_training():
    moe = layer(jitter_eps=0.3)
    x = tokens(16)
    moe.eval()
    torch.testing.assert_close(moe.router(x).probs_TE, (x @ moe.router.weight.t()).softmax(-1))
    moe.train()
    first, second = moe.router(x).probs_TE, moe.router(x).probs_TE
    assert not torch.equal(first, second)


def test_jitter_multiplies_the_router_input_by_uniform_noise():
    moe = layer(jitter_eps=0.3).train()
    x = tokens(16)
    torch.manual_seed(2)
    logits = moe.router(x).logits_TE
    torch.manual_seed(2)
    noise = torch.empty(16, 8).uniform_(0.7, 1.3)
    torch.testing.assert_close(logits, (x * noise) @ moe.router.weight.t())


def test_jitter_leaves_the_expert_input_alone():
    # Experts see the clean token: with one expert the output is the expert's FFN of x
    # times the (jittered) probability 1.
    moe = make_moe(router="switch", top_k=1, num_experts=1, jitter_eps=0.5).train()
    x = tokens(6)
    clean = moe.eval()(x).hidden
    torch.testing.assert_close(moe.train()(x).hidden, clean)


def test_no_jitter_when_eps_is_zero():
    moe = layer(jitter_eps=0.0).train()
    x = tokens(16)
    torch.testing.assert_close(
        moe.router(x).probs_TE, moe.eval().router(x).probs_TE, rtol=0, atol=0
    )
