"""What every router shares: its declared traits and reset_parameters."""

from __future__ import annotations

import pytest
import torch

from moekit.config import ROUTERS, MoEConfig
from moekit.routing import ROUTER_CLASSES, build_router, router_class


def _config(router: str) -> MoEConfig:
    return MoEConfig(d_model=8, d_hidden=4, num_experts=4, top_k=1 if router == "switch" else 2, router=router)


def test_every_router_is_registered_and_declares_its_traits():
    assert set(ROUTER_CLASSES) == set(ROUTERS)
    causal = {name for name in ROUTERS if router_class(name).causal}
    assert causal == set(ROUTERS) - {"expert_choice", "soft"}
    capacity = {name for name in ROUTERS if router_class(name).uses_capacity}
    assert capacity == set(ROUTERS) - {"soft", "dense"}
    biased = {name for name in ROUTERS if router_class(name).has_selection_bias}
    assert biased == {"sigmoid_topk"}


def test_unknown_router_name_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown router 'nope'"):
        router_class("nope")


@pytest.mark.parametrize("router", ROUTERS)
def test_reset_parameters_sets_the_documented_state(router):
    module = build_router(_config(router))
    with torch.no_grad():
        for param in module.parameters():
            param.fill_(3.0)
        for buffer in module.buffers():
            buffer.fill_(3.0)
    torch.manual_seed(0)
    module.reset_parameters(std=0.02)
    params = dict(module.named_parameters())
    gate = params.pop("slot_weight" if router == "soft" else "weight")
    assert 0.01 < gate.std().item() < 0.03
    assert torch.equal(params.pop("scale", torch.ones(())), torch.ones(()))
    noise = params.pop("noise_weight", None)
    assert noise is None or torch.equal(noise, torch.zeros_like(noise))
    assert not params  # nothing left unset
    for buffer in module.buffers():
        assert torch.equal(buffer, torch.zeros_like(buffer))


def test_reset_parameters_default_std_is_the_constructor_init():
    torch.manual_seed(0)
    built = build_router(_config("softmax_topk"))
    again = build_router(_config("softmax_topk"))
    torch.manual_seed(0)
    again.reset_parameters()
    assert torch.equal(built.weight, again.weight)
