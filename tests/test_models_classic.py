"""Classic and hierarchical MoE classifiers: oracles against hand-written mixtures, one
expert equals that expert's network, one group equals the flat MoE, and learning on digits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moekit import MoE, MoEConfig
from moekit.models.classic import (
    DenseClassifier,
    HierarchicalClassifier,
    HierarchicalMoE,
    ModuleMoE,
    MoEClassifier,
    expert_mlp,
)
from moekit.tasks import load_digits_data
from moekit.tasks.loop import specialisation

pytestmark = pytest.mark.usefixtures("one_thread")


def dense_config(d_model: int, num_experts: int, **options) -> MoEConfig:
    return MoEConfig(
        d_model=d_model, d_hidden=8, num_experts=num_experts, router="dense", **options
    )


def test_one_expert_equals_that_expert_forward_and_backward():
    torch.manual_seed(0)
    expert = expert_mlp(6, 5)
    layer = ModuleMoE(dense_config(6, 1), [expert])
    x = torch.randn(7, 6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = layer(x).hidden
    y_ref = expert(x_ref)
    torch.testing.assert_close(y, y_ref)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    grads = [p.grad.clone() for p in expert.parameters()]
    for p in expert.parameters():
        p.grad = None
    y_ref.backward(grad_y)
    torch.testing.assert_close(x.grad, x_ref.grad)
    for got, want in zip(grads, [p.grad for p in expert.parameters()]):
        torch.testing.assert_close(got, want)


def test_classifier_with_one_expert_is_embed_expert_head():
    torch.manual_seed(0)
    model = MoEClassifier(10, 3, d_model=8, expert_widths=(12,))
    x = torch.randn(5, 10)
    want = model.head(model.moe.experts.experts[0](model.embed(x)))
    torch.testing.assert_close(model(x).prediction, want)


def test_dense_gate_mixes_every_experts_logits_with_weights_summing_to_one():
    # head(sum_e g_e f_e(h)) = sum_e g_e head(f_e(h)): the mixture of the experts' logits.
    torch.manual_seed(0)
    model = MoEClassifier(10, 4, d_model=8, expert_widths=(3, 5, 7))
    x = torch.randn(6, 10)
    h = model.embed(x)
    gates_BE = model.moe.router(h).weights_TK
    torch.testing.assert_close(gates_BE.sum(dim=-1), torch.ones(6))
    logits_EBC = torch.stack([model.head(f(h)) for f in model.moe.experts.experts])
    want = torch.einsum("be,ebc->bc", gates_BE, logits_EBC)
    torch.testing.assert_close(model(x).prediction, want)


def test_sparse_top1_gate_runs_only_the_chosen_expert():
    torch.manual_seed(0)
    model = MoEClassifier(10, 4, d_model=8, expert_widths=(3, 5, 7), router="softmax_topk", top_k=1)
    x = torch.randn(9, 10)
    h = model.embed(x)
    routing = model.moe.router(h)
    experts = model.moe.experts.experts
    rows = [
        routing.weights_TK[b, 0] * experts[int(routing.ids_TK[b, 0])](h[b : b + 1])[0]
        for b in range(9)
    ]
    torch.testing.assert_close(model(x).prediction, model.head(torch.stack(rows)))
    assert torch.all(routing.weights_TK == 1.0)  # top-1 renormalised


def test_one_group_hierarchy_equals_the_flat_moe():
    torch.manual_seed(0)
    hme = HierarchicalMoE(6, num_groups=1, experts_per_group=3, expert_hidden=5)
    flat = MoE(MoEConfig(d_model=6, d_hidden=5, num_experts=3, router="dense", activation="relu",
                         balance_loss_coef=0.0))  # fmt: skip
    flat.load_state_dict(hme.groups[0].state_dict())
    x = torch.randn(8, 6)
    torch.testing.assert_close(hme(x).hidden, flat(x).hidden)


def test_hierarchy_output_is_the_two_level_mixture():
    # y = sum_g g_g(x) sum_e g_{e|g}(x) f_{g,e}(x)  (Jordan & Jacobs 1994)
    torch.manual_seed(0)
    hme = HierarchicalMoE(6, num_groups=2, experts_per_group=3, expert_hidden=5)
    x = torch.randn(4, 6)
    upper_BG = hme.upper.router(x).weights_TK
    want = torch.zeros(4, 6)
    for g, group in enumerate(hme.groups):
        inner_BE = group.router(x).weights_TK
        for e in range(3):
            w_up, w_down = group.experts.w_up[e], group.experts.w_down[e]
            f = F.relu(x @ w_up) @ w_down
            want += (upper_BG[:, g] * inner_BE[:, e]).unsqueeze(-1) * f
    torch.testing.assert_close(hme(x).hidden, want)


def test_hierarchy_gate_choices_name_groups_and_leaves():
    torch.manual_seed(0)
    model = HierarchicalClassifier(10, 3, d_model=8, num_groups=2, experts_per_group=3)
    choices = model.gate_choices(torch.randn(5, 10))
    assert choices["groups"].num_experts == 2 and choices["leaves"].num_experts == 6
    assert torch.all(choices["leaves"].ids < 6)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="2 expert modules for num_experts \\(3\\)"):
        ModuleMoE(dense_config(4, 3), [nn.Identity(), nn.Identity()])
    with pytest.raises(ValueError, match="soft"):
        MoEClassifier(10, 3, router="soft")


@pytest.fixture(scope="module")
def digits():
    return load_digits_data(seed=0)


def _train(model: nn.Module, data, steps: int = 150) -> float:
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        index = torch.randint(len(data.x_train), (64,), generator=gen)
        out = model(data.x_train[index])
        (F.cross_entropy(out.prediction, data.y_train[index]) + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        return (model.eval()(data.x_val).prediction.argmax(-1) == data.y_val).float().mean().item()


@pytest.mark.parametrize(
    "build",
    [
        lambda: MoEClassifier(64, 10),
        lambda: MoEClassifier(64, 10, router="softmax_topk", top_k=1),
        lambda: HierarchicalClassifier(64, 10),
        lambda: DenseClassifier(64, 10, width=160),
    ],
    ids=["moe-dense-gate", "moe-top1", "hmoe", "mlp"],
)
def test_learns_digits_well_above_chance(digits, build):
    torch.manual_seed(0)
    assert _train(build(), digits) > 0.85  # chance is 0.1


def test_specialisation_counts_every_validation_example(digits):
    torch.manual_seed(0)
    model = MoEClassifier(64, 10, expert_widths=(8, 16))
    table = specialisation(model, digits.x_val, digits.y_val, digits.labels, batch_size=50)
    (layer,) = table["layers"]
    assert layer["name"] == "experts" and len(layer["counts"]) == 10
    per_label = [sum(row) for row in layer["counts"]]
    assert per_label == torch.bincount(digits.y_val, minlength=10).tolist()
