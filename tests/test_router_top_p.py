"""top_p (Huang et al. 2024): the fewest experts whose probabilities reach p, at most top_k.

The router weight is the identity, so the logits are the input; logs of the wanted
probabilities are fed in as logits.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_moe, tokens

PROBS = [0.5, 0.3, 0.15, 0.05]


def router(top_p, top_k=3, **overrides):
    moe = make_moe(router="top_p", d_model=4, num_experts=4, top_k=top_k, top_p=top_p, **overrides)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4))
    return moe.router


def route(top_p, top_k=3, **overrides):
    return router(top_p, top_k, **overrides)(torch.tensor([PROBS]).log())


@pytest.mark.parametrize(
    "top_p, top_k, used",
    [
        (0.5, 3, 1),  # 0.5 alone reaches 0.5
        (0.45, 3, 1),
        (0.7, 3, 2),  # 0.5 < 0.7 <= 0.5 + 0.3
        (0.9, 3, 3),  # 0.8 < 0.9 <= 0.95
        (0.99, 3, 3),  # would need all four, capped at top_k = 3
        (0.99, 2, 2),
        (1.0, 4, 4),
    ],
)
def test_fewest_experts_reaching_p(top_p, top_k, used):
    routing = route(top_p, top_k)
    valid = routing.valid_TK[0].tolist()
    assert valid == [True] * used + [False] * (top_k - used)
    assert routing.ids_TK[0, :used].tolist() == list(range(used))
    chosen = torch.tensor(PROBS[:used])
    torch.testing.assert_close(routing.weights_TK[0, :used], chosen / chosen.sum())
    assert (routing.weights_TK[0, used:] == 0).all()


def test_without_renormalisation_weights_are_the_probabilities():
    routing = route(0.7, renormalize=False)
    torch.testing.assert_close(routing.weights_TK[0], torch.tensor([0.5, 0.3, 0.0]))


def test_layer_processes_only_the_used_slots():
    moe = make_moe(router="top_p", num_experts=6, top_k=4, top_p=0.5)
    x = tokens(20)
    out = moe(x)
    routing = moe.router(x)
    used = routing.valid_TK.sum(-1)
    assert used.min() >= 1 and used.max() <= 4 and (used < 4).any()
    assert int(out.stats.tokens_per_expert.sum()) == int(used.sum())
    assert out.stats.dropped_fraction.item() == 0.0
