"""Multi-gate MoE: one task and one expert equals shared-bottom; the output equals the
paper's formula computed expert by expert; the synthetic data's correlation; learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.models.mmoe import MMoE, SharedBottom
from moekit.tasks import mmoe_synthetic
from moekit.tasks.loop import regression_loss, task_gate_usage

pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_task_one_expert_equals_shared_bottom_forward_and_backward():
    torch.manual_seed(0)
    mmoe = MMoE(12, 1, num_experts=1, expert_hidden=7, tower_hidden=5)
    bottom = SharedBottom(12, 1, bottom_hidden=7, tower_hidden=5)
    with torch.no_grad():
        bottom.bottom.up.weight.copy_(mmoe.experts.w_up[0].T)
        bottom.bottom.down.weight.copy_(mmoe.experts.w_down[0].T)
    bottom.towers.load_state_dict(mmoe.towers.state_dict())
    x = torch.randn(9, 12)
    y, y_ref = mmoe(x).prediction, bottom(x).prediction
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(mmoe.experts.w_up.grad[0], bottom.bottom.up.weight.grad.T)
    torch.testing.assert_close(mmoe.experts.w_down.grad[0], bottom.bottom.down.weight.grad.T)
    # One expert: the gate's softmax is 1 whatever its weights, so it gets no gradient.
    assert torch.count_nonzero(mmoe.gates[0].weight.grad) == 0


def test_output_is_each_tasks_gate_mixing_the_shared_experts():
    # y_t = h_t(sum_e softmax(W_t x)_e f_e(x)), f_e(x) = relu(x W_up_e) W_down_e
    torch.manual_seed(0)
    model = MMoE(10, 3, num_experts=4, expert_hidden=6, tower_hidden=5)
    x = torch.randn(7, 10)
    experts = [F.relu(x @ model.experts.w_up[e]) @ model.experts.w_down[e] for e in range(4)]
    for t in range(3):
        gate_BE = (x @ model.gates[t].weight.T).softmax(dim=-1)
        torch.testing.assert_close(gate_BE.sum(dim=-1), torch.ones(7))
        mixed = sum(gate_BE[:, e : e + 1] * experts[e] for e in range(4))
        torch.testing.assert_close(model(x).prediction[:, t], model.towers[t](mixed)[:, 0])


def _label_correlation(p: float) -> float:
    data = mmoe_synthetic(correlation=p, num_examples=4000, seed=0)
    return torch.corrcoef(data.y_train.T)[0, 1].item()


def test_synthetic_label_correlation_falls_with_the_weight_correlation():
    corr = {p: _label_correlation(p) for p in (1.0, 0.5, 0.0)}
    assert corr[1.0] > 0.99  # the same function up to the noise
    assert corr[1.0] > corr[0.5] > corr[0.0]
    assert abs(corr[0.0]) < 0.2


def test_synthetic_data_is_seeded_and_checked():
    a = mmoe_synthetic(correlation=0.3, num_examples=100, dim=8, seed=4)
    b = mmoe_synthetic(correlation=0.3, num_examples=100, dim=8, seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert a.x_train.shape == (80, 8) and a.y_train.shape == (80, 2)
    with pytest.raises(ValueError, match="correlation \\(1.5\\)"):
        mmoe_synthetic(correlation=1.5)
    with pytest.raises(ValueError, match="num_tasks \\(0\\)"):
        MMoE(4, 0)


def test_mmoe_learns_and_reports_gate_usage():
    torch.manual_seed(0)
    data = mmoe_synthetic(correlation=0.5, num_examples=2000, dim=20, seed=0)
    model = MMoE(20, 2, num_experts=4, expert_hidden=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def val_loss() -> float:
        with torch.no_grad():
            return regression_loss(model(data.x_val).prediction, data.y_val).item()

    before = val_loss()
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        index = torch.randint(len(data.x_train), (64,), generator=gen)
        regression_loss(model(data.x_train[index]).prediction, data.y_train[index]).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert val_loss() < 0.5 * before
    usage = task_gate_usage(model, data.x_val, data.labels, batch_size=128)
    (layer,) = usage["layers"]
    assert usage["labels"] == ["task1", "task2"]
    assert [sum(row) for row in layer["counts"]] == [len(data.x_val)] * 2
    assert task_gate_usage(SharedBottom(20, 2), data.x_val, data.labels, 128)["layers"] == []
