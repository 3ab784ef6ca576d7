"""sigmoid_topk (DeepSeek-V3): sigmoid scores, group-limited top-k, bias balancing."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_moe, tokens

from moekit import update_router_biases


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def identity_layer(**overrides):
    settings = dict(router="sigmoid_topk", d_model=8, num_experts=8, top_k=2)
    settings.update(overrides)
    moe = make_moe(**settings)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(8))
        moe.router.bias.zero_()
    return moe


# Scores per expert; groups of two: g0 = (e0, e1), g1 = (e2, e3), g2 = (e4, e5), g3 = (e6, e7).
SCORES = [0.95, 0.05, 0.62, 0.58, 0.56, 0.54, 0.90, 0.02]
X = torch.tensor([[logit(p) for p in SCORES]])


def test_group_limited_worked_example():
    # Group scores (sum of the two best): g0 1.00, g1 1.20, g2 1.10, g3 0.92. With
    # topk_groups = 2 only g1 and g2 remain, so the top-2 is e2 (0.62) and e3 (0.58), even
    # though e0 (0.95) and e6 (0.90) score higher.
    moe = identity_layer(num_groups=4, topk_groups=2)
    routing = moe.router(X)
    assert routing.ids_TK.tolist() == [[2, 3]]
    torch.testing.assert_close(routing.weights_TK, torch.tensor([[0.62 / 1.20, 0.58 / 1.20]]))
    allowed = torch.isfinite(routing.rank_TE[0]).tolist()
    assert allowed == [False, False, True, True, True, True, False, False]
    # Without groups the plain top-2 wins.
    assert identity_layer().router(X).ids_TK.tolist() == [[0, 6]]


def test_experts_outside_the_chosen_groups_are_never_picked():
    moe = make_moe(router="sigmoid_topk", num_experts=8, top_k=3, num_groups=4, topk_groups=2)
    routing = moe.router(tokens(64))
    size = 2
    for t in range(64):
        biased = routing.rank_TE[t].clone()
        # Recompute the allowed groups from the biased scores.
        scores = (tokens(64)[t] @ moe.router.weight.t()).sigmoid() + moe.router.bias
        group_scores = scores.view(4, size).topk(2, dim=-1).values.sum(-1)
        groups = set(group_scores.topk(2).indices.tolist())
        assert {e // size for e in routing.ids_TK[t].tolist()} <= groups
        assert torch.isinf(biased[[e for e in range(8) if e // size not in groups]]).all()


def test_bias_changes_selection_but_not_weights():
    moe = identity_layer(routed_scaling=2.5)
    with torch.no_grad():
        moe.router.bias[3] = 0.5  # e3: 0.58 + 0.5 overtakes e0 (0.95) and e6 (0.90)
    routing = moe.router(X)
    assert routing.ids_TK.tolist() == [[3, 0]]
    # Weights use the unbiased scores, renormalised, times routed_scaling.
    expected = torch.tensor([[0.58, 0.95]]) / (0.58 + 0.95) * 2.5
    torch.testing.assert_close(routing.weights_TK, expected)
    torch.testing.assert_close(routing.gate_TE, torch.tensor([SCORES]) * 2.5)


def test_weights_without_renormalisation_are_scaled_scores():
    moe = identity_layer(renormalize=False, routed_scaling=2.0)
    torch.testing.assert_close(moe.router(X).weights_TK, torch.tensor([[0.95 * 2.0, 0.90 * 2.0]]))


def test_balancing_probs_are_normalised_scores():
    routing = identity_layer().router(X)
    torch.testing.assert_close(routing.probs_TE, torch.tensor([SCORES]) / sum(SCORES))


def test_loads_accumulate_only_in_training():
    moe = identity_layer().eval()
    moe(X)
    assert moe.router.load_since_update.sum() == 0
    moe.train()
    moe(X)
    moe(X)
    expected = torch.zeros(8)
    expected[[0, 6]] = 2.0  # two calls, each routing the token to e0 and e6
    torch.testing.assert_close(moe.router.load_since_update, expected)


def test_update_bias_moves_by_rate_times_sign_of_mean_minus_load():
    moe = identity_layer(bias_update_rate=0.01).train()
    moe(X)  # loads: e0 = e6 = 1, others 0; mean 0.25
    moe.update_bias()
    expected = torch.full((8,), 0.01)
    expected[[0, 6]] = -0.01  # overloaded experts go down, the rest go up
    torch.testing.assert_close(moe.router.bias, expected)
    assert moe.router.load_since_update.sum() == 0  # counts reset
    # An explicit (e.g. all-reduced) load; an expert exactly at the mean does not move.
    moe.update_bias(torch.tensor([2.0, 2.0, 1.0, 3.0, 2.0, 2.0, 2.0, 2.0]))
    expected += torch.tensor([0.0, 0.0, 0.01, -0.01, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(moe.router.bias, expected)


def test_update_router_biases_walks_the_model():
    model = torch.nn.Sequential(identity_layer(bias_update_rate=0.1), identity_layer())
    model.train()
    model[0](X)
    update_router_biases(model)
    assert model[0].router.bias[0] == pytest.approx(-0.1)
    assert model[1].router.bias.sum() == 0  # no load counted, sign(0) = 0
    # Bias is a buffer: saved with the model, never touched by the optimizer.
    assert "router.bias" in model[0].state_dict()
    assert "router.bias" not in dict(model[0].named_parameters())
