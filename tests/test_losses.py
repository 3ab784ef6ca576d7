"""Router losses: worked values from the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch

from moekit import losses


def test_switch_balance_loss_is_one_when_balanced():
    # Four tokens, four experts, each expert chosen once: f_i = 1/4, so the loss is
    # 4 * sum_i P_i / 4 = sum_i P_i = 1 whatever the probabilities.
    ids_TK = torch.tensor([[0], [1], [2], [3]])
    uniform_TE = torch.full((4, 4), 0.25)
    skewed_TE = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 4)
    assert losses.switch_balance_loss(uniform_TE, ids_TK).item() == pytest.approx(1.0)
    assert losses.switch_balance_loss(skewed_TE, ids_TK).item() == pytest.approx(1.0)


@pytest.mark.parametrize("num_experts", [2, 4, 8])
def test_switch_balance_loss_is_num_experts_when_collapsed(num_experts):
    # Every token sends all its probability and its choice to expert 0: f_0 = P_0 = 1.
    probs_TE = torch.zeros(6, num_experts)
    probs_TE[:, 0] = 1.0
    ids_TK = torch.zeros(6, 1, dtype=torch.long)
    assert losses.switch_balance_loss(probs_TE, ids_TK).item() == pytest.approx(num_experts)


def test_switch_balance_loss_worked_value_and_gradient():
    # f = (1, 0) (both tokens chose expert 0), P = mean rows = (0.7, 0.3): 2 * 0.7 = 1.4.
    probs_TE = torch.tensor([[0.8, 0.2], [0.6, 0.4]], requires_grad=True)
    ids_TK = torch.tensor([[0], [0]])
    loss = losses.switch_balance_loss(probs_TE, ids_TK)
    assert loss.item() == pytest.approx(1.4)
    # f carries no gradient: d loss / d p_te = E * f_e / T = 2 * (1, 0) / 2.
    loss.backward()
    torch.testing.assert_close(probs_TE.grad, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))


def test_switch_balance_loss_counts_only_valid_slots():
    # Valid choices: t0 -> e0, t1 -> e0 and e1: f = (2/3, 1/3); P = (0.5, 0.5).
    probs_TE = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    ids_TK = torch.tensor([[0, 1], [0, 1]])
    valid_TK = torch.tensor([[True, False], [True, True]])
    loss = losses.switch_balance_loss(probs_TE, ids_TK, valid_TK)
    assert loss.item() == pytest.approx(2 * (2 / 3 * 0.5 + 1 / 3 * 0.5))


def test_router_z_loss_worked_value():
    # logsumexp(0, 0) = ln 2 and logsumexp(ln 3, 0) = ln 4 = 2 ln 2:
    # mean of squares = (ln2^2 + 4 ln2^2) / 2 = 2.5 ln2^2.
    logits_TE = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert losses.router_z_loss(logits_TE).item() == pytest.approx(2.5 * math.log(2) ** 2)


def test_cv_squared():
    # mean 2.5, population variance 1.25: 1.25 / 6.25 = 0.2.
    assert losses.cv_squared(torch.tensor([1.0, 2.0, 3.0, 4.0])).item() == pytest.approx(0.2)
    assert losses.cv_squared(torch.tensor([3.0, 3.0, 3.0])).item() == 0.0
    assert losses.cv_squared(torch.tensor([5.0])).item() == 0.0
    # Scale free: cv^2(10 x) = cv^2(x).
    x = torch.tensor([0.5, 1.5, 4.0])
    torch.testing.assert_close(losses.cv_squared(10 * x), losses.cv_squared(x))


def test_importance_loss_worked_value():
    # Importance per expert: e0 = 0.6 + 0.7 = 1.3, e1 = 0.4, e2 = 0.3.
    weights_TK = torch.tensor([[0.6, 0.4], [0.7, 0.3]])
    ids_TK = torch.tensor([[0, 1], [0, 2]])
    importance = [1.3, 0.4, 0.3]
    mean = sum(importance) / 3
    expected = sum((v - mean) ** 2 for v in importance) / 3 / mean**2
    got = losses.importance_loss(weights_TK, ids_TK, num_experts=3)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_importance_loss_is_zero_when_balanced_and_differentiable():
    weights_TK = torch.tensor([[0.5, 0.5], [0.5, 0.5]], requires_grad=True)
    ids_TK = torch.tensor([[0, 1], [1, 0]])
    loss = losses.importance_loss(weights_TK, ids_TK, num_experts=2)
    assert loss.item() == pytest.approx(0.0)
    skewed = torch.tensor([[0.9, 0.1], [0.9, 0.1]], requires_grad=True)
    loss = losses.importance_loss(skewed, torch.tensor([[0, 1], [0, 1]]), num_experts=2)
    loss.backward()
    # Moving weight away from the overloaded expert 0 lowers the loss.
    assert (skewed.grad[:, 0] > 0).all() and (skewed.grad[:, 1] < 0).all()


def test_load_loss_is_cv_squared_of_load():
    load_E = torch.tensor([4.0, 0.0, 2.0, 2.0])  # mean 2, variance (4 + 4 + 0 + 0) / 4 = 2
    assert losses.load_loss(load_E).item() == pytest.approx(0.5)


def test_router_entropy():
    assert losses.router_entropy(torch.full((3, 4), 0.25)).item() == pytest.approx(math.log(4))
    one_hot = torch.eye(4)[:3]
    assert losses.router_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)
