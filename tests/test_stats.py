"""Per-call statistics: counts, dropped fraction, detached, and the aux-loss parts."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import make_moe, tokens
from reference_moe import reference_moe

LOSS_COEFS = dict(
    balance_loss_coef=0.3, z_loss_coef=0.02, importance_loss_coef=0.5, load_loss_coef=0.7
)
ROUTERS = {
    "softmax_topk": dict(router="softmax_topk", capacity_factor=0.75, overflow="drop"),
    "noisy_topk": dict(router="noisy_topk", capacity_factor=1.0, overflow="reroute"),
    "switch": dict(router="switch", top_k=1, capacity_factor=1.0),
    "sigmoid_topk": dict(router="sigmoid_topk"),
    "top_p": dict(router="top_p", top_k=3, top_p=0.6, capacity_factor=0.5),
    "expert_choice": dict(router="expert_choice"),
    "soft": dict(router="soft"),
    "dense": dict(router="dense"),
    "sparsemixer": dict(router="sparsemixer", jitter_eps=0.2, capacity_factor=0.75),
}


def layer(router: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return make_moe(**ROUTERS[router], **LOSS_COEFS).train()


@pytest.mark.parametrize("router", list(ROUTERS))
def test_stats_are_detached_and_aux_loss_is_their_weighted_sum(router):
    moe = layer(router)
    out = moe(tokens(16).requires_grad_())
    stats = out.stats
    for name in (
        "tokens_per_expert",
        "dropped_fraction",
        "load_cv",
        "router_entropy",
        "balance_loss",
        "z_loss",
        "importance_loss",
        "load_loss",
    ):
        value = getattr(stats, name)
        assert not value.requires_grad and value.grad_fn is None, name
    expected = (
        LOSS_COEFS["balance_loss_coef"] * stats.balance_loss
        + LOSS_COEFS["z_loss_coef"] * stats.z_loss
        + LOSS_COEFS["importance_loss_coef"] * stats.importance_loss
        + LOSS_COEFS["load_loss_coef"] * stats.load_loss
    )
    torch.testing.assert_close(out.aux_loss.detach(), expected)
    assert out.aux_loss.requires_grad
    assert stats.z_loss > 0


@pytest.mark.parametrize("router", ["softmax_topk", "noisy_topk", "switch", "top_p", "sparsemixer"])
def test_tokens_per_expert_and_dropped_fraction(router):
    moe = layer(router).eval()
    x = tokens(16)
    out = moe(x)
    ref = reference_moe(moe, x.double())
    kept = sum(len(assignments) for assignments in ref.assignments)
    assert int(out.stats.tokens_per_expert.sum()) == kept
    assert out.stats.tokens_per_expert.tolist() == ref.tokens_per_expert
    assert kept < ref.routed  # the case drops something
    assert out.stats.dropped_fraction.item() == pytest.approx(1 - kept / ref.routed)
    assert out.stats.tokens_per_expert.dtype == torch.long
    assert out.stats.capacity == moe.config.capacity(16)
    assert (out.stats.tokens_per_expert <= out.stats.capacity).all()


def test_dropless_stats_count_every_assignment():
    moe = make_moe(top_k=2)
    out = moe(tokens(16))
    assert int(out.stats.tokens_per_expert.sum()) == 16 * 2
    assert out.stats.dropped_fraction.item() == 0.0
    assert out.stats.capacity is None
    # Each token's top-2 from the router's own probabilities.
    probs = (tokens(16) @ moe.router.weight.t()).softmax(-1)
    expected = torch.bincount(probs.topk(2, dim=-1).indices.flatten(), minlength=4)
    assert out.stats.tokens_per_expert.tolist() == expected.tolist()


def test_load_cv_and_entropy():
    moe = make_moe(top_k=1, capacity_factor=None)
    x = tokens(16)
    stats = moe(x).stats
    counts = stats.tokens_per_expert.double()
    cv = (counts.var(correction=0).sqrt() / counts.mean()).item()
    assert stats.load_cv.item() == pytest.approx(cv, rel=1e-5)
    probs = (x @ moe.router.weight.t()).softmax(-1)
    entropy = -(probs * probs.log()).sum(-1).mean()
    assert stats.router_entropy.item() == pytest.approx(entropy.item(), rel=1e-5)
    assert 0 < stats.router_entropy.item() < math.log(4)


def test_expert_choice_and_soft_count_their_slots():
    moe = layer("expert_choice")
    stats = moe(tokens(16)).stats
    # C = ceil(1 * 16 * 2 / 4) = 8 tokens per expert; nothing is "dropped".
    assert stats.tokens_per_expert.tolist() == [8, 8, 8, 8]
    assert stats.dropped_fraction.item() == 0.0
    moe = layer("soft")
    stats = moe(tokens(12).view(3, 4, 8)).stats
    assert stats.tokens_per_expert.tolist() == [3, 3, 3, 3]  # B * slots_per_expert
