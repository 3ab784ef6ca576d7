"""torch.compile: the MoE layer traces into one graph for every router and capacity mode,
and the compiled layer equals the eager one (forward, aux loss, every gradient).

The router matrix compiles with the "aot_eager" backend (dynamo's trace and AOTAutograd's
joint graph, no code generation: seconds, not minutes); one case runs through inductor.
"""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.config import ROUTERS

# Routers whose training forward draws random numbers (compiled RNG differs from eager).
RANDOM_IN_TRAINING = ("noisy_topk", "switch", "gshard", "sparsemixer")
CASES = [dict(router=r) for r in ROUTERS] + [
    dict(router="softmax_topk", capacity_factor=1.0, overflow="drop"),
    dict(router="softmax_topk", capacity_factor=1.0, overflow="reroute"),
    dict(router="top_p", capacity_factor=0.75, overflow="reroute", batch_priority=True),
    dict(
        router="sigmoid_topk", num_groups=2, topk_groups=1, capacity_factor=1.0, overflow="reroute"
    ),
    dict(router="softmax_topk", capacity_factor=1.0, batch_priority=True, num_shared_experts=1),
    dict(router="softmax_topk", num_groups=2, topk_groups=1, routed_scaling=1.5, renormalize=False),
    dict(router="softmax_topk", router_bias=True, expert_bias=True, activation="swiglu_clamped"),
    dict(router="sigmoid_topk", router_bias=True, expert_bias=True, capacity_factor=1.0),
]


def _layer(case: dict) -> MoE:
    torch.manual_seed(0)
    kw = dict(
        d_model=16,
        d_hidden=16,
        num_experts=4,
        top_k=1 if case["router"] == "switch" else 2,
        z_loss_coef=1e-3,
        importance_loss_coef=1e-2,
    )
    kw.update(case)
    return MoE(MoEConfig(**kw))


def _run(layer, x, grad):
    out = layer(x)
    torch.autograd.backward([out.hidden, out.aux_loss], [grad, torch.ones_like(out.aux_loss)])
    grads = {
        name.removeprefix("_orig_mod."): p.grad.clone()
        for name, p in layer.named_parameters()
        if p.grad is not None
    }
    layer.zero_grad(set_to_none=True)
    return out, grads, x.grad.clone()


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_compiled_layer_is_one_graph_and_equals_eager(case):
    torch._dynamo.reset()
    layer = _layer(case)
    if case["router"] in RANDOM_IN_TRAINING:
        layer.eval()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 12, 16, requires_grad=True)
    grad = torch.randn(2, 12, 16)

    eager_out, eager_grads, eager_x = _run(layer, x, grad)
    x.grad = None
    comp_out, comp_grads, comp_x = _run(compiled, x, grad)

    torch.testing.assert_close(comp_out.hidden, eager_out.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(comp_out.aux_loss, eager_out.aux_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(comp_x, eager_x, atol=1e-5, rtol=1e-5)
    assert comp_grads.keys() == eager_grads.keys()
    for name in eager_grads:
        torch.testing.assert_close(
            comp_grads[name], eager_grads[name], atol=1e-5, rtol=1e-5, msg=name
        )
    assert torch.equal(comp_out.stats.tokens_per_expert, eager_out.stats.tokens_per_expert)
    torch.testing.assert_close(comp_out.stats.dropped_fraction, eager_out.stats.dropped_fraction)


@pytest.mark.parametrize("router", RANDOM_IN_TRAINING)
def test_random_routers_compile_whole_in_training(router):
    torch._dynamo.reset()
    layer = _layer(dict(router=router)).train()
    out = torch.compile(layer, fullgraph=True, backend="aot_eager")(torch.randn(2, 12, 16))
    (out.hidden.sum() + out.aux_loss).backward()
    assert layer.experts.w_up.grad is not None


def test_explain_finds_no_graph_break_in_the_layer():
    torch._dynamo.reset()
    layer = _layer(dict(router="softmax_topk", capacity_factor=1.0, overflow="reroute"))
    explanation = torch._dynamo.explain(layer)(torch.randn(24, 16))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_inductor_compiled_layer_equals_eager():
    """Code generation too (the default backend), for the common dropless top-k case."""
    torch._dynamo.reset()
    layer = _layer(dict(router="softmax_topk"))
    x = torch.randn(2, 12, 16, requires_grad=True)
    grad = torch.randn(2, 12, 16)
    eager_out, eager_grads, eager_x = _run(layer, x, grad)
    x.grad = None
    comp_out, comp_grads, comp_x = _run(torch.compile(layer, fullgraph=True), x, grad)
    torch.testing.assert_close(comp_out.hidden, eager_out.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(comp_x, eager_x, atol=1e-5, rtol=1e-5)
    for name in eager_grads:
        torch.testing.assert_close(
            comp_grads[name], eager_grads[name], atol=1e-5, rtol=1e-5, msg=name
        )


@pytest.mark.parametrize("mtp_depth", [0, 1], ids=["main", "mtp"])
def test_transformer_training_forward_has_no_graph_break(mtp_depth):
    """The whole language model (attention, MoE layers, loss; with mtp_depth 1 the
    multi-token-prediction module and its loss too) is one graph."""
    import dataclasses

    from moekit.models.presets import tiny
    from moekit.models.transformer import Transformer

    torch._dynamo.reset()
    base = tiny()
    config = dataclasses.replace(
        base,
        vocab_size=256,
        num_layers=2,
        max_seq_len=32,
        moe=dataclasses.replace(base.moe, capacity_factor=1.25),
        mtp_depth=mtp_depth,
    )
    model = Transformer(config)
    tokens = torch.randint(0, 256, (2, 16))

    def loss(tokens):
        out = model(tokens, tokens)
        return out.loss + out.aux_loss + out.mtp_loss

    explanation = torch._dynamo.explain(loss)(tokens)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
