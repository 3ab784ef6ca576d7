"""The diff on constructed traces whose answers are worked out by hand in the comments,
its invariants (hypothesis), the margin model on ties and wide margins, and refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from builders import identity, make_trace
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.traces import Trace, diff_traces


def pair() -> tuple[Trace, Trace]:
    """One sequence of 4 tokens, one layer, E=4, K=2.

    token  a ids  b ids   a weights   b weights    what differs
    0      0 1    0 1     .5 .5       .6 .4        nothing but weights: |.1|, |.1|
    1      0 1    1 0     .5 .5       .5 .5        order (so top-1 too); weights 0, 0
    2      0 1    0 2     .5 .5       .7 .3        set (top-1 agrees); agreeing expert 0: .2
    3      0 1    2 3     .5 .5       .5 .5        set and top-1; no agreeing expert
    top1 2/4, set 2/4, order 1/4; weights over 5 agreeing pairs: mean .4/5 = .08, max .2.

    a's logits: tokens 0, 1 have margin 9 between the 2nd (4) and 3rd (-5) expert;
    tokens 2, 3 a tie (margin 0). b's logits differ by +-0.01, so sigma ~ 0.01: a tie flips
    with probability 1/2, a margin of 9 never: predicted (0 + 0 + .5 + .5) / 4 = .25.
    b is bf16: rounding alone gives the same .5 at a tie and 0 at margin 9.
    """
    model = identity(layers=1, experts=4, top_k=2)
    ids_a = torch.tensor([[0, 1]] * 4)
    ids_b = torch.tensor([[0, 1], [1, 0], [0, 2], [2, 3]])
    w_a = torch.full((4, 2), 0.5)
    w_b = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.7, 0.3], [0.5, 0.5]])
    logits = torch.tensor([[5.0, 4, -5, -6]] * 2 + [[5.0, 1, 1, -6]] * 2)
    delta = torch.tensor([0.01, -0.01]).repeat(8).reshape(4, 4)
    common = dict(model=model, tokens=torch.arange(4), offsets=torch.tensor([0, 4]))

    def make(ids, w, logits_TE, dtype):
        return Trace(
            ids=ids.reshape(4, 1, 2).int(), weights=w.reshape(4, 1, 2),
            logits=logits_TE.reshape(4, 1, 4), recording={"dtype": dtype}, **common,
        )  # fmt: skip

    return make(ids_a, w_a, logits, "float32"), make(ids_b, w_b, logits + delta, "bfloat16")


def test_constructed_case_gives_the_worked_answers():
    a, b = pair()
    layer = diff_traces(a, b, "fp32", "bf16").layers[0]
    assert layer.tokens == 4
    assert layer.top1 == pytest.approx(0.5) and layer.set == pytest.approx(0.5)
    assert layer.order == pytest.approx(0.25)
    assert layer.weight_mean == pytest.approx(0.08) and layer.weight_max == pytest.approx(0.2)
    assert layer.sigma == pytest.approx(0.01, rel=0.05)
    assert layer.predicted == pytest.approx(0.25, abs=1e-6)
    assert layer.rounding == pytest.approx(0.25, abs=1e-6)
    bins = {row["lo"]: row for row in layer.margins}
    assert bins[0.0]["tokens"] == 2 and bins[0.0]["measured"] == 1.0
    assert bins[0.0]["predicted"] == pytest.approx(0.5)
    assert bins[1.0]["tokens"] == 2 and bins[1.0]["measured"] == 0.0
    assert bins[1.0]["predicted"] == pytest.approx(0.0, abs=1e-9)
    # positions: token 0 alone at position 0; tokens 1-3 (two set flips) in [1, 4)
    assert layer.positions == [
        {"lo": 0, "hi": 1, "tokens": 1, "set": 0.0},
        {"lo": 1, "hi": 4, "tokens": 3, "set": pytest.approx(2 / 3)},
    ]


def test_table_and_json_show_the_figures():
    a, b = pair()
    diff = diff_traces(a, b, "fp32", "bf16")
    table = diff.table()
    assert "a: fp32" in table and "b: bf16" in table
    assert "50.00%" in table and "25.00%" in table and "2.00e-01" in table
    data = diff.to_json()
    assert data["layers"][0]["set"] == 0.5 and data["a"] == "fp32"


def test_tokens_without_a_route_are_left_out():
    a, b = pair()
    b = dataclasses.replace(b, routed=torch.tensor([True, True, False, False]))
    layer = diff_traces(a, b).layers[0]
    assert layer.tokens == 2 and layer.set == 0.0 and layer.top1 == 0.5


@settings(max_examples=30, deadline=None)
@given(seed_a=st.integers(0, 50), seed_b=st.integers(0, 50), top_k=st.integers(1, 3))
def test_invariants(seed_a, seed_b, top_k):
    a = make_trace(top_k=top_k, seed=seed_a)
    b = dataclasses.replace(make_trace(top_k=top_k, seed=seed_b), tokens=a.tokens)
    same = diff_traces(a, a)
    assert all(d.top1 == d.set == d.order == 0.0 and d.weight_max == 0.0 for d in same.layers)
    ab, ba = diff_traces(a, b), diff_traces(b, a)
    for x, y in zip(ab.layers, ba.layers):
        assert x.set == y.set and x.top1 == y.top1 and x.order == y.order
        assert x.order + x.set <= 1.0  # an order flip keeps the set
        if top_k == 1:
            assert x.order == 0.0 and x.set == x.top1


def test_traces_of_other_tokens_or_models_are_refused():
    a, b = pair()
    with pytest.raises(ValueError, match="tokens: the traces differ first at token 2"):
        diff_traces(a, dataclasses.replace(b, tokens=torch.tensor([0, 1, 7, 3])))
    other = make_trace(lengths=(4,), layers=2)
    with pytest.raises(ValueError, match="model.layers: a has 1 MoE layers, b has 2"):
        diff_traces(a, other)
    more_experts = dataclasses.replace(b, model=identity(layers=1, experts=5), logits=None)
    with pytest.raises(ValueError, match="model.num_experts"):
        diff_traces(a, more_experts)
    with pytest.raises(ValueError, match="offsets: the traces split their tokens"):
        diff_traces(a, dataclasses.replace(b, offsets=torch.tensor([0, 2, 4])))
