"""GShard top-2 (Lepikhin et al. 2020): the second expert is dispatched with probability
2 * g2 in training (g1 + g2 = 1), always in evaluation."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.routing import GShardTop2


def _router(num_experts: int = 4) -> GShardTop2:
    return GShardTop2(MoEConfig(d_model=4, d_hidden=4, num_experts=num_experts, router="gshard"))


def test_worked_example_in_evaluation():
    router = _router().eval()
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    # Logits are the token itself, log [6, 3, 1, ~0]: probabilities 0.6, 0.3, 0.1, ~0, so the
    # top two are experts 0 and 1 with normalised weights 6/9 and 3/9.
    x = torch.tensor([[6.0, 3.0, 1.0, 0.0]]).log().nan_to_num(neginf=-30.0)
    out = router(x)
    assert out.ids_TK.tolist() == [[0, 1]]
    torch.testing.assert_close(out.weights_TK, torch.tensor([[6 / 9, 3 / 9]]))
    assert out.valid_TK is None  # evaluation: both experts, deterministically
    again = router(x)
    assert torch.equal(out.weights_TK, again.weights_TK)


@pytest.mark.parametrize("p_second", [0.1, 0.3, 0.45])
def test_training_keep_rate_matches_two_g2(p_second):
    """Every token has g2 = p_second: the second slot is kept at rate 2 * g2."""
    router = _router().train()
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    g = torch.tensor([1 - p_second, p_second, 1e-6, 1e-6])
    x = g.log().expand(20_000, 4).contiguous()
    torch.manual_seed(0)
    out = router(x)
    kept = out.valid_TK[:, 1].float().mean().item()
    expected = 2 * p_second
    std = (expected * (1 - expected) / 20_000) ** 0.5
    assert abs(kept - expected) < 5 * std, (kept, expected)
    assert out.valid_TK[:, 0].all()
    # The first expert keeps g1; a skipped second slot weighs nothing.
    torch.testing.assert_close(
        out.weights_TK[:, 0], torch.full((20_000,), 1 - p_second), atol=1e-5, rtol=0
    )
    assert torch.equal(out.weights_TK[:, 1] == 0, ~out.valid_TK[:, 1])


def test_draws_are_seeded_and_evaluation_is_deterministic():
    torch.manual_seed(1)
    layer = MoE(MoEConfig(d_model=8, d_hidden=8, num_experts=4, router="gshard"))
    x = torch.randn(64, 8)
    torch.manual_seed(7)
    a = layer(x)
    torch.manual_seed(7)
    b = layer(x)
    assert torch.equal(a.hidden, b.hidden)
    assert a.stats.tokens_per_expert.sum() < 128  # some second experts were skipped
    layer.eval()
    c, d = layer(x), layer(x)
    assert torch.equal(c.hidden, d.hidden)
    assert c.stats.tokens_per_expert.sum() == 128


def test_gshard_is_top_2_only():
    with pytest.raises(ValueError, match="the gshard router is top-2; got top_k \\(3\\)"):
        MoEConfig(d_model=4, d_hidden=4, num_experts=4, top_k=3, router="gshard")
