"""Recording from moekit models: every token-choice router records the decision its layer
used; expert choice and Soft MoE record what they do and say so; a generation (prefill and
cached decode steps, left padding) records the same experts as one forward over its
tokens; tokens, positions and boundaries come out per sequence."""

from __future__ import annotations

import pytest
import torch
from builders import TOKEN_CHOICE
from helpers import make_moe, tokens

from moekit import MoEConfig
from moekit.generate import generate, left_padded
from moekit.models import Transformer
from moekit.models.transformer import ModelConfig
from moekit.traces import record_routing
from moekit.traces.run import record_forward, record_generation

pytestmark = pytest.mark.usefixtures("one_thread")


def _record_layer(moe, x):
    with record_routing(moe) as recorder:
        moe(x)
    return recorder.trace(torch.zeros(1, x.shape[0], dtype=torch.long))


@pytest.mark.parametrize("case", sorted(TOKEN_CHOICE))
def test_token_choice_records_the_layers_decision(case):
    moe = make_moe(**TOKEN_CHOICE[case]).eval()
    x = tokens(12)
    trace = _record_layer(moe, x)
    decision = moe.router.route(x, None)  # eval: the same decision again
    assert torch.equal(trace.ids[:, 0].long(), decision.ids_TK)
    assert torch.equal(trace.weights[:, 0], decision.weights_TK)
    assert torch.equal(trace.logits[:, 0], decision.logits_TE)
    if decision.valid_TK is not None:
        assert torch.equal(trace.valid[:, 0], decision.valid_TK)
    assert "token choice" in trace.recording["routing"]


def test_capacity_dropped_assignments_keep_their_expert():
    moe = make_moe(capacity_factor=0.5, overflow="drop").eval()
    x = tokens(16)
    trace = _record_layer(moe, x)
    out = moe(x)
    assert out.stats.dropped_fraction > 0  # the case drops
    assert torch.equal(trace.ids[:, 0].long(), moe.router.route(x, None).ids_TK)


def test_expert_choice_records_one_slot_per_expert():
    moe = make_moe(router="expert_choice", capacity_factor=1.0).eval()
    x = tokens(10)
    trace = _record_layer(moe, x)
    decision = moe.router.route(x, moe.config.capacity(10))
    assert trace.model.top_k == 4 and trace.ids.shape == (10, 1, 4)
    assert torch.equal(trace.ids[:, 0], torch.arange(4).expand(10, 4).int())
    # slot e is valid exactly where expert e picked the token, with its weight
    for e in range(4):
        picked = torch.zeros(10, dtype=torch.bool)
        picked[decision.token_ids_EC[e]] = True
        assert torch.equal(trace.valid[:, 0, e], picked)
        assert torch.equal(trace.weights[decision.token_ids_EC[e], 0, e], decision.weights_EC[e])
    assert "expert choice" in trace.recording["routing"]


def test_soft_moe_records_each_experts_combine_mass():
    moe = make_moe(router="soft", slots_per_expert=2).eval()
    x = tokens(12).reshape(2, 6, 8)
    with record_routing(moe) as recorder:
        moe(x)
    trace = recorder.trace(torch.zeros(2, 6, dtype=torch.long))
    assert trace.ids.shape == (12, 1, 4)
    # a token's combine weights over all slots sum to one, so over the experts too
    torch.testing.assert_close(trace.weights.sum(-1), torch.ones(12, 1))
    assert "Soft MoE" in trace.recording["routing"]


def _model(**moe):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64, d_model=32, num_layers=3, num_heads=2, num_kv_heads=1, max_seq_len=64,
        moe=MoEConfig(d_model=32, d_hidden=16, num_experts=4, top_k=2, **moe),
    )  # fmt: skip
    return Transformer(cfg).eval()


def test_a_generation_records_what_one_forward_over_its_tokens_routes():
    model = _model()
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    trace = record_generation(model, prompts, max_new_tokens=6)
    assert trace.offsets.tolist() == [0, 11, 19, 28]
    assert trace.positions[:11].tolist() == list(range(11))
    assert trace.routed.reshape(-1).tolist() == ([True] * 10 + [False]) + ([True] * 7 + [False]) + (
        [True] * 8 + [False]
    )
    forward = record_forward(model, [s.tolist() for s in trace.sequences()])
    routed = trace.routed
    assert torch.equal(trace.ids[routed], forward.ids[routed])
    torch.testing.assert_close(trace.weights[routed], forward.weights[routed])
    # the generated tokens are the generation's own
    out = generate(model, prompts, max_new_tokens=6, temperature=0.0)
    prompt_BT, _ = left_padded(prompts)
    assert trace.sequences()[1].tolist() == [6, 7, *out.tokens_BN[1].tolist()]
    assert prompt_BT.shape == (3, 5)


def test_padding_and_batch_layouts_record_the_same_sequences():
    model = _model()
    sequences = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    right = record_forward(model, sequences, padding="right")
    left = record_forward(model, sequences, padding="left")
    alone = record_forward(model, sequences, padding="none")
    for other in (left, alone):
        assert torch.equal(right.tokens, other.tokens) and torch.equal(right.offsets, other.offsets)
        assert torch.equal(right.ids, other.ids)
    assert right.recording["batch"] == "3 sequences, right-padded"
