"""Layer-level oracles: one expert is a dense FFN; per-token routers are per-token."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_moe, tokens


def dense_ffn(x_TD, w_up_DH, w_down_FD, activation):
    """A feed-forward block written out from the weights (gate half first for GLUs)."""
    h = x_TD @ w_up_DH
    if activation == "swiglu":
        gate, up = h.split(h.shape[-1] // 2, dim=-1)
        return (gate * torch.sigmoid(gate) * up) @ w_down_FD
    if activation == "gelu":
        c = math.sqrt(2 / math.pi)
        return (0.5 * h * (1 + torch.tanh(c * (h + 0.044715 * h**3)))) @ w_down_FD
    if activation == "relu":
        return torch.where(h > 0, h, torch.zeros_like(h)) @ w_down_FD
    raise AssertionError(activation)


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("router", ["softmax_topk", "switch", "sigmoid_topk", "top_p", "dense"])
def test_one_expert_is_a_dense_ffn(router, activation):
    moe = make_moe(router=router, num_experts=1, top_k=1, activation=activation)
    x = tokens(10).requires_grad_()
    out = moe(x)
    w_up, w_down = moe.experts.w_up[0], moe.experts.w_down[0]
    # Switch's weight is the raw probability, which is exactly 1 with a single expert; the
    # sigmoid router's renormalised weight is routed_scaling (1.0 by default).
    expected = dense_ffn(x, w_up, w_down, activation)
    torch.testing.assert_close(out.hidden, expected, rtol=1e-5, atol=1e-6)

    grads = torch.autograd.grad(
        out.hidden.square().sum(), [x, moe.experts.w_up, moe.experts.w_down]
    )
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, w_up, w_down])
    torch.testing.assert_close(grads[0], expected_grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1][0], expected_grads[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[2][0], expected_grads[2], rtol=1e-5, atol=1e-6)


def test_one_expert_with_capacity_drops_tokens_to_zero():
    # One expert, capacity ceil(0.5 * 10 * 1 / 1) = 5: the first 5 tokens are processed,
    # the last 5 overflow and come out as zeros (they pass through on the residual path).
    moe = make_moe(num_experts=1, top_k=1, capacity_factor=0.5)
    x = tokens(10)
    out = moe(x)
    expected = dense_ffn(x, moe.experts.w_up[0], moe.experts.w_down[0], "swiglu")
    torch.testing.assert_close(out.hidden[:5], expected[:5], rtol=1e-5, atol=1e-6)
    assert (out.hidden[5:] == 0).all()
    assert out.stats.tokens_per_expert.tolist() == [5]


PER_TOKEN_ROUTERS = {
    "softmax_topk": dict(router="softmax_topk"),
    "noisy_topk": dict(router="noisy_topk"),
    "switch": dict(router="switch", top_k=1),
    "sigmoid_topk": dict(router="sigmoid_topk", num_experts=8, num_groups=4, topk_groups=2),
    "top_p": dict(router="top_p", top_k=3, top_p=0.7),
    "dense": dict(router="dense"),
    "sparsemixer": dict(router="sparsemixer", jitter_eps=0.2),
}


@pytest.mark.parametrize("router", list(PER_TOKEN_ROUTERS))
def test_token_output_does_not_depend_on_other_tokens(router):
    moe = make_moe(num_shared_experts=1, **PER_TOKEN_ROUTERS[router]).eval()
    x = tokens(12)
    batch = moe(x).hidden
    for t in (0, 5, 11):
        alone = moe(x[t : t + 1]).hidden
        torch.testing.assert_close(alone[0], batch[t], rtol=1e-5, atol=1e-6)
    # The other tokens replaced by fresh ones: token 3's output is unchanged.
    other = tokens(12, seed=9)
    other[3] = x[3]
    torch.testing.assert_close(moe(other).hidden[3], batch[3], rtol=1e-5, atol=1e-6)


def test_capacity_makes_a_token_depend_on_earlier_tokens():
    """The flip side: with capacity, a token alone is kept but in a crowd may be dropped."""
    moe = make_moe(num_experts=2, top_k=1, capacity_factor=1.0).eval()
    x = tokens(16)
    batch = moe(x).hidden
    dropped = (batch == 0).all(dim=-1)
    assert dropped.any()
    t = int(dropped.nonzero()[0])
    assert moe(x[t : t + 1]).hidden.abs().sum() > 0


def test_input_shape_and_dtype_are_kept():
    moe = make_moe()
    x = tokens(12).view(3, 4, 8)
    out = moe(x)
    assert out.hidden.shape == (3, 4, 8) and out.hidden.dtype == torch.float32
    flat = moe(x.reshape(12, 8)).hidden
    torch.testing.assert_close(out.hidden.reshape(12, 8), flat)


def test_routed_output_is_the_weighted_sum_of_chosen_experts():
    """A hand-worked token: router weight = identity, so the logits are the input itself."""
    moe = make_moe(d_model=4, num_experts=4, top_k=2)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4))
    x = torch.tensor([[2.0, -1.0, 1.0, 0.0]])
    # softmax(2, -1, 1, 0): the top-2 are experts 0 and 2 with probabilities in ratio
    # e^2 : e^1, renormalised to e / (e + 1) and 1 / (e + 1).
    w0, w2 = math.e / (math.e + 1), 1 / (math.e + 1)

    def expert(e):
        w_up, w_down = moe.experts.w_up[e], moe.experts.w_down[e]  # (D, 2F), (F, D); F = 6
        return (F.silu(x @ w_up[:, :6]) * (x @ w_up[:, 6:])) @ w_down

    expected = w0 * expert(0) + w2 * expert(2)
    torch.testing.assert_close(moe(x).hidden, expected, rtol=1e-5, atol=1e-6)


def test_token_ids_instead_of_hidden_states_is_one_clear_error():
    moe = make_moe()
    with pytest.raises(TypeError, match=r"floating point.*torch\.int64.*embed token ids first"):
        moe(torch.ones(3, 8, dtype=torch.long))
