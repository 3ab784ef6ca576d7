"""TokenChoicePlan: worked examples and gradients against a plain autograd version.

# T tokens, D model, E experts, K top_k, A assignment slots (T*K), R routed rows
"""

from __future__ import annotations

import pytest
import torch

from moekit.dispatch import TokenChoicePlan

# T=3 tokens, K=2, E=3. Slot a = t*K + k:
#   slot:   0     1     2     3     4     5
#   (t,e): (0,2) (0,0) (1,0) (1,1) (2,2) (2,0)
# A stable sort by expert gives expert 0: slots 1, 2, 5; expert 1: slot 3; expert 2: 0, 4.
IDS_TK = torch.tensor([[2, 0], [0, 1], [2, 0]])


def test_worked_example_all_kept():
    plan = TokenChoicePlan(IDS_TK, None, torch.ones(3, 2), num_experts=3)
    assert plan.counts_E.tolist() == [3, 1, 2]
    assert plan.slot_of_row_R.tolist() == [1, 2, 5, 3, 0, 4]
    assert plan.token_of_row_R.tolist() == [0, 1, 2, 1, 0, 2]  # slot // K
    # Inverse permutation: slot 0 sits in row 4, slot 1 in row 0, ...
    assert plan.row_of_slot_A.tolist() == [4, 0, 1, 3, 5, 2]


def test_worked_example_with_a_dropped_slot():
    # Token 1's second choice (slot 3, expert 1) is dropped: expert 1 gets no rows, and the
    # dropped slot sorts behind the 5 kept rows as padding row 5 (shapes stay T*K).
    kept_TK = torch.tensor([[True, True], [True, False], [True, True]])
    plan = TokenChoicePlan(IDS_TK, kept_TK, torch.ones(3, 2), num_experts=3)
    assert plan.counts_E.tolist() == [3, 0, 2]
    assert plan.slot_of_row_R.tolist() == [1, 2, 5, 0, 4, 3]
    assert plan.token_of_row_R.tolist() == [0, 1, 2, 0, 2, 1]
    assert plan.row_of_slot_A.tolist() == [3, 0, 1, 5, 4, 2]
    x_TD = torch.arange(3.0).unsqueeze(-1)  # token t holds the value t
    assert plan.dispatch(x_TD).flatten().tolist() == [0.0, 1.0, 2.0, 0.0, 2.0, 1.0]
    # Combine: token 1 only gets its kept row (value 10 * 1); the padding row is never read,
    # even when the experts left garbage (NaN) in it.
    y_TD = plan.combine(torch.tensor([[0.0], [10.0], [20.0], [0.0], [20.0], [float("nan")]]))
    assert y_TD.flatten().tolist() == [0.0, 10.0, 40.0]


def _plain_rows(ids_TK, kept_TK, num_experts):
    """Rows in expert order, tokens in order within an expert: (token, slot) per row."""
    T, K = ids_TK.shape
    rows = []
    for e in range(num_experts):
        for t in range(T):
            for k in range(K):
                if ids_TK[t, k] == e and kept_TK[t, k]:
                    rows.append((t, t * K + k))
    token_R, slot_R = zip(*rows)
    return torch.tensor(token_R), torch.tensor(slot_R)


@pytest.mark.parametrize("drop_fraction", [0.0, 0.3])
def test_gradients_equal_plain_gather_and_index_add(drop_fraction):
    torch.manual_seed(0)
    T, K, E, D = 11, 3, 5, 4
    ids_TK = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    kept_TK = torch.rand(T, K) >= drop_fraction
    weights_TK = torch.rand(T, K, requires_grad=True)
    x_TD = torch.randn(T, D, requires_grad=True)
    scale_RD = torch.randn(T * K, D, requires_grad=True)  # stands in for the experts
    grad_TD = torch.randn(T, D)
    inputs = [x_TD, weights_TK, scale_RD]

    plan = TokenChoicePlan(ids_TK, kept_TK, weights_TK * kept_TK, E)
    fast_TD = plan.combine(plan.dispatch(x_TD) * scale_RD)
    fast = torch.autograd.grad(fast_TD, inputs, grad_TD)

    token_R, slot_R = _plain_rows(ids_TK, kept_TK, E)
    n = len(token_R)  # kept rows first; the padding rows behind them are never read
    y_RD = x_TD[token_R] * scale_RD[:n]
    w_R = (weights_TK * kept_TK).flatten()[slot_R]
    plain_TD = torch.zeros(T, D).index_add(0, token_R, y_RD * w_R.unsqueeze(-1))
    plain = torch.autograd.grad(plain_TD, inputs, grad_TD)

    assert torch.equal(plan.token_of_row_R[:n], token_R)
    torch.testing.assert_close(fast_TD, plain_TD, atol=1e-6, rtol=1e-6)
    for f, p in zip(fast, plain):
        torch.testing.assert_close(f, p, atol=1e-6, rtol=1e-6)


def test_every_slot_dropped():
    ids_TK = torch.tensor([[0, 1], [1, 0]])
    plan = TokenChoicePlan(ids_TK, torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2, 2), 2)
    x_TD = torch.randn(2, 3, requires_grad=True)
    x_RD = plan.dispatch(x_TD)
    assert x_RD.shape == (4, 3)  # four padding rows: shapes never depend on the routing
    assert plan.counts_E.tolist() == [0, 0]
    y_TD = plan.combine(x_RD)
    assert torch.equal(y_TD, torch.zeros(2, 3))
    y_TD.sum().backward()
    assert torch.equal(x_TD.grad, torch.zeros(2, 3))
