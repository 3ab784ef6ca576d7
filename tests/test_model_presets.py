"""Presets: valid configs, the documented counts, and dense twins with equal active params."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moekit import MoEConfig
from moekit.models import (
    PRESETS,
    ModelConfig,
    Transformer,
    count_parameters,
    dense_twin,
    presets,
)


def router_parameters(config: ModelConfig) -> int:
    """The routers' weights (E * D per MoE layer): the only active parameters a twin lacks."""
    return len(config.moe_layers) * config.moe.num_experts * config.d_model


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_returns_a_config_that_builds_on_meta(name):
    config = PRESETS[name]()
    assert isinstance(config, ModelConfig)
    with torch.device("meta"):
        model = Transformer(config)
    assert count_parameters(model).total > 0


def test_documented_parameter_counts():
    # The numbers in presets.py's docstring.
    assert count_parameters(presets.tiny()) == (4_269_184, 1_516_672)
    assert count_parameters(presets.tiny_dense()) == (1_508_480, 1_508_480)
    assert count_parameters(presets.small()) == (119_079_424, 42_009_088)
    assert count_parameters(presets.small_dense()) == (41_951_744, 41_951_744)
    assert count_parameters(presets.deepseek_v3_tiny()) == (3_440_128, 1_523_200)
    assert count_parameters(presets.gpt_oss_tiny()) == (4_426_448, 2_048_720)


def test_dense_twin_of_deepseek_v3_tiny_keeps_the_latent_attention():
    twin = dense_twin(presets.deepseek_v3_tiny())
    assert twin.attention == "mla" and twin.kv_lora_rank == 32 and twin.q_lora_rank == 64
    assert twin.d_hidden == 3 * 128 + 128 and twin.first_dense_layers == 0


@pytest.mark.parametrize("make", [presets.tiny, presets.small, presets.deepseek_v3_tiny])
def test_dense_twin_has_the_active_parameters_of_the_moe(make):
    config = make()
    twin = dense_twin(config)
    assert twin.moe is None
    moe, dense = count_parameters(config), count_parameters(twin)
    assert dense.total == dense.active
    assert moe.active - dense.active == router_parameters(config)


def test_dense_twin_width_is_top_k_expert_widths_plus_shared():
    moe = MoEConfig(
        d_model=64, d_hidden=96, num_experts=8, top_k=3, num_shared_experts=2, d_shared_hidden=32
    )
    config = ModelConfig(vocab_size=100, d_model=64, num_layers=2, num_heads=4, moe=moe)
    twin = dense_twin(config)
    assert twin.d_hidden == 3 * 96 + 2 * 32
    assert count_parameters(config).active - count_parameters(twin).active == router_parameters(
        config
    )


def test_dense_twin_keeps_the_activation():
    config = presets.tiny()
    config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, activation="gelu"))
    assert dense_twin(config).activation == "gelu"


def test_dense_twin_of_a_dense_config_raises():
    with pytest.raises(ValueError, match="already dense"):
        dense_twin(presets.tiny_dense())


def test_dense_twin_of_a_hybrid_with_other_dense_width_raises():
    config = dataclasses.replace(presets.tiny(), moe_every=2, d_hidden=384)
    with pytest.raises(ValueError, match=r"d_hidden \(384\) .* would be 512"):
        dense_twin(config)


def test_tiny_is_small_enough_for_a_cpu():
    config = presets.tiny()
    total, active = count_parameters(config)
    assert total < 5_000_000 and active < 2_000_000
    assert config.moe.capacity_factor is None  # dropless: cached generation equals full forward
    assert config.moe.router in ("softmax_topk", "sigmoid_topk", "noisy_topk", "switch", "top_p")


def test_gpt_oss_tiny_twin_lacks_only_the_routers_and_the_active_expert_biases():
    config = presets.gpt_oss_tiny()
    twin = dense_twin(config)
    assert (twin.attention, twin.sliding_layers, twin.activation) == (
        "sinks",
        [0, 2],
        "swiglu_clamped",
    )
    assert twin.d_hidden == 4 * 128
    moe = config.moe
    routers = router_parameters(config) + 4 * moe.num_experts  # weights and biases
    active_biases = 4 * moe.top_k * (2 * moe.d_hidden + config.d_model)  # b_up, b_down
    assert count_parameters(config).active - count_parameters(twin).active == (
        routers + active_biases
    )


def test_dense_twin_refuses_a_clamp_its_mlp_cannot_have():
    config = presets.gpt_oss_tiny()
    config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, swiglu_limit=3.0))
    with pytest.raises(ValueError, match="swiglu_limit 3.0"):
        dense_twin(config)
