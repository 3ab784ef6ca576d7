"""Sparse upcycling: at the moment of upcycling the MoE computes the dense model's function
(for the routers whose weights sum to one), and settings that break this say so."""

from __future__ import annotations

import warnings

import pytest
import torch

from moekit.models import ModelConfig, Transformer
from moekit.surgery import upcycle, upcycle_changes_function, upcycle_config

pytestmark = pytest.mark.usefixtures("one_thread")


def dense_model(seed: int = 0, activation: str = "swiglu") -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=64, d_model=16, num_layers=3, num_heads=2, max_seq_len=16, d_hidden=24,
        activation=activation,
    )  # fmt: skip
    model = Transformer(config)
    # Trained-looking weights: norms away from 1 so that a copy error would show.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model.eval()


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(seed))


def build(dense: Transformer, **options) -> Transformer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return upcycle(dense, upcycle_config(dense.config, **options), seed=3)


EQUAL = [
    dict(num_experts=4, top_k=2, router="softmax_topk"),
    dict(num_experts=8, top_k=1, router="softmax_topk"),
    dict(num_experts=4, top_k=2, router="noisy_topk"),
    dict(num_experts=4, top_k=2, router="sigmoid_topk"),
    dict(num_experts=4, top_k=3, router="top_p", top_p=0.6),
    dict(num_experts=3, router="dense"),
    dict(num_experts=4, top_k=2, router="softmax_topk", moe_every=2),
    dict(num_experts=4, top_k=2, router="softmax_topk", first_dense_layers=1),
]


@pytest.mark.parametrize("options", EQUAL, ids=lambda o: "-".join(map(str, o.values())))
def test_upcycled_logits_equal_the_dense_model(options):
    dense = dense_model()
    moe = build(dense, **options).eval()
    assert upcycle_changes_function(moe.config.moe) is None
    torch.testing.assert_close(moe(batch()).logits, dense(batch()).logits, rtol=1e-5, atol=1e-5)


def test_noisy_router_keeps_equality_in_training_mode():
    # Any choice among identical experts, with weights summing to one, gives the FFN.
    dense = dense_model()
    moe = build(dense, num_experts=4, top_k=2, router="noisy_topk")
    with torch.no_grad():
        for layer in moe.config.moe_layers:
            moe.layers[layer].ffn.router.noise_weight.normal_(0, 1.0)
    torch.testing.assert_close(
        moe.train()(batch()).logits, dense(batch()).logits, rtol=1e-5, atol=1e-5
    )


def test_gelu_experts_copy_a_non_gated_ffn():
    dense = dense_model(activation="gelu")
    moe = build(dense, num_experts=4, top_k=2).eval()
    torch.testing.assert_close(moe(batch()).logits, dense(batch()).logits, rtol=1e-5, atol=1e-5)


CHANGED = [
    (dict(num_experts=4, top_k=1, router="switch"), "top-1 probability"),
    (dict(num_experts=4, top_k=2, renormalize=False), "without renormalize"),
    (dict(num_experts=4, top_k=2, router="sigmoid_topk", routed_scaling=2.5), "routed_scaling"),
]


@pytest.mark.parametrize("options,reason", CHANGED, ids=lambda x: str(x)[:30])
def test_settings_that_scale_the_output_are_named_and_do_change_it(options, reason):
    dense = dense_model()
    moe = build(dense, **options).eval()
    assert reason in upcycle_changes_function(moe.config.moe)
    assert not torch.allclose(moe(batch()).logits, dense(batch()).logits, atol=1e-3)


def test_capacity_drops_and_non_token_choice_routers_are_named():
    for options in (
        dict(capacity_factor=0.5),
        dict(router="expert_choice"),
        dict(router="soft"),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            config = upcycle_config(dense_model().config, num_experts=4, **options)
        assert upcycle_changes_function(config.moe) is not None


def test_experts_are_copies_and_routers_are_fresh_small_random():
    dense = dense_model()
    moe = build(dense, num_experts=4, top_k=2)
    ffn, layer = moe.layers[1].ffn, dense.layers[1].ffn
    for e in range(4):
        assert torch.equal(ffn.experts.w_up[e], layer.up.weight.t())
        assert torch.equal(ffn.experts.w_down[e], layer.down.weight.t())
    router = ffn.router.weight
    assert router.std().item() == pytest.approx(moe.config.init_std, rel=0.3)
    assert torch.equal(moe.tok_embed.weight, dense.tok_embed.weight)
    assert torch.equal(moe.layers[2].attn.wq.weight, dense.layers[2].attn.wq.weight)


def test_after_training_steps_the_experts_diverge():
    dense = dense_model()
    moe = build(dense, num_experts=4, top_k=2).train()
    optimizer = torch.optim.AdamW(moe.parameters(), lr=1e-2)
    for step in range(3):
        out = moe(batch(step), batch(step + 10))
        (out.loss + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    w_up = moe.layers[0].ffn.experts.w_up
    assert not torch.equal(w_up[0], w_up[1])


def test_bad_inputs_raise_value_errors_naming_them():
    dense = dense_model()
    moe_config = upcycle_config(dense.config, num_experts=4)
    with pytest.raises(ValueError, match="already has MoE layers"):
        upcycle_config(moe_config, num_experts=4)
    with pytest.raises(ValueError, match="must be <= num_experts"):
        upcycle_config(dense.config, num_experts=2, top_k=3)
    other = upcycle_config(dense_model(activation="gelu").config, num_experts=4)
    with pytest.raises(ValueError, match="must match the dense FFN"):
        upcycle(dense, other)
