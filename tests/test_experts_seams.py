"""GroupedExperts' seams (run_experts, project, gemm_widths) and the capabilities it declares.

# R routed rows (grouped by expert), D model, F expert hidden, E experts
"""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

import moekit
from moekit.config import MoEConfig
from moekit.experts import GroupedExperts, grouped_linear
from moekit.models.lora import LoRAConfig, LoRAGroupedExperts
from moekit.moe import MoE

COUNTS_E = torch.tensor([3, 0, 7, 1, 0, 5])
D, F_ = 16, 16


class _Composed(GroupedExperts):
    """The same experts, run through the seams instead of the fused node."""

    fused = False


class _Bf16Weights(GroupedExperts):
    """A low-precision variant: each projection multiplies by its weights rounded to bf16."""

    fused = False
    plain_weights = False  # w_up, w_down are not what it multiplies by

    def project(self, a_RK, projection, groups):
        w_EKN = getattr(self, f"w_{projection}")
        return grouped_linear(a_RK, w_EKN.bfloat16().float(), groups)


def _run(experts, x_RD, grad_RD):
    y_RD = experts(x_RD, COUNTS_E)
    grads = torch.autograd.grad(y_RD, [x_RD, experts.w_up, experts.w_down], grad_RD)
    return [y_RD, *grads]


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_run_experts_through_the_seams_equals_the_fused_path(backend, bias):
    torch.manual_seed(0)
    fused = GroupedExperts(len(COUNTS_E), D, F_, "swiglu_clamped", backend=backend, bias=bias)
    composed = _Composed(len(COUNTS_E), D, F_, "swiglu_clamped", backend=backend, bias=bias)
    composed.load_state_dict(fused.state_dict())
    R = int(COUNTS_E.sum())
    x_RD = torch.randn(R, D, requires_grad=True)
    grad_RD = torch.randn(R, D)
    for a, b in zip(_run(fused, x_RD, grad_RD), _run(composed, x_RD, grad_RD)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_a_low_precision_variant_overrides_project_alone(backend):
    """Oracle: the plain experts holding the bf16-rounded weights."""
    torch.manual_seed(0)
    variant = _Bf16Weights(len(COUNTS_E), D, F_, backend=backend, bias=True)
    rounded = GroupedExperts(len(COUNTS_E), D, F_, backend=backend, bias=True)
    with torch.no_grad():
        rounded.load_state_dict(variant.state_dict())
        rounded.w_up.copy_(rounded.w_up.bfloat16().float())
        rounded.w_down.copy_(rounded.w_down.bfloat16().float())
    R = int(COUNTS_E.sum())
    x_RD = torch.randn(R, D, requires_grad=True)
    grad_RD = torch.randn(R, D)
    got, want = _run(variant, x_RD, grad_RD), _run(rounded, x_RD, grad_RD)
    for a, b in zip(got[:2], want[:2]):  # output and input gradient
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_small_batch_path_asks_the_experts_capability():
    layer = MoE(MoEConfig(d_model=D, d_hidden=F_, num_experts=len(COUNTS_E), top_k=2)).eval()
    with torch.no_grad():
        assert layer.gathers_experts(1)
        layer.experts = _Composed(len(COUNTS_E), D, F_)
        assert layer.gathers_experts(1)  # a plain subclass keeps the path
        layer.experts = _Bf16Weights(len(COUNTS_E), D, F_)
        assert not layer.gathers_experts(1)
        layer.experts = LoRAGroupedExperts(GroupedExperts(len(COUNTS_E), D, F_), LoRAConfig(rank=2))
        assert not layer.gathers_experts(1)


def test_lora_experts_override_the_seams_not_forward():
    overridden = set(vars(LoRAGroupedExperts))
    assert {"project", "gemm_widths"} <= overridden
    assert not {"forward", "run_experts"} & overridden
    assert not LoRAGroupedExperts.fused and not LoRAGroupedExperts.plain_weights


def _private_imports_of_experts(path: pathlib.Path) -> list[str]:
    """Names starting with "_" that path imports from moekit's experts module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] == "experts":
            in_moekit = node.level > 0 or (node.module or "").startswith("moekit.")
            found += [a.name for a in node.names if in_moekit and a.name.startswith("_")]
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            if ast.unparse(node.value) == "moekit.experts":
                found.append(node.attr)
    return found


def test_no_module_outside_experts_imports_a_private_name_of_it():
    root = pathlib.Path(moekit.__file__).parent
    repo = root.parents[1]
    paths = [*root.rglob("*.py"), *(repo / "tests").rglob("*.py"), *(repo / "bench").rglob("*.py")]
    offenders = {
        str(path.relative_to(repo)): names
        for path in paths
        if path != root / "experts.py"
        for names in [_private_imports_of_experts(path)]
        if names
    }
    assert not offenders, offenders
