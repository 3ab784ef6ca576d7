"""Recording a transformers model's routing by hooks on its routers, for every family
moekit converts, and replaying it in moekit.

Oracles: the trace's ids are the ones the converted moekit model picks for the same
tokens (both fp32); replaying the trace's ids and weights in the converted model gives
transformers' logits; a bf16 trace replayed in the fp32 moekit model makes moekit take
transformers' bf16 experts at every token, including the tokens where its own fp32
routing picks others.
"""

from __future__ import annotations

import pytest
import torch
from builders import VOCAB, hf_model

from moekit.interop import ARCHITECTURES, load_hf
from moekit.traces import record_routing, replay_routing

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

BUILDERS = tuple(ARCHITECTURES)  # every registered family, tests/builders.py
TOKENS_BN = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(5))
# bf16 rounding of these logits (and, replaying ids only, of the weights moekit recomputes:
# sparsemixer's threshold mask can move); a routing flip costs more somewhere
BF16_ERROR = 0.1


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{family: (transformers model, the moekit model converted from its folder)}."""
    built = {}
    for family in BUILDERS:
        model = hf_model(family)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        built[family] = (model, load_hf(folder))
    return built


def _record(model, **kwargs):
    with record_routing(model) as recorder, torch.no_grad():
        logits = model(TOKENS_BN, **kwargs).logits
    return recorder.trace(TOKENS_BN), logits.float()


def _set_agreement(a, b) -> float:
    same = a.ids.long().sort(dim=-1).values == b.ids.long().sort(dim=-1).values
    return float(same.all(dim=-1).float().mean())


@pytest.mark.parametrize("family", BUILDERS)
def test_recording_a_transformers_model_gives_each_routers_choice(models, family):
    hf_model, ours = models[family]
    trace, _ = _record(hf_model)
    own, _ = _record(ours)
    config = hf_model.config
    assert trace.model.architecture == f"transformers:{config.model_type}"
    assert trace.model.blocks == ours.config.moe_layers
    assert trace.model.mismatch(own.model) is None  # the converted model has the same shape
    T, L, K = trace.ids.shape
    assert (T, L, K) == (48, len(trace.model.blocks), config.num_experts_per_tok)
    assert trace.logits.shape == (T, L, trace.model.num_experts)
    assert trace.recording["engine"] == "transformers" and trace.recording["dtype"] == "float32"
    # Two engines in fp32 pick the same experts (a flip needs a margin below ~1e-6).
    assert _set_agreement(trace, own) >= 0.98
    # The recorded weights are the ones the family mixes with: equal to moekit's.
    agree = (trace.ids.long().sort(-1).values == own.ids.long().sort(-1).values).all(-1)
    hf_w = trace.weights.gather(-1, trace.ids.long().argsort(-1))[agree]
    own_w = own.weights.gather(-1, own.ids.long().argsort(-1))[agree]
    torch.testing.assert_close(hf_w, own_w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", BUILDERS)
def test_replaying_transformers_trace_gives_transformers_logits(models, family):
    hf_model, ours = models[family]
    trace, hf_logits = _record(hf_model)
    with replay_routing(ours, trace, "ids+weights") as batch, torch.no_grad():
        logits = ours(batch.tokens_BN).logits
    torch.testing.assert_close(logits, hf_logits, atol=1e-4, rtol=0)


def test_a_bf16_trace_makes_moekit_take_transformers_experts_where_fp32_flips(models):
    """bf16 transformers against fp32 moekit: without replay some tokens take other
    experts; replaying the bf16 trace (either mode) makes every token take bf16's."""
    flipped_somewhere = False
    for family in BUILDERS:
        hf_model, ours = models[family]
        bf16 = hf_model.to(torch.bfloat16)
        try:
            trace, hf_logits = _record(bf16)
        finally:
            hf_model.float()
        assert trace.recording["dtype"] == "bfloat16"
        own, own_logits = _record(ours)
        agree_TL = (trace.ids.sort(-1).values == own.ids.sort(-1).values).all(-1)
        flips_B = (~agree_TL).any(-1).reshape(3, 16).any(dim=1)
        for mode in ("ids", "ids+weights"):
            with replay_routing(ours, trace, mode) as batch:
                with record_routing(ours) as recorder, torch.no_grad():
                    logits = ours(batch.tokens_BN).logits
            used = recorder.trace(batch.tokens_BN)
            assert torch.equal(used.ids, trace.ids.to(torch.int32)), (family, mode)
            if mode == "ids+weights":
                torch.testing.assert_close(used.weights, trace.weights, atol=0, rtol=0)
            # bf16's logits up to bf16's own rounding, everywhere
            error_BN = (logits - hf_logits).abs().amax(dim=-1)
            assert float(error_BN.max()) < BF16_ERROR, (family, mode)
            if flips_B.any():  # where fp32 routing flips, without replay the gap can exceed it
                own_error = (own_logits - hf_logits).abs().amax(dim=-1)[flips_B]
                flipped_somewhere |= float(own_error.max()) > BF16_ERROR
    assert flipped_somewhere  # the case is one where fp32 routing flips and it matters


def test_generate_in_transformers_is_recorded_per_sequence(models):
    hf_model, ours = models["mixtral"]
    prompt = TOKENS_BN[:2, :5]
    with record_routing(hf_model, mode="generate") as recorder, torch.no_grad():
        out = hf_model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    trace = recorder.trace(out)
    assert trace.recording["mode"] == "generate"
    assert trace.offsets.tolist() == [0, 9, 18]
    assert trace.routed.tolist() == ([True] * 8 + [False]) * 2  # the last token is never fed
    full, _ = _record(hf_model.float())
    # the cached decode routes each token as the full forward does (fp32, same tokens)
    with record_routing(hf_model) as again, torch.no_grad():
        hf_model(out)
    forward = again.trace(out)
    routed = trace.routed
    same = trace.ids[routed].sort(-1).values == forward.ids[routed].sort(-1).values
    assert float(same.all(-1).float().mean()) >= 0.98
    assert full.num_tokens == 48
