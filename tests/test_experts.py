"""GroupedExperts: the fast grouped path equals the per-expert reference loop.

# R routed rows (grouped by expert), D model, F expert hidden, E experts
"""

from __future__ import annotations

import pytest
import torch

from moekit.activations import ClampedSwiGLU
from moekit.config import ACTIVATIONS, EXPERT_BACKENDS
from moekit.experts import MLP, GroupedExperts, choose_backend, grouped_mm_supported

# Experts 1 and 4 get no rows: their weight gradients must be exact zeros, not garbage.
COUNTS_E = torch.tensor([3, 0, 7, 1, 0, 5])
# Widths whose rows start on 16-byte boundaries in fp32 and bf16, so both backends run.
D, F_ = 16, 16
FAST = ["grouped_mm", "loop"]


def _experts(
    activation: str, dtype=torch.float32, seed: int = 0, backend: str = "auto", bias=False
) -> GroupedExperts:
    torch.manual_seed(seed)
    if activation == "swiglu_clamped":  # a limit the N(0, 1) rows cross, so the clamps act
        activation = ClampedSwiGLU(alpha=1.702, limit=0.5)
    experts = GroupedExperts(len(COUNTS_E), D, F_, activation, backend=backend, bias=bias)
    return experts.to(dtype)


def test_grouped_mm_backend_is_chosen_where_supported_and_falls_back_cleanly():
    x32, x16 = torch.empty(0, D), torch.empty(0, D, dtype=torch.float16)
    assert grouped_mm_supported(torch.float32, torch.device("cpu"), D, 2 * F_)
    assert choose_backend("auto", x32, D, 2 * F_) == "grouped_mm"
    assert choose_backend("loop", x32, D, 2 * F_) == "loop"
    # fp16 on the CPU, or a row width that breaks the 16-byte rule: the loop, no error.
    assert choose_backend("grouped_mm", x16, D, 2 * F_) == "loop"
    assert choose_backend("grouped_mm", x32, D, 6) == "loop"
    with pytest.raises(ValueError, match="unknown expert backend 'fast'"):
        GroupedExperts(2, D, F_, backend="fast")
    assert set(EXPERT_BACKENDS) == {"auto", "grouped_mm", "loop"}


def test_odd_widths_run_through_the_fallback():
    torch.manual_seed(0)
    experts = GroupedExperts(3, 6, 5, "swiglu", backend="grouped_mm")
    counts_E = torch.tensor([2, 0, 3])
    x_RD = torch.randn(5, 6)
    torch.testing.assert_close(experts(x_RD, counts_E), experts.forward_reference(x_RD, counts_E))


def _grads(experts, output_RD, x_RD, grad_RD):
    params = [experts.w_up, experts.w_down]
    if experts.b_up is not None:
        params += [experts.b_up, experts.b_down]
    return torch.autograd.grad(output_RD, [x_RD, *params], grad_RD)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fast_path_equals_reference_forward_and_backward(activation, backend, bias):
    experts = _experts(activation, backend=backend, bias=bias)
    R = int(COUNTS_E.sum())
    x_RD = torch.randn(R, D, requires_grad=True)
    grad_RD = torch.randn(R, D)

    fast_RD = experts(x_RD, COUNTS_E)
    slow_RD = experts.forward_reference(x_RD, COUNTS_E)

    torch.testing.assert_close(fast_RD, slow_RD, atol=1e-5, rtol=1e-5)
    for fast, slow in zip(
        _grads(experts, fast_RD, x_RD, grad_RD), _grads(experts, slow_RD, x_RD, grad_RD)
    ):
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", FAST)
def test_experts_without_rows_get_zero_weight_gradients(backend):
    experts = _experts("swiglu", backend=backend)
    x_RD = torch.randn(int(COUNTS_E.sum()), D)
    experts(x_RD, COUNTS_E).square().sum().backward()
    for e in (1, 4):
        assert torch.equal(experts.w_up.grad[e], torch.zeros_like(experts.w_up.grad[e]))
        assert torch.equal(experts.w_down.grad[e], torch.zeros_like(experts.w_down.grad[e]))
    assert experts.w_up.grad[0].abs().sum() > 0


@pytest.mark.parametrize("backend", FAST)
def test_expanded_upstream_gradient_from_sum(backend):
    """.sum().backward() sends a stride-0 gradient; the grouped GEMMs must accept it."""
    experts = _experts("swiglu", backend=backend)
    x_RD = torch.randn(int(COUNTS_E.sum()), D, requires_grad=True)
    experts(x_RD, COUNTS_E).sum().backward()
    fast = x_RD.grad.clone()
    x_RD.grad = None
    experts.forward_reference(x_RD, COUNTS_E).sum().backward()
    torch.testing.assert_close(fast, x_RD.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("backend", FAST)
def test_all_rows_to_no_expert_and_padding_rows_ignored(backend, bias):
    """Rows past sum(counts_E) (capacity padding) keep the shape static and are not computed."""
    experts = _experts("swiglu", backend=backend, bias=bias)
    x_RD = torch.randn(4, D, requires_grad=True)
    y_RD = experts(x_RD, torch.zeros(len(COUNTS_E), dtype=torch.long))
    assert y_RD.shape == (4, D)
    counts_E = torch.tensor([1, 0, 2, 0, 0, 0])
    y_RD = experts(x_RD, counts_E)
    assert y_RD.shape == (4, D)
    torch.testing.assert_close(y_RD[:3], experts.forward_reference(x_RD[:3], counts_E))
    # Gradients reach only the computed rows' experts; padding contributes nothing to them.
    grad_RD = torch.cat([torch.randn(3, D), torch.zeros(1, D)])
    fast = _grads(experts, y_RD, x_RD, grad_RD)
    slow = _grads(experts, experts.forward_reference(x_RD[:3], counts_E), x_RD, grad_RD[:3])
    torch.testing.assert_close(fast[0][:3], slow[0][:3])
    for f, s in zip(fast[1:], slow[1:]):
        torch.testing.assert_close(f, s)


def test_one_expert_equals_dense_mlp():
    """One expert holding nn.Linear's weights, transposed, is exactly the dense MLP."""
    torch.manual_seed(0)
    mlp = MLP(16, 12, "swiglu")
    experts = GroupedExperts(1, 16, 12, "swiglu")
    with torch.no_grad():
        experts.w_up.copy_(mlp.up.weight.t().unsqueeze(0))
        experts.w_down.copy_(mlp.down.weight.t().unsqueeze(0))
    x_RD = torch.randn(9, 16)
    torch.testing.assert_close(experts(x_RD, torch.tensor([9])), mlp(x_RD), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "swiglu_clamped"])
def test_autocast_bf16_matches_reference(activation, backend):
    """Under autocast both paths compute in bf16 and keep fp32 parameter gradients."""
    experts = _experts(activation, backend=backend, bias=activation == "swiglu_clamped")
    R = int(COUNTS_E.sum())
    x_RD = torch.randn(R, D, requires_grad=True)
    grad_RD = torch.randn(R, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast_RD = experts(x_RD, COUNTS_E)
        slow_RD = experts.forward_reference(x_RD, COUNTS_E)
    assert fast_RD.dtype == torch.bfloat16
    torch.testing.assert_close(fast_RD, slow_RD, atol=2e-2, rtol=2e-2)
    fast = _grads(experts, fast_RD, x_RD, grad_RD.bfloat16())
    slow = _grads(experts, slow_RD, x_RD, grad_RD.bfloat16())
    for f, s in zip(fast, slow):
        assert f.dtype == torch.float32
        torch.testing.assert_close(f, s, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("backend", FAST)
def test_bf16_parameters_match_fp64_reference(backend):
    """Pure bf16 (the column-major forward GEMMs) against the same weights in fp64."""
    experts = _experts("swiglu", torch.bfloat16, backend=backend)
    reference = _experts("swiglu", torch.float64)
    with torch.no_grad():
        reference.w_up.copy_(experts.w_up)
        reference.w_down.copy_(experts.w_down)
    x_RD = torch.randn(int(COUNTS_E.sum()), D, dtype=torch.bfloat16)
    expected = reference.forward_reference(x_RD.double(), COUNTS_E)
    torch.testing.assert_close(experts(x_RD, COUNTS_E).double(), expected, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("backend", FAST)
def test_biased_experts_without_rows_get_zero_bias_gradients(backend):
    experts = _experts("swiglu_clamped", backend=backend, bias=True)
    x_RD = torch.randn(int(COUNTS_E.sum()), D)
    experts(x_RD, COUNTS_E).square().sum().backward()
    for e in (1, 4):
        assert not experts.b_up.grad[e].any() and not experts.b_down.grad[e].any()
    assert experts.b_up.grad[0].abs().sum() > 0


def test_clamped_swiglu_is_gpt_oss_formula():
    """Worked values: limit 7, alpha 1.702; gate 8 -> 7 (clamped), up -9 -> -7."""
    act = ClampedSwiGLU()
    h = torch.tensor([[8.0, 1.0, -9.0, 0.5]])  # gates (8, 1), ups (-9, 0.5)
    expected = torch.tensor(
        [
            [
                (-7 + 1) * 7 * torch.sigmoid(torch.tensor(1.702 * 7)),
                1.5 * torch.sigmoid(torch.tensor(1.702)),
            ]
        ]
    )
    torch.testing.assert_close(act(h), expected)
