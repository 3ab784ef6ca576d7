"""Routing replay: a model's own trace changes nothing (outputs and every gradient, bit for
bit in fp32, for every token-choice router, dropless and with a capacity); forced experts
get the router's weights as a hand-written reference computes them, with their gradient;
"ids+weights" takes the trace's weights as constants; routers that cannot replay and
traces of another model are refused with one error naming the field.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from builders import TOKEN_CHOICE, record_layer
from helpers import make_moe, tokens

from moekit import MoEConfig
from moekit.models import Transformer
from moekit.models.transformer import ModelConfig
from moekit.traces import record_routing, replay_routing, replay_rows
from moekit.traces.replay import LayerReplay

pytestmark = pytest.mark.usefixtures("one_thread")

CAPACITY = {
    "drop": dict(capacity_factor=0.75, overflow="drop"),
    "reroute": dict(capacity_factor=0.75, overflow="reroute"),
    "priority": dict(capacity_factor=0.75, overflow="reroute", batch_priority=True),
}
LOSSES = dict(balance_loss_coef=0.1, z_loss_coef=0.01, importance_loss_coef=0.1, load_loss_coef=0.1)


def _run(moe, x, seed):
    """Forward (seeded, so noisy / jittered / gshard routers draw the same) and backward;
    returns the output, the aux loss, the input's and every parameter's gradient."""
    moe.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = moe(x)
    (out.hidden.square().sum() + out.aux_loss).backward()
    grads = {name: p.grad.clone() for name, p in moe.named_parameters() if p.grad is not None}
    return out.hidden.detach(), out.aux_loss.detach(), x.grad, grads


def _assert_same(first, second):
    hidden, aux, x_grad, grads = first
    assert torch.equal(hidden, second[0])
    assert torch.equal(aux, second[1])
    assert torch.equal(x_grad, second[2])
    assert grads.keys() == second[3].keys() and grads
    for name in grads:
        assert torch.equal(grads[name], second[3][name]), name


CASES = {name: settings for name, settings in TOKEN_CHOICE.items()}
CASES |= {f"softmax_topk_{n}": dict(router="softmax_topk", **s) for n, s in CAPACITY.items()}
CASES |= {f"sigmoid_topk_{n}": dict(TOKEN_CHOICE["sigmoid_topk"], **s) for n, s in CAPACITY.items()}
CASES["dense"] = dict(router="dense")


@pytest.mark.parametrize("mode", ["ids", "ids+weights"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_replaying_the_layers_own_trace_changes_nothing(case, train, mode):
    moe = make_moe(**(CASES[case] | LOSSES))
    moe.train(train)
    x = tokens(24)
    plain = _run(moe, x, seed=3)
    trace = record_layer(moe, x, seed=3)
    with replay_rows(moe, trace, torch.arange(24), mode):
        replayed = _run(moe, x, seed=3)
    if mode == "ids":
        _assert_same(plain, replayed)
    else:  # the trace's weights are constants: same forward, the gate learns from aux only
        assert torch.equal(plain[0], replayed[0]) and torch.equal(plain[1], replayed[1])


@pytest.mark.parametrize("case", sorted(TOKEN_CHOICE))
def test_replay_weights_of_the_routers_own_ids_are_its_weights(case):
    """Each router's replay_weights, given its own choice, recomputes its own weights bit
    for bit (the formula, not only the where() that prefers them)."""
    moe = make_moe(**TOKEN_CHOICE[case])
    # sparsemixer's training weights carry a random per-token factor (GRIN's midpoint
    # estimator: 1 or 1/3) that ids cannot reproduce; its replay weights are the
    # evaluation ones, which it reproduces in eval mode
    moe.train(not case.startswith("sparsemixer"))
    torch.manual_seed(0)
    decision = moe.router.route(tokens(32), None)
    weights = moe.router.replay_weights(decision, decision.ids_TK, decision.valid_TK)
    assert torch.equal(weights, decision.weights_TK)


def test_the_model_replays_its_own_trace_bit_for_bit():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64, d_model=32, num_layers=3, num_heads=2, num_kv_heads=1, max_seq_len=32,
        moe=MoEConfig(d_model=32, d_hidden=16, num_experts=4, top_k=2, balance_loss_coef=0.1,
                      z_loss_coef=0.01),
    )  # fmt: skip
    model = Transformer(cfg).train()
    tokens_BN = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(2))
    real_BN = torch.ones(3, 12, dtype=torch.bool)
    real_BN[1, 9:] = False  # one shorter sequence, right-padded (with id 0, as the replay's)
    tokens_BN[1, 9:] = 0
    targets_BN = tokens_BN.masked_fill(~real_BN, -100)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(tokens_BN, targets=targets_BN, attention_mask_BT=real_BN)
        (out.loss + out.aux_loss).backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits, grads = step()
    with record_routing(model) as recorder:
        model(tokens_BN, attention_mask_BT=real_BN)
    trace = recorder.trace(tokens_BN, real_BN)
    assert trace.num_sequences == 3 and trace.num_tokens == 33
    with replay_routing(model, trace, "ids") as batch:
        assert torch.equal(batch.attention_mask_BN, real_BN)
        assert torch.equal(batch.tokens_BN, tokens_BN)
        replayed_logits, replayed_grads = step()
    assert torch.equal(logits[real_BN], replayed_logits[real_BN])
    for name, grad in grads.items():
        assert torch.equal(grad, replayed_grads[name]), name


def test_forced_experts_get_the_reference_weights_and_gradients():
    """Mixtral's rule by hand in float64: w = softmax(x W^T) at the forced ids, renormalised;
    y = sum_k w_k expert_k(x). The replayed layer's output and the gate's gradient match."""
    moe = make_moe(num_experts=4, top_k=2)
    x = tokens(10)
    decision = moe.router.route(x, None)
    forced = decision.ids_TK.flip(1).roll(1, dims=1)
    forced[:, 1] = (forced[:, 0] + 1 + torch.arange(10) % 3) % 4  # never the first again
    hook = LayerReplay("moe", "ids", forced, torch.ones(10, dtype=torch.bool))
    moe.routing_hook = hook
    out = moe(x)
    out.hidden.square().sum().backward()
    moe.routing_hook = None
    assert not torch.equal(forced, decision.ids_TK)  # the case forces other experts

    ref = copy.deepcopy(moe).double()
    ref.zero_grad(set_to_none=True)
    x64 = x.double()
    probs = F.softmax(x64 @ ref.router.weight.t(), dim=-1)
    picked = probs.gather(1, forced)
    weights = picked / picked.sum(dim=1, keepdim=True)
    y = torch.zeros_like(x64)
    for t in range(10):
        for k in range(2):
            e = int(forced[t, k])
            h = x64[t] @ ref.experts.w_up[e]
            gate, up = h.chunk(2)
            y[t] += weights[t, k] * ((F.silu(gate) * up) @ ref.experts.w_down[e])
    y.square().sum().backward()
    torch.testing.assert_close(out.hidden.double(), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        moe.router.weight.grad.double(), ref.router.weight.grad, rtol=1e-4, atol=1e-5
    )
    assert moe.router.weight.grad.abs().sum() > 0


def test_ids_and_weights_mode_takes_the_traces_weights_as_constants():
    moe = make_moe(num_experts=4, top_k=2)
    x = tokens(8)
    ids = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]] * 2)
    weights = torch.full((8, 2), 0.25)
    moe.routing_hook = LayerReplay(
        "moe", "ids+weights", ids, torch.ones(8, dtype=torch.bool), None, weights
    )
    out = moe(x)
    out.hidden.sum().backward()
    moe.routing_hook = None
    assert moe.router.weight.grad is None or not moe.router.weight.grad.any()
    # the same experts, weights 0.25 each: the output is a quarter of the experts' sum
    expected = torch.zeros_like(x)
    for t in range(8):
        for e in ids[t]:
            counts = torch.zeros(4, dtype=torch.long)
            counts[e] = 1
            expected[t] += 0.25 * moe.experts.forward_reference(x[t : t + 1], counts)[0]
    torch.testing.assert_close(out.hidden, expected, rtol=1e-5, atol=1e-6)


def test_tokens_the_trace_did_not_route_keep_the_routers_choice():
    moe = make_moe(num_experts=4, top_k=2)
    x = tokens(6)
    own = moe.router.route(x, None)
    forced = (own.ids_TK + 1) % 4
    use = torch.tensor([True, False, True, False, False, True])
    moe.routing_hook = LayerReplay("moe", "ids", forced, use)
    used = moe.route(x, None)
    moe.routing_hook = None
    assert torch.equal(used.ids_TK[use], forced[use])
    assert torch.equal(used.ids_TK[~use], own.ids_TK[~use])
    assert torch.equal(used.weights_TK[~use], own.weights_TK[~use])


@pytest.mark.parametrize("capacity", [{}, CAPACITY["reroute"]])
def test_replayed_layer_is_one_graph_and_equals_eager(capacity):
    """The hook reads no tensor on the host: fullgraph compiles forward and backward."""
    torch._dynamo.reset()
    moe = make_moe(d_model=16, d_hidden=16, num_experts=4, top_k=2, **capacity)
    x = tokens(24, d_model=16)
    ids = (moe.router.route(x, None).ids_TK + 1) % 4
    moe.routing_hook = LayerReplay("moe", "ids", ids, torch.arange(24) % 3 > 0)
    eager = _run(moe, x, seed=0)
    compiled = _run(torch.compile(moe, fullgraph=True, backend="aot_eager"), x, seed=0)
    moe.routing_hook = None
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[2], eager[2])
    grads = {name.removeprefix("_orig_mod."): g for name, g in compiled[3].items()}
    for name, grad in eager[3].items():
        torch.testing.assert_close(grads[name], grad)


@pytest.mark.parametrize("router", ["expert_choice", "soft"])
def test_routers_that_cannot_replay_are_refused(router):
    moe = make_moe(router=router)
    trace = record_layer(make_moe(), tokens(8), seed=0)
    with pytest.raises(ValueError, match=f"router: layer moe uses the {router} router"):
        with replay_rows(moe, trace, torch.arange(8)):
            pass


def test_the_forward_must_route_the_replayed_tokens():
    moe = make_moe()
    trace = record_layer(moe, tokens(8), seed=0)
    with pytest.raises(ValueError, match="the forward routes 6 tokens, the replayed batch holds 8"):
        with replay_rows(moe, trace, torch.arange(8)):
            moe(tokens(6))


def test_bad_traces_are_refused_naming_the_field():
    moe = make_moe(num_experts=4, top_k=2)
    trace = record_layer(moe, tokens(8), seed=0)
    rows = torch.arange(8)
    other_k = make_moe(num_experts=4, top_k=1)
    with pytest.raises(ValueError, match="model.top_k: the trace has 2, the model has 1"):
        with replay_rows(other_k, trace, rows):
            pass
    other_e = make_moe(num_experts=6, top_k=2)
    with pytest.raises(ValueError, match="model.num_experts: the trace has 4, the model has 6"):
        with replay_rows(other_e, trace, rows):
            pass
    other_d = make_moe(d_model=12, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="model.d_model"):
        with replay_rows(other_d, trace, rows):
            pass
    no_weights = dataclasses.replace(trace, weights=None)
    with pytest.raises(ValueError, match="weights: the trace holds no combine weights"):
        with replay_rows(moe, no_weights, rows, "ids+weights"):
            pass
    with pytest.raises(ValueError, match="mode must be one of"):
        with replay_rows(moe, trace, rows, "weights"):
            pass


def test_unused_slots_with_filler_ids_replay_as_unused():
    """top_p: a trace's unused slot may hold an id out of range; it stays unused."""
    moe = make_moe(router="top_p", num_experts=6, top_k=3, top_p=0.6)
    x = tokens(8)
    own = moe.route(x, None)
    assert not own.valid_TK.all()  # the case has unused slots
    filler = own.ids_TK.masked_fill(~own.valid_TK, 99)
    use = torch.ones(8, dtype=torch.bool)
    moe.routing_hook = LayerReplay("moe", "ids", filler, use, own.valid_TK, num_experts=6)
    replayed = moe(x).hidden
    moe.routing_hook = None
    torch.testing.assert_close(replayed, moe(x).hidden, rtol=1e-6, atol=1e-7)


def test_a_trace_of_another_model_is_refused_naming_the_field():
    def model(num_layers=2, vocab_size=64, first_dense_layers=0):
        torch.manual_seed(0)
        return Transformer(
            ModelConfig(
                vocab_size=vocab_size, d_model=16, num_layers=num_layers, num_heads=2,
                max_seq_len=16, first_dense_layers=first_dense_layers,
                moe=MoEConfig(d_model=16, d_hidden=16, num_experts=4, top_k=2),
            )
        )  # fmt: skip

    base = model()
    with record_routing(base) as recorder:
        base(torch.zeros(1, 4, dtype=torch.long))
    trace = recorder.trace(torch.zeros(1, 4, dtype=torch.long))
    for other, message in [
        (model(num_layers=3), "model.layers: the trace has 2 MoE layers, the model has 3"),
        (
            model(num_layers=3, first_dense_layers=1),
            "model.num_blocks: the trace has 2, the model has 3",
        ),
        (model(vocab_size=80), "model.vocab_size: the trace has 64, the model has 80"),
    ]:
        with pytest.raises(ValueError, match=message):
            with replay_routing(other, trace):
                pass
