"""expert_choice (Zhou et al. 2022): each expert takes its top-C tokens by probability.

# T tokens, E experts, C capacity = ceil(capacity_factor * T * top_k / E), factor None = 1
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_moe, tokens

# Two experts, identity router weight: the logits are the tokens.
#                      p(e0)   p(e1)
X = torch.tensor(
    [
        [0.1, 0.0],  # t0  0.525  0.475
        [3.0, 0.0],  # t1  0.953  0.047
        [0.0, 3.0],  # t2  0.047  0.953
        [1.0, 1.2],  # t3  0.450  0.550
    ]
)


def layer(**overrides):
    moe = make_moe(router="expert_choice", d_model=2, num_experts=2, top_k=1, **overrides)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2))
    return moe


@pytest.mark.parametrize(
    "factor, expected_tokens",
    [
        # C = ceil(1 * 4 * 1 / 2) = 2: e0 takes t1, t0; e1 takes t2, t3.
        (None, [[1, 0], [2, 3]]),
        # C = ceil(1.5 * 4 / 2) = 3: t0 and t3 are taken by both experts.
        (1.5, [[1, 0, 3], [2, 3, 0]]),
        # C = ceil(0.5 * 4 / 2) = 1: t0 and t3 are taken by none.
        (0.5, [[1], [2]]),
    ],
)
def test_each_expert_takes_its_top_c_tokens(factor, expected_tokens):
    moe = layer(capacity_factor=factor)
    capacity = moe.config.capacity(4)
    assert capacity == len(expected_tokens[0])
    routing = moe.router(X, capacity)
    assert routing.token_ids_EC.tolist() == expected_tokens
    probs = X.softmax(-1)
    expected_weights = torch.stack([probs[expected_tokens[e], e] for e in range(2)])
    torch.testing.assert_close(routing.weights_EC, expected_weights)


def test_unpicked_tokens_get_zero_output():
    out = layer(capacity_factor=0.5)(X)
    assert (out.hidden[[0, 3]] == 0).all()
    assert (out.hidden[[1, 2]] != 0).any(dim=-1).all()


@pytest.mark.parametrize(
    "num_tokens, top_k, factor", [(16, 2, None), (10, 1, 1.0), (7, 3, 2.0), (3, 4, 4.0)]
)
def test_capacity_formula(num_tokens, top_k, factor):
    moe = make_moe(router="expert_choice", num_experts=4, top_k=top_k, capacity_factor=factor)
    out = moe(tokens(num_tokens))
    expected = min(num_tokens, math.ceil((factor or 1.0) * num_tokens * top_k / 4))
    assert out.stats.capacity == expected
    assert out.stats.tokens_per_expert.tolist() == [expected] * 4


def test_a_token_depends_on_the_other_tokens():
    """Not causal: whether a token is processed depends on how the others score."""
    moe = layer(capacity_factor=None)
    y = moe(X).hidden
    crowded = X.clone()
    crowded[1] = torch.tensor([0.0, 3.0])  # t1 now competes with t2 and t3 for e1
    y_crowded = moe(crowded).hidden
    assert not torch.allclose(y[3], y_crowded[3])
