"""noisy_topk (Shazeer et al. 2017): noise in training only, and a smooth, trainable load."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import make_moe, tokens

from moekit import losses


def layer(**overrides):
    return make_moe(router="noisy_topk", top_k=2, **overrides)


def test_eval_is_deterministic_clean_softmax_top_k():
    moe = layer().eval()
    x = tokens(12)
    routing = moe.router(x)
    clean = x @ moe.router.weight.t()
    weights, ids = clean.softmax(-1).topk(2, dim=-1)
    assert torch.equal(routing.ids_TK, ids)
    torch.testing.assert_close(routing.weights_TK, weights / weights.sum(-1, keepdim=True))
    assert routing.load_E is None
    torch.testing.assert_close(moe(x).hidden, moe(x).hidden, rtol=0, atol=0)


def test_training_adds_noise_scaled_by_softplus():
    moe = layer().train()
    x = tokens(12)
    torch.manual_seed(5)
    routing = moe.router(x)
    torch.manual_seed(5)
    noise = torch.randn(12, 4)
    clean = x @ moe.router.weight.t()
    noisy = clean + noise * F.softplus(x @ moe.router.noise_weight.t())
    torch.testing.assert_close(routing.probs_TE, noisy.softmax(-1))
    # The z-loss sees the clean logits.
    torch.testing.assert_close(routing.logits_TE, clean)
    # Two training calls draw different noise.
    assert not torch.equal(moe.router(x).probs_TE, moe.router(x).probs_TE)


def test_smooth_load_is_differentiable_and_trains_the_noise():
    moe = layer().train()
    routing = moe.router(tokens(32))
    assert routing.load_E is not None and routing.load_E.requires_grad
    losses.load_loss(routing.load_E).backward()
    assert moe.router.noise_weight.grad.abs().sum() > 0
    assert moe.router.weight.grad.abs().sum() > 0


def test_smooth_load_tends_to_the_hard_count_without_noise():
    # Feature 0 is a constant 30 that only the noise gate sees, with weight -1 for every
    # expert: the noise std is softplus(-30) ~ 1e-13, so each P(expert in top-k) is a step
    # function and the smooth load equals the number of tokens that picked each expert.
    moe = layer().train()
    with torch.no_grad():
        moe.router.weight[:, 0] = 0.0
        moe.router.noise_weight.zero_()
        moe.router.noise_weight[:, 0] = -1.0
    x = tokens(32)
    x[:, 0] = 30.0
    routing = moe.router(x)
    counts = torch.bincount(routing.ids_TK.flatten(), minlength=4).float()
    torch.testing.assert_close(routing.load_E, counts, rtol=0, atol=1e-4)


def test_smooth_load_with_k_equal_to_num_experts_is_every_token():
    moe = make_moe(router="noisy_topk", num_experts=3, top_k=3).train()
    routing = moe.router(tokens(5))
    torch.testing.assert_close(routing.load_E, torch.full((3,), 5.0))


def test_layer_load_loss_uses_the_smooth_load_in_training_only():
    moe = layer(load_loss_coef=1.0, balance_loss_coef=0.0)
    x = tokens(16)
    moe.train()
    out = moe(x)
    out.aux_loss.backward()
    assert moe.router.noise_weight.grad.abs().sum() > 0
    moe.eval()
    out = moe(x)
    expected = losses.cv_squared(out.stats.tokens_per_expert.float())
    torch.testing.assert_close(out.stats.load_loss, expected)
