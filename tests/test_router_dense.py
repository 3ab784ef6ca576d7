"""dense (Jacobs et al. 1991): every expert runs, mixed by the softmax."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import make_moe, tokens

from moekit import MoEConfig


def test_every_expert_runs_with_softmax_weights():
    moe = make_moe(router="dense", num_experts=3, activation="silu")
    x = tokens(7)
    out = moe(x)
    assert moe.config.top_k == 3
    assert out.stats.tokens_per_expert.tolist() == [7, 7, 7]
    probs = (x @ moe.router.weight.t()).softmax(-1)
    experts = [F.silu(x @ moe.experts.w_up[e]) @ moe.experts.w_down[e] for e in range(3)]
    expected = sum(probs[:, e : e + 1] * experts[e] for e in range(3))
    torch.testing.assert_close(out.hidden, expected, rtol=1e-5, atol=1e-6)


def test_weights_are_the_full_softmax_in_expert_order():
    moe = make_moe(router="dense", num_experts=5)
    x = tokens(4)
    routing = moe.router(x)
    assert routing.ids_TK.tolist() == [[0, 1, 2, 3, 4]] * 4
    torch.testing.assert_close(routing.weights_TK, (x @ moe.router.weight.t()).softmax(-1))
    # Everyone picks every expert, so the Switch balance loss is exactly 1.
    assert moe(x).stats.balance_loss.item() == pytest.approx(1.0)


def test_capacity_factor_warns_and_has_no_effect():
    with pytest.warns(UserWarning, match="capacity_factor has no effect"):
        MoEConfig(d_model=8, d_hidden=6, num_experts=4, router="dense", capacity_factor=0.25)
    x = tokens(16)
    limited = make_moe(router="dense", capacity_factor=0.25)
    unlimited = make_moe(router="dense")
    out = limited(x)
    torch.testing.assert_close(out.hidden, unlimited(x).hidden, rtol=0, atol=0)
    assert out.stats.capacity is None and out.stats.tokens_per_expert.tolist() == [16] * 4
