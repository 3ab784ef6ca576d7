"""The fast path on a CUDA device: grouped_mm equals the loop, and nothing syncs with the host.

Marked gpu: skipped without a CUDA device (the same code runs on the CPU in every other test).
"""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.experts import GroupedExperts, choose_backend

pytestmark = pytest.mark.gpu


def _layer(**overrides) -> MoE:
    torch.manual_seed(0)
    kw = dict(d_model=64, d_hidden=128, num_experts=8, top_k=2)
    kw.update(overrides)
    return MoE(MoEConfig(**kw)).cuda()


def test_bf16_grouped_mm_equals_loop_on_cuda():
    torch.manual_seed(0)
    experts = GroupedExperts(8, 64, 128).cuda().bfloat16()
    counts_E = torch.tensor([5, 0, 17, 3, 0, 9, 1, 13], device="cuda")
    x_RD = torch.randn(
        int(counts_E.sum()) + 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True
    )
    assert choose_backend("auto", x_RD, 64, 256, 128) == "grouped_mm"
    grad_RD = torch.randn_like(x_RD)
    n = int(counts_E.sum())
    results = []
    for backend in ("grouped_mm", "loop"):
        experts.backend = backend
        y_RD = experts(x_RD, counts_E)
        grads = torch.autograd.grad(y_RD[:n], [x_RD, experts.w_up, experts.w_down], grad_RD[:n])
        results.append((y_RD[:n], grads[0][:n], grads[1], grads[2]))
    for fast, loop in zip(*results):
        torch.testing.assert_close(fast.float(), loop.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_dropless_and_capacity_paths_never_sync(capacity_factor):
    layer = _layer(capacity_factor=capacity_factor).bfloat16()
    x = torch.randn(4, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x)  # warm up (lazy CUDA initialisation may sync once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x)
        torch.autograd.backward(
            [out.hidden, out.aux_loss], [torch.ones_like(out.hidden), torch.ones_like(out.aux_loss)]
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_compiled_layer_equals_eager_on_cuda():
    layer = _layer().bfloat16()
    x = torch.randn(2, 64, 64, device="cuda", dtype=torch.bfloat16)
    eager = layer(x).hidden
    compiled = torch.compile(layer, fullgraph=True)(x).hidden
    torch.testing.assert_close(compiled.float(), eager.float(), atol=3e-2, rtol=3e-2)
