"""sparsemixer (GRIN, arXiv:2409.12136; Phi-3.5-MoE): stage-wise masked softmax, Gumbel-max
sampling and the midpoint gradient estimator in training.

The router weight is set to the identity so the logits are the input itself.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_moe, tokens

E = 8


def router(num_experts: int = E, top_k: int = 2, jitter_eps: float = 0.01, **overrides):
    moe = make_moe(
        d_model=num_experts,
        num_experts=num_experts,
        top_k=top_k,
        router="sparsemixer",
        jitter_eps=jitter_eps,
        **overrides,
    )
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(num_experts))
    return moe.router


def random_logits(seed: int, num_tokens: int = 64) -> torch.Tensor:
    """Logits of several kinds: wide and narrow spreads, negative, tied and all-zero rows,
    and rows with an expert right at the relative threshold 2 * 0.01 below the best."""
    g = torch.Generator().manual_seed(seed)
    scale = [2.0, 0.05, 0.01][seed % 3]
    logits = torch.randn(num_tokens, E, generator=g) * scale + (seed % 5 - 2)
    logits[0] = torch.randint(-2, 3, (E,), generator=g).float()  # ties
    logits[1] = 0.0
    logits[2] = -logits[2].abs()
    best = logits[3].abs().max() + 1.0
    logits[3, 0], logits[3, 1], logits[3, 2] = best, best * (1 - 0.02), best * (1 - 0.0200001)
    return logits


def phimoe_sparsemixer():
    modeling = pytest.importorskip("transformers.models.phimoe.modeling_phimoe")
    return modeling.sparsemixer, modeling.PhimoeMultiplier


@pytest.mark.parametrize("seed", range(30))
def test_eval_routing_equals_transformers_phimoe(seed):
    sparsemixer, _ = phimoe_sparsemixer()
    logits = random_logits(seed)
    routing = router().eval()(logits)
    weights, ids = sparsemixer(logits, jitter_eps=0.01, training=False, top_k=2)
    assert torch.equal(routing.ids_TK, ids)
    assert torch.equal(routing.weights_TK, weights)


def test_worked_example():
    # eps = 0.01: an expert stays when (max - s) / max(|s|, max) <= 0.02.
    # Token 0, logits (2.0, 1.97, 1.0, 1.99):
    #   stage 1: max 2.0 (e0); e1 gap 0.03 / 2 = 0.015 and e3 0.01 / 2 = 0.005 stay, e2
    #     (0.5) is masked: weight e^2 / (e^2 + e^1.97 + e^1.99).
    #   stage 2 (e0 taken): max 1.99 (e3); e1 0.02 / 1.99 = 0.01 stays, e2 masked:
    #     weight e^1.99 / (e^1.99 + e^1.97).
    #   stage 3 (top_k 3): only e1 (1.97) and e2 are free; e2 is masked: weight 1.
    # Token 1, logits (-1.0, -1.01, -3.0, -1.03), the scale is |s| (max is negative):
    #   stage 1: max -1 (e0); e1 0.01 / 1.01 stays, e3 0.03 / 1.03 = 0.029 masked:
    #     weight e^-1 / (e^-1 + e^-1.01).
    #   stage 2: max -1.01 (e1); e3 0.02 / 1.03 = 0.019 stays: e^-1.01 / (e^-1.01 + e^-1.03).
    #   stage 3: max -1.03 (e3); e2 1.97 / 3 is masked: weight 1.
    logits = torch.tensor([[2.0, 1.97, 1.0, 1.99], [-1.0, -1.01, -3.0, -1.03]])
    routing = router(num_experts=4, top_k=3).eval()(logits)
    assert routing.ids_TK.tolist() == [[0, 3, 1], [0, 1, 3]]
    exp = math.exp
    expected = torch.tensor(
        [
            [exp(2) / (exp(2) + exp(1.97) + exp(1.99)), exp(1.99) / (exp(1.99) + exp(1.97)), 1],
            [exp(-1) / (exp(-1) + exp(-1.01)), exp(-1.01) / (exp(-1.01) + exp(-1.03)), 1],
        ]
    )
    torch.testing.assert_close(routing.weights_TK, expected)
    # The balance loss and z-loss see the plain softmax and the raw logits.
    torch.testing.assert_close(routing.probs_TE, logits.softmax(-1))
    torch.testing.assert_close(routing.logits_TE, logits)


def stage_gates(logits: torch.Tensor, taken: torch.Tensor, eps: float) -> torch.Tensor:
    """The masked softmax of one stage, written out: taken experts and those more than
    2 * eps (relative) below the best free one at -inf."""
    free = logits.masked_fill(taken, -math.inf)
    top = free.max(dim=-1, keepdim=True).values
    far = (top - logits) / torch.maximum(logits.abs(), top) > 2 * eps
    return free.masked_fill(far, -math.inf).softmax(dim=-1)


@pytest.mark.parametrize("seed", range(10))
def test_training_gradient_equals_phimoe_multiplier(seed):
    _, multiplier = phimoe_sparsemixer()
    eps = 0.2  # wide masks, so the samples vary
    torch.manual_seed(seed)
    routing = router(jitter_eps=eps).train()(random_logits(seed))
    logits, ids = routing.logits_TE, routing.ids_TK
    upstream = torch.randn(ids.shape, generator=torch.Generator().manual_seed(seed))
    (got,) = torch.autograd.grad((routing.weights_TK * upstream).sum(), logits)

    reference = logits.detach().clone().requires_grad_()
    taken = torch.zeros_like(logits, dtype=torch.bool)
    weights = []
    for k in range(2):
        gates = stage_gates(reference.detach(), taken, eps)
        m = gates.gather(1, ids[:, k : k + 1])
        factor = routing.weights_TK[:, k : k + 1].detach() / m
        # The midpoint factor: 1 for the stage's best expert, else 1 or 0.3333 by a coin.
        is_best = ids[:, k : k + 1] == gates.argmax(dim=-1, keepdim=True)
        assert torch.all(torch.isclose(factor, torch.ones(())) | ~is_best)
        factor = torch.where(torch.isclose(factor, torch.ones(())), 1.0, 0.3333)
        weights.append(multiplier.apply(reference, m, ids[:, k : k + 1], gates, factor))
        taken = taken | torch.nn.functional.one_hot(ids[:, k], E).bool()
    weights = torch.cat(weights, dim=-1)
    torch.testing.assert_close(routing.weights_TK, weights, rtol=0, atol=0)
    (expected,) = torch.autograd.grad((weights * upstream).sum(), reference)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_training_samples_only_unmasked_experts(top_k):
    eps = 0.05
    r = router(top_k=top_k, jitter_eps=eps).train()
    for seed in range(20):
        torch.manual_seed(seed)
        logits = random_logits(seed)
        ids = r(logits).ids_TK
        taken = torch.zeros_like(logits, dtype=torch.bool)
        for k in range(top_k):
            gates = stage_gates(logits, taken, eps)
            assert (gates.gather(1, ids[:, k : k + 1]) > 0).all()
            taken = taken | torch.nn.functional.one_hot(ids[:, k], E).bool()
        assert (taken.sum(-1) == top_k).all()  # distinct experts


def test_training_samples_follow_the_masked_softmax():
    # One token repeated: e0..e2 are within 2 * 0.05 of the best, e3 is not.
    logits = torch.tensor([[1.0, 0.95, 0.92, 0.5]]).expand(40_000, 4)
    torch.manual_seed(0)
    ids = router(num_experts=4, top_k=1, jitter_eps=0.05).train()(logits).ids_TK
    frequency = torch.bincount(ids[:, 0], minlength=4).float() / len(ids)
    expected = torch.tensor([1.0, 0.95, 0.92, -math.inf]).softmax(-1)
    torch.testing.assert_close(frequency, expected, atol=0.01, rtol=0)


def test_training_draws_are_reproducible_and_random():
    r = router(jitter_eps=0.2).train()
    logits = random_logits(0)
    torch.manual_seed(3)
    first = r(logits)
    torch.manual_seed(3)
    again = r(logits)
    assert torch.equal(first.ids_TK, again.ids_TK)
    assert torch.equal(first.weights_TK, again.weights_TK)
    assert not torch.equal(r(logits).ids_TK, first.ids_TK)


def test_replay_weights_are_the_eval_weights():
    r = router(top_k=3, jitter_eps=0.05).eval()
    routing = r(random_logits(1))
    replayed = r.replay_weights(routing, routing.ids_TK, None)
    assert torch.equal(replayed, routing.weights_TK)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_layer_forward_backward(train):
    moe = make_moe(router="sparsemixer", jitter_eps=0.2, z_loss_coef=0.01).train(train)
    x = tokens(16).requires_grad_()
    out = moe(x)
    assert out.stats.tokens_per_expert.sum() == 16 * 2
    assert out.stats.balance_loss > 0 and out.stats.z_loss > 0
    (out.hidden.square().sum() + out.aux_loss).backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert x.grad.isfinite().all()
