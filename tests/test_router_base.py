"""What every router shares: its declared traits and reset_parameters."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moekit.config import ROUTERS, MoEConfig
from moekit.routing import ROUTER_CLASSES, build_router, router_class


def _config(router: str) -> MoEConfig:
    return MoEConfig(
        d_model=8, d_hidden=4, num_experts=4, top_k=1 if router == "switch" else 2, router=router
    )


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


def test_router_knowledge_other_modules_ask_for():
    cfg = _config("softmax_topk")
    assert router_class("softmax_topk").active_fraction(cfg) == 2 / 4
    ec = MoEConfig(
        d_model=8, d_hidden=4, num_experts=4, top_k=2, router="expert_choice", capacity_factor=1.5
    )
    assert router_class("expert_choice").active_fraction(ec) == 0.75
    assert router_class("soft").active_fraction(_config("soft")) == 1.0
    sparse = {name for name in ROUTERS if router_class(name).sparse}
    assert sparse == set(ROUTERS) - {"dense", "soft"}
    assert {name for name in ROUTERS if router_class(name).mixes_tokens} == {"soft"}
    exact = {name for name in ROUTERS if router_class(name).splits_exactly}
    assert exact == {"softmax_topk", "noisy_topk", "dense", "sigmoid_topk"}
    # Why a token's weights may not sum to one (upcycling needs them to).
    assert router_class("softmax_topk").weights_not_summing_to_one(cfg) is None
    unnormalised = MoEConfig(
        d_model=8, d_hidden=4, num_experts=4, router="top_p", renormalize=False
    )
    assert "without renormalize" in router_class("top_p").weights_not_summing_to_one(unnormalised)
    scaled = MoEConfig(
        d_model=8, d_hidden=4, num_experts=4, router="sigmoid_topk", routed_scaling=2.5
    )
    assert "routed_scaling (2.5)" in router_class("sigmoid_topk").weights_not_summing_to_one(scaled)
    assert "top-1" in router_class("switch").weights_not_summing_to_one(_config("switch"))
    assert router_class("dense").weights_not_summing_to_one(_config("dense")) is None


@pytest.mark.parametrize("router", ROUTERS)
def test_the_config_asks_the_routers_class_for_its_rules(router):
    cfg = dataclasses.replace(_config(router), capacity_factor=1.0)
    assert cfg.router_rules is router_class(router)
    # uses_capacity is the one source of whether capacity applies
    assert (cfg.capacity(8) is None) == (not router_class(router).uses_capacity)


def test_no_module_outside_routing_compares_a_router_name():
    import pathlib
    import re

    import moekit

    root = pathlib.Path(moekit.__file__).parent
    pattern = re.compile(r"""router\s*(==|!=|not in|in)\s*[("'\[]""")
    offenders = [
        f"{path.relative_to(root)}:{number}"
        for path in root.rglob("*.py")
        if path.parts[len(root.parts)] != "routing"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders
