"""soft (Puigcerver et al. 2023): slots are softmax mixes of a sequence's tokens.

# B sequences, N tokens, S slots (num_experts * slots_per_expert)
"""

from __future__ import annotations

import torch
from helpers import make_moe, tokens


def layer(**overrides):
    return make_moe(router="soft", num_experts=3, slots_per_expert=2, **overrides)


def test_dispatch_sums_to_one_over_tokens_and_combine_over_slots():
    moe = layer()
    routing = moe.router(tokens(10).view(2, 5, 8))
    assert routing.dispatch_BNS.shape == (2, 5, 6)
    torch.testing.assert_close(routing.dispatch_BNS.sum(dim=1), torch.ones(2, 6))
    torch.testing.assert_close(routing.combine_BNS.sum(dim=2), torch.ones(2, 5))


def test_logits_are_scaled_cosine_similarities():
    moe = layer()
    x = tokens(5).view(1, 5, 8)
    logits = moe.router(x).logits_BNS[0]
    phi = moe.router.slot_weight
    cosine = (x[0] / x[0].norm(dim=-1, keepdim=True)) @ (phi / phi.norm(dim=-1, keepdim=True)).t()
    torch.testing.assert_close(logits, moe.router.scale * cosine)


def test_not_causal_a_later_token_changes_an_earlier_output():
    """Every slot mixes the whole sequence: do not use soft routing in a decoder."""
    moe = layer()
    x = tokens(6).view(1, 6, 8)
    changed = x.clone()
    changed[0, -1] += 1.0
    assert not torch.allclose(moe(x).hidden[0, 0], moe(changed).hidden[0, 0])


def test_sequences_do_not_mix():
    moe = layer()
    x = tokens(10).view(2, 5, 8)
    changed = x.clone()
    changed[1] = tokens(5, seed=3)
    torch.testing.assert_close(moe(x).hidden[0], moe(changed).hidden[0])
    # A 2-D input is one sequence.
    torch.testing.assert_close(moe(x[0]).hidden, moe(x).hidden[0])


def test_every_expert_processes_slots_per_expert_rows_per_sequence():
    moe = layer()
    stats = moe(tokens(12).view(4, 3, 8)).stats
    assert stats.tokens_per_expert.tolist() == [8, 8, 8]  # 4 sequences * 2 slots
    assert stats.capacity is None and stats.dropped_fraction.item() == 0.0


def test_one_slot_with_a_single_token_is_that_token():
    # N = 1: dispatch and combine are both 1 for the single expert's single slot, so the
    # output is the expert applied to the token.
    moe = make_moe(router="soft", num_experts=1, top_k=1, activation="relu")
    x = tokens(1).view(1, 1, 8)
    expected = torch.relu(x[0] @ moe.experts.w_up[0]) @ moe.experts.w_down[0]
    torch.testing.assert_close(moe(x).hidden[0], expected)
