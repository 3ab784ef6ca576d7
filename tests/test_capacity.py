"""Capacity and overflow: worked examples with hand-chosen routing, then invariants.

# T tokens, E experts, K top_k, C capacity
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_moe import TokenRoute, reference_capacity

from moekit.capacity import apply_capacity, claim_order, positions_in_expert
from moekit.dispatch import TokenChoicePlan
from moekit.routing.base import TokenChoice

INF = math.inf


def hand_choice(gate, top_k, renormalize=False, valid=None, rank=None) -> TokenChoice:
    """A TokenChoice from per-token gate values: ids are the top_k of rank (default gate)."""
    gate_TE = torch.tensor(gate, dtype=torch.float64)
    rank_TE = gate_TE if rank is None else torch.tensor(rank, dtype=torch.float64)
    ids_TK = rank_TE.topk(top_k, dim=-1).indices
    valid_TK = None if valid is None else torch.tensor(valid)
    return token_choice(gate_TE, rank_TE, ids_TK, valid_TK, renormalize)


def token_choice(gate_TE, rank_TE, ids_TK, valid_TK, renormalize) -> TokenChoice:
    """The routing a softmax-style router would return for these picks."""
    weights_TK = gate_TE.gather(1, ids_TK)
    if valid_TK is not None:
        weights_TK = weights_TK * valid_TK
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return TokenChoice(
        weights_TK=weights_TK,
        ids_TK=ids_TK,
        valid_TK=valid_TK,
        gate_TE=gate_TE,
        rank_TE=rank_TE,
        logits_TE=gate_TE.log(),
        probs_TE=gate_TE,
    )


# Four tokens, four experts, top-2, capacity 2. Every token's first choice is expert 0.
#        e0    e1    e2    e3       ids (best first)   max gate
GATE = [
    [0.40, 0.30, 0.20, 0.10],  # t0: (0, 1)            0.40
    [0.50, 0.10, 0.15, 0.25],  # t1: (0, 3)            0.50
    [0.35, 0.30, 0.25, 0.10],  # t2: (0, 1)            0.35
    [0.45, 0.10, 0.05, 0.40],  # t3: (0, 3)            0.45   ranking e0, e3, e1, e2
]


def test_claim_order_first_choices_before_second_choices():
    # Slots are t * K + k. Position order: t0k0, t1k0, t2k0, then t0k1, t1k1, t2k1.
    assert claim_order(3, 2, None).tolist() == [0, 2, 4, 1, 3, 5]
    # Batch priority: scores 0.1, 0.9, 0.5 put the tokens in order t1, t2, t0.
    priority = torch.tensor([0.1, 0.9, 0.5])
    assert claim_order(3, 2, priority).tolist() == [2, 4, 0, 3, 5, 1]


def test_claim_order_lives_on_the_requested_device():
    assert claim_order(3, 2, None, device=torch.device("meta")).device.type == "meta"


@pytest.mark.gpu
@pytest.mark.parametrize("overflow", ["drop", "reroute"])
@pytest.mark.parametrize("batch_priority", [False, True])
def test_capacity_on_cuda_equals_cpu(overflow, batch_priority):
    routing = hand_choice(GATE, 2, renormalize=True)
    on_cuda = TokenChoice(
        **{name: None if value is None else value.cuda() for name, value in vars(routing).items()}
    )
    expected = apply_capacity(routing, 2, overflow, batch_priority)
    got = apply_capacity(on_cuda, 2, overflow, batch_priority)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.cpu(), b)


def test_positions_in_expert_counts_earlier_claims():
    # Experts in claim order: 2, 0, 2, 2, 1, 0 -> slot index within each expert.
    experts = torch.tensor([2, 0, 2, 2, 1, 0])
    assert positions_in_expert(experts, 3).tolist() == [0, 0, 1, 2, 0, 1]


def test_drop_in_position_order():
    # First choices claim in position order: t0->e0 (1st), t1->e0 (2nd), t2->e0 and t3->e0
    # overflow. Second choices: t0->e1, t1->e3, t2->e1, t3->e3 all fit (2 each).
    ids, weights, kept = apply_capacity(hand_choice(GATE, 2), 2, "drop", batch_priority=False)
    assert kept.tolist() == [[True, True], [True, True], [False, True], [False, True]]
    assert ids.tolist() == [[0, 1], [0, 3], [0, 1], [0, 3]]  # drop never moves anything
    expected = [[0.40, 0.30], [0.50, 0.25], [0.0, 0.30], [0.0, 0.40]]
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64))


def test_drop_with_batch_priority():
    # Max gates 0.40, 0.50, 0.35, 0.45 give the claim order t1, t3, t0, t2: now t1 and t3
    # keep expert 0, and t0 and t2 (the least confident) lose their first choice.
    ids, weights, kept = apply_capacity(hand_choice(GATE, 2), 2, "drop", batch_priority=True)
    assert kept.tolist() == [[False, True], [True, True], [False, True], [True, True]]
    assert ids.tolist() == [[0, 1], [0, 3], [0, 1], [0, 3]]


def test_reroute_in_position_order():
    # Overflowed in claim order: t2k0, t3k0. Room left: e2 has 2, every other expert 0.
    # Round 1: t2 tries its rank-3 expert e2 -> wins (e2 room 1). t3 tries its rank-3
    #          expert e1 -> full, stays pending.
    # Round 2: t3 tries its rank-4 expert e2 -> wins (e2 room 0).
    # With renormalised weights, a moved weight is new gate / the token's original sum:
    # t2: 0.25 / (0.35 + 0.30); t3: 0.05 / (0.45 + 0.40).
    routing = hand_choice(GATE, 2, renormalize=True)
    ids, weights, kept = apply_capacity(routing, 2, "reroute", batch_priority=False)
    assert ids.tolist() == [[0, 1], [0, 3], [2, 1], [2, 3]]
    assert kept.all()
    expected = routing.weights_TK.clone()
    expected[2, 0] = 0.25 / 0.65
    expected[3, 0] = 0.05 / 0.85
    torch.testing.assert_close(weights, expected)


def test_reroute_with_batch_priority():
    # Claim order t1, t3, t0, t2: t0k0 and t2k0 overflow. Round 1: t0 tries e2 (its rank 3)
    # and t2 tries e2 (its rank 3); e2 has room 2, so both move there.
    ids, _, kept = apply_capacity(hand_choice(GATE, 2), 2, "reroute", batch_priority=True)
    assert ids.tolist() == [[2, 1], [0, 3], [2, 1], [0, 3]]
    assert kept.all()


def test_reroute_competition_is_won_in_claim_order():
    # Three tokens all want e0, capacity 1, top-1. Rankings: every token e0, e1, e2.
    gate = [[0.6, 0.3, 0.1], [0.7, 0.2, 0.1], [0.8, 0.15, 0.05]]
    # Position order: t0 keeps e0. Round 1: t1 and t2 both try e1; t1 claims first and
    # wins. Round 2: t2 tries e2 and wins.
    ids, _, kept = apply_capacity(hand_choice(gate, 1), 1, "reroute", batch_priority=False)
    assert ids.flatten().tolist() == [0, 1, 2] and kept.all()
    # Batch priority (max gates 0.6 < 0.7 < 0.8): t2 keeps e0, t1 wins e1, t0 ends on e2.
    ids, _, kept = apply_capacity(hand_choice(gate, 1), 1, "reroute", batch_priority=True)
    assert ids.flatten().tolist() == [2, 1, 0] and kept.all()
    # Drop keeps just the one claim on e0.
    _, _, kept = apply_capacity(hand_choice(gate, 1), 1, "drop", batch_priority=True)
    assert kept.flatten().tolist() == [False, False, True]


def test_reroute_never_uses_a_forbidden_expert():
    # Capacity 1, top-1; e1 and e2 are outside t1's and t2's allowed groups (rank -inf).
    gate = [[0.9, 0.2, 0.8, 0.7], [0.8, 0.6, 0.5, 0.3], [0.7, 0.6, 0.5, 0.4]]
    rank = [[0.9, 0.2, 0.8, 0.7], [0.8, -INF, -INF, 0.3], [0.7, -INF, -INF, -INF]]
    # t0 keeps e0. Round 1: t1 skips e1 (higher gate, but forbidden) and takes e3;
    # t2 has no allowed expert left and is dropped.
    routing = hand_choice(gate, 1, rank=rank)
    ids, weights, kept = apply_capacity(routing, 1, "reroute", batch_priority=False)
    assert kept.flatten().tolist() == [True, True, False]
    assert ids[:2].flatten().tolist() == [0, 3]
    torch.testing.assert_close(
        weights.flatten(), torch.tensor([0.9, 0.3, 0.0], dtype=torch.float64)
    )


def test_unused_top_p_slots_claim_nothing():
    # t0 uses one expert (slot 1 unused); t1 uses both. Capacity 1.
    # First choices: t0->e0, t1->e1 fit. Second choices: t0's is unused, t1->e0 overflows;
    # under reroute t1 has no expert left (it already uses both), so it is dropped.
    gate = [[0.9, 0.1], [0.3, 0.7]]
    routing = hand_choice(gate, 2, valid=[[True, False], [True, True]])
    for overflow in ("drop", "reroute"):
        ids, weights, kept = apply_capacity(routing, 1, overflow, batch_priority=False)
        assert kept.tolist() == [[True, False], [True, False]]
        assert ids.tolist() == [[0, 1], [1, 0]]
        assert weights[:, 1].tolist() == [0.0, 0.0]


# ---------------------------------------------------------------- invariants


@st.composite
def routings(draw):
    """Random token-choice decisions: softmax gates, optional top-p masks and forbidden experts."""
    E = draw(st.integers(1, 6))
    K = draw(st.integers(1, E))
    T = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    gate_TE = (2 * torch.randn(T, E, generator=generator, dtype=torch.float64)).softmax(-1)
    ids_TK = gate_TE.topk(K, dim=-1).indices
    valid_TK = None
    if draw(st.booleans()):  # top_p: each token uses a prefix of its K slots, at least one
        used_T = torch.randint(1, K + 1, (T,), generator=generator)
        valid_TK = torch.arange(K) < used_T.unsqueeze(1)
    rank_TE = gate_TE
    if draw(st.booleans()):  # group limiting: forbid some experts the token did not pick
        forbidden_TE = torch.rand(T, E, generator=generator) < 0.4
        forbidden_TE.scatter_(1, ids_TK, False)
        rank_TE = gate_TE.masked_fill(forbidden_TE, -INF)
    routing = token_choice(gate_TE, rank_TE, ids_TK, valid_TK, renormalize=True)
    capacity = draw(st.integers(1, T))
    return routing, capacity


def valid_mask(routing):
    if routing.valid_TK is None:
        return torch.ones_like(routing.ids_TK, dtype=torch.bool)
    return routing.valid_TK


INVARIANTS = settings(max_examples=60, deadline=None)


@INVARIANTS
@given(routings(), st.sampled_from(["drop", "reroute"]), st.booleans())
def test_capacity_invariants(case, overflow, batch_priority):
    routing, capacity = case
    E = routing.gate_TE.shape[-1]
    ids, weights, kept = apply_capacity(routing, capacity, overflow, batch_priority)

    assert (kept <= valid_mask(routing)).all()  # unused slots are never kept
    assert (torch.bincount(ids[kept], minlength=E) <= capacity).all()
    assert torch.equal(weights != 0, kept)  # 0 exactly where not kept (gates are > 0)
    if overflow == "drop":
        assert torch.equal(ids, routing.ids_TK)
    else:
        _, _, kept_by_drop = apply_capacity(routing, capacity, "drop", batch_priority)
        assert (kept_by_drop <= kept).all()  # reroute keeps everything drop keeps, and more
        for t in range(ids.shape[0]):
            experts = ids[t][kept[t]].tolist()
            assert len(experts) == len(set(experts)), f"token {t} uses an expert twice"
            originals = set(routing.ids_TK[t][valid_mask(routing)[t]].tolist())
            for k in range(ids.shape[1]):
                if kept[t, k] and ids[t, k] != routing.ids_TK[t, k]:
                    assert ids[t, k].item() not in originals
                    assert torch.isfinite(routing.rank_TE[t, ids[t, k]])


@INVARIANTS
@given(routings(), st.booleans())
def test_no_overflow_when_capacity_holds_every_token(case, batch_priority):
    routing, _ = case
    T, K = routing.ids_TK.shape
    _, weights, kept = apply_capacity(routing, T, "drop", batch_priority)
    assert torch.equal(kept, valid_mask(routing))
    if routing.valid_TK is None:
        assert int(kept.sum()) == T * K
    torch.testing.assert_close(weights, routing.weights_TK)


@INVARIANTS
@given(routings(), st.sampled_from(["drop", "reroute"]), st.booleans())
def test_capacity_equals_the_one_at_a_time_walk(case, overflow, batch_priority):
    routing, capacity = case
    ids, weights, kept = apply_capacity(routing, capacity, overflow, batch_priority)
    routes = []
    for t in range(ids.shape[0]):
        used = valid_mask(routing)[t]
        picks = list(zip(routing.ids_TK[t][used].tolist(), routing.weights_TK[t][used]))
        gate = routing.gate_TE[t]
        routes.append(TokenRoute(picks, gate, routing.rank_TE[t].tolist(), gate, gate))
    expected = reference_capacity(routes, capacity, overflow, batch_priority)
    for t, assignments in enumerate(expected):
        got = [(ids[t, k].item(), weights[t, k].item()) for k in range(ids.shape[1]) if kept[t, k]]
        want = [(e, w.item()) for e, w in assignments]
        assert [e for e, _ in got] == [e for e, _ in want], f"token {t}"
        assert [w for _, w in got] == pytest.approx([w for _, w in want], rel=1e-12)


@INVARIANTS
@given(routings(), st.sampled_from(["drop", "reroute"]), st.booleans())
def test_plan_is_a_permutation_of_the_kept_assignments(case, overflow, batch_priority):
    routing, capacity = case
    T, K = routing.ids_TK.shape
    E = routing.gate_TE.shape[-1]
    ids, weights, kept = apply_capacity(routing, capacity, overflow, batch_priority)
    plan = TokenChoicePlan(ids, kept, weights, E)

    # Feature 0 of each token is its index, so a dispatched row says which token it holds.
    x_TD = torch.stack(
        [torch.arange(T, dtype=torch.float64), torch.ones(T, dtype=torch.float64)], 1
    )
    rows = plan.dispatch(x_TD)[:, 0].long().tolist()
    counts = plan.counts_E.tolist()
    assert counts == torch.bincount(ids[kept], minlength=E).tolist()
    assert len(rows) == T * K  # the kept rows, then padding: shapes never depend on routing
    start = 0
    for e, count in enumerate(counts):
        expected = sorted(t for t in range(T) for k in range(K) if kept[t, k] and ids[t, k] == e)
        assert sorted(rows[start : start + count]) == expected, f"expert {e}"
        start += count

    # Combining the dispatched rows unchanged gives each token its kept weight mass.
    y_TD = plan.combine(plan.dispatch(x_TD))
    torch.testing.assert_close(y_TD[:, 1], weights.sum(dim=-1))
    torch.testing.assert_close(
        y_TD[:, 0], weights.sum(dim=-1) * torch.arange(T, dtype=torch.float64)
    )
