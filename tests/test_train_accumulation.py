"""Gradient accumulation and the balance scopes (train/accumulation.py, losses.py "Scopes").

Oracles, fp32 on one process:
- grad_accum N over the batch equals one pass over it (loss and every gradient) for
  dropless token choice with the global and sequence scopes, and with IGNORE targets;
- the micro_batch scope differs by exactly the mean of the micro-batches' own losses;
- with capacity (and expert choice) a step equals the micro-batches run one by one;
- the sequence scope equals a hand-written DeepSeek-V3 formula;
- the global scope's reference is the whole step's counts and means.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from builders import ROUTER_SETTINGS, lm_config, seeded_lm
from helpers import lm_batch, make_moe, tokens

from moekit import MoEConfig, losses
from moekit.models import Transformer
from moekit.train.accumulation import (
    count_step_routing,
    forward_backward,
    global_scope_layers,
    micro_batches,
)
from moekit.train.config import TrainConfig, model_config_from_dict, model_config_to_dict
from moekit.train.run import LOCAL_RUN


def step(model: Transformer, grad_accum: int, data=None):
    """One step's losses and gradients (the model's grads are cleared first)."""
    model.zero_grad(set_to_none=True)
    batches = micro_batches(data or lm_batch(), grad_accum)
    out = forward_backward(model, model, batches, LOCAL_RUN, _no_autocast)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


def assert_same_step(a, b, atol=1e-6):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=0, atol=atol)
    torch.testing.assert_close(out_a.aux_loss, out_b.aux_loss, rtol=0, atol=atol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=atol, msg=name)


ROUTERS = ROUTER_SETTINGS
ROWS, LENGTH = 8, 6
LOSSES = dict(balance_loss_coef=0.1, importance_loss_coef=0.05, z_loss_coef=0.01)


@pytest.mark.parametrize("scope", ["global", "sequence"])
@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("grad_accum", [2, 4])
def test_accumulation_equals_one_pass_dropless(router, scope, grad_accum):
    config = lm_config(**ROUTERS[router], **LOSSES, balance_scope=scope)
    whole = step(seeded_lm(config), 1)
    accumulated = step(seeded_lm(config), grad_accum)
    assert_same_step(whole, accumulated)
    assert whole[0].aux_loss > 0


def test_ignored_targets_are_weighted_by_their_count():
    """Micro-batches with different numbers of counted targets: the step's loss is still
    the mean over all counted targets (each micro-batch weighted by its share)."""
    config = lm_config(**LOSSES, balance_scope="global")
    data = lm_batch(ignore=True)
    assert_same_step(step(seeded_lm(config), 1, data), step(seeded_lm(config), 2, data))


def test_one_micro_batch_is_the_plain_step_bit_for_bit():
    config = lm_config(**LOSSES)
    data = lm_batch()
    _, grads = step(seeded_lm(config), 1, data)
    plain = seeded_lm(config)
    plain_out = plain(*data)
    (plain_out.loss + plain_out.aux_loss + plain_out.mtp_loss).backward()
    for name, p in plain.named_parameters():
        assert torch.equal(grads[name], p.grad), name


def test_micro_batch_scope_balances_each_micro_batch():
    """The default scope counts each forward's tokens: with 2 micro-batches the step's
    balance loss is the mean of the two halves' own losses, not the whole batch's."""
    config = lm_config(balance_loss_coef=0.1)
    inputs, targets = lm_batch()
    whole, _ = step(seeded_lm(config), 1, (inputs, targets))
    accumulated, _ = step(seeded_lm(config), 2, (inputs, targets))
    model = seeded_lm(config)
    with torch.no_grad():
        halves = [
            model(inputs[rows], targets[rows]).aux_loss for rows in (slice(0, 4), slice(4, 8))
        ]
    torch.testing.assert_close(accumulated.aux_loss, torch.stack(halves).mean(), rtol=0, atol=1e-6)
    assert abs(accumulated.aux_loss - whole.aux_loss) > 1e-5  # the scopes really differ here


@pytest.mark.parametrize(
    "settings",
    [
        dict(capacity_factor=0.5),
        dict(capacity_factor=0.75, overflow="reroute", batch_priority=True),
        dict(router="expert_choice", top_k=2, balance_loss_coef=0.0),
    ],
    ids=["drop", "reroute-priority", "expert-choice"],
)
def test_capacity_is_decided_per_micro_batch(settings):
    """With capacity, which tokens drop is decided per forward: the accumulated step equals
    the micro-batches run one by one (each weighted 1/2), and differs from one pass."""
    config = lm_config(**settings)
    inputs, targets = lm_batch()
    accumulated = step(seeded_lm(config), 2, (inputs, targets))
    separate = seeded_lm(config)
    for rows in (slice(0, 4), slice(4, 8)):
        out = separate(inputs[rows], targets[rows])
        ((out.loss + out.aux_loss) / 2).backward()
    for name, p in separate.named_parameters():
        torch.testing.assert_close(accumulated[1][name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
    whole = step(seeded_lm(config), 1, (inputs, targets))
    assert any(
        not torch.allclose(whole[1][name], accumulated[1][name], atol=1e-5) for name in whole[1]
    )


def deepseek_sequence_loss(probs_BTE, ids_BTK):
    """DeepSeek-V3 eq. 17-20, written out per sequence with loops."""
    B, T, E = probs_BTE.shape
    K = ids_BTK.shape[-1]
    total = 0.0
    for b in range(B):
        loss = 0.0
        for i in range(E):
            f_i = E / (K * T) * sum(int((ids_BTK[b, t] == i).any()) for t in range(T))
            p_i = probs_BTE[b, :, i].mean()
            loss = loss + f_i * p_i
        total = total + loss
    return total / B


def test_sequence_scope_is_deepseek_v3_formula():
    moe = make_moe(router="sigmoid_topk", balance_scope="sequence", num_experts=6, top_k=2)
    x = tokens(3 * 5).reshape(3, 5, 8)
    routing = moe.router.route(x, None)
    parts = routing.loss_parts(torch.zeros(6), "sequence", 3)
    scores = routing.logits_TE.sigmoid()
    probs = (scores / scores.sum(-1, keepdim=True)).reshape(3, 5, 6)
    expected = deepseek_sequence_loss(probs, routing.ids_TK.reshape(3, 5, 2))
    torch.testing.assert_close(parts.balance, expected, rtol=1e-6, atol=1e-7)
    assert moe(x).stats.balance_scope == "sequence"


def test_sequence_scope_of_one_sequence_is_the_micro_batch_loss():
    moe = make_moe(balance_scope="sequence", importance_loss_coef=0.1)
    x = tokens(12)
    routing = moe.router.route(x, None)
    counts = losses.expert_counts(routing.ids_TK, 4)
    one = routing.loss_parts(counts, "sequence", 1)
    micro = routing.loss_parts(counts, "micro_batch", 1)
    for name in ("balance", "importance", "load"):
        torch.testing.assert_close(getattr(one, name), getattr(micro, name), rtol=1e-6, atol=1e-7)


def test_global_reference_holds_the_whole_steps_counts_and_means():
    config = lm_config(**LOSSES, balance_scope="global")
    model, (inputs, targets) = seeded_lm(config), lm_batch()
    layers = global_scope_layers(model)
    count_step_routing(
        layers, model, model, micro_batches((inputs, targets), 4), LOCAL_RUN, _no_autocast
    )
    with torch.no_grad():
        out = model(inputs, targets)
    for layer, stats in zip(layers, [s for s in out.stats if s is not None], strict=True):
        fraction, probs, _, load = layer.balance_reference
        counts = stats.tokens_per_expert.float()  # dropless: every assignment kept
        torch.testing.assert_close(fraction, counts / counts.sum(), rtol=0, atol=1e-7)
        torch.testing.assert_close(load, counts / inputs.numel(), rtol=0, atol=1e-7)
        assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert not layer.counting_balance and not layer.balance_reference_on


def test_counting_pass_leaves_rng_and_router_state_alone():
    """The counting forwards draw the noise the training forwards then draw (the RNG state
    is put back), and the sigmoid router's load count sees each token once."""
    config = lm_config(router="noisy_topk", balance_scope="global", **LOSSES)
    model, (inputs, targets) = seeded_lm(config), lm_batch()
    with torch.no_grad():  # large router noise: other draws would route differently
        for layer in global_scope_layers(model):
            layer.router.noise_weight.normal_(0.0, 2.0)
    layers = global_scope_layers(model)
    state = torch.get_rng_state()
    count_step_routing(layers, model, model, [(inputs, targets)], LOCAL_RUN, _no_autocast)
    assert torch.equal(torch.get_rng_state(), state)
    out = model(inputs, targets)  # the training forward, same draws as the counting one
    for layer, stats in zip(layers, [s for s in out.stats if s is not None], strict=True):
        counts = stats.tokens_per_expert.float()
        torch.testing.assert_close(layer.balance_reference[0], counts / counts.sum())
    sigmoid = seeded_lm(lm_config(**ROUTERS["sigmoid_topk"], balance_scope="global", **LOSSES))
    step(sigmoid, 2)
    for layer in global_scope_layers(sigmoid):
        assert layer.router.load_since_update.sum().item() == ROWS * LENGTH * 2  # T * K once


def test_bad_values_are_refused_with_the_setting_named():
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="divisible by grad_accum"):
        TrainConfig(batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="balance_scope 'per_token'"):
        MoEConfig(d_model=8, d_hidden=8, num_experts=4, balance_scope="per_token")
    for router in ("expert_choice", "soft", "dense"):
        config = dataclasses.replace(
            lm_config().moe, router=router, balance_scope="global", top_k=2
        )
        with pytest.raises(ValueError, match=f"the {router} router has no balance loss"):
            Transformer(dataclasses.replace(lm_config(), moe=config))
    with pytest.raises(ValueError, match="coef, load_loss_coef are all 0"):
        make_moe(router="sigmoid_topk", balance_scope="global", balance_loss_coef=0.0)
    with pytest.raises(ValueError, match=r"grad_accum \(3\) must divide"):
        micro_batches(lm_batch(), 3)


def test_config_json_round_trips_the_new_settings():
    config = lm_config(balance_scope="sequence")
    data = json.loads(json.dumps(model_config_to_dict(config)))
    assert model_config_from_dict(data) == config


def test_task_loop_accumulates_like_one_pass():
    """The task loop's step (tasks/loop.py) in 2 micro-batches: the same loss, prediction
    and gradients as one pass (dropless top-2, no balance loss)."""
    from moekit.models.classic import MoEClassifier
    from moekit.tasks.data import TaskData
    from moekit.tasks.loop import accumulate

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, generator=generator), torch.randint(0, 3, (12,), generator=generator)
    data = TaskData(x_train=x, y_train=y, x_val=x, y_val=y, labels=["a", "b", "c"])
    steps = []
    for grad_accum in (1, 2):
        torch.manual_seed(0)
        model = MoEClassifier(5, 3, d_model=8, router="softmax_topk", top_k=2, balance_loss_coef=0)
        out = accumulate(
            model, data, torch.arange(12), torch.nn.functional.cross_entropy, grad_accum
        )
        steps.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (one, one_grads), (two, two_grads) = steps
    torch.testing.assert_close(two.loss, one.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(two.prediction, one.prediction)
    assert one_grads.keys() == two_grads.keys()
    for name, grad in one_grads.items():
        torch.testing.assert_close(two_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
