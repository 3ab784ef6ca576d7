"""Rotary tables: plain RoPE's angles, and YaRN's equal to transformers' own."""

import math

import pytest
import torch

from moekit.models import ModelConfig
from moekit.models.rope import rope_tables, yarn_mscale


def test_plain_tables_hold_position_times_frequency():
    cos, sin = rope_tables(8, 5, 10000.0)
    inv_freq = 10000.0 ** (-torch.arange(0, 8, 2) / 8)
    assert torch.allclose(
        torch.atan2(sin[3], cos[3]), torch.remainder(3 * inv_freq + math.pi, 2 * math.pi) - math.pi
    )


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"beta_fast": 16, "beta_slow": 2},
        {"mscale": 0.707, "mscale_all_dim": 1.0},
        {"truncate": False},
        {"attention_factor": 1.3},
    ],
)
def test_yarn_tables_equal_transformers(extra):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim, theta, factor, original = 16, 50000.0, 8.0, 64
    hf_params = {"rope_type": "yarn", "rope_theta": theta, "factor": factor}
    hf_params |= {"original_max_position_embeddings": original} | extra
    hf = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=original * 8,
        rope_parameters=hf_params,
    )
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    ours = {"type": "yarn", "factor": factor, "original_max_seq_len": original} | extra
    cos, sin = rope_tables(head_dim, 40, theta, ours)
    angles = torch.outer(torch.arange(40, dtype=torch.float32), inv_freq.float())
    torch.testing.assert_close(cos, angles.cos() * attention_factor)
    torch.testing.assert_close(sin, angles.sin() * attention_factor)


def test_yarn_mscale_is_one_without_stretching():
    assert yarn_mscale(1.0) == 1.0
    assert yarn_mscale(40.0, 1.0) == pytest.approx(0.1 * math.log(40) + 1)


@pytest.mark.parametrize(
    "scaling, message",
    [
        ({"type": "linear", "factor": 2.0, "original_max_seq_len": 8}, "type 'linear'"),
        ({"type": "yarn", "original_max_seq_len": 8}, "factor"),
        ({"type": "yarn", "factor": 2.0, "original_max_seq_len": 8, "beta": 1}, "beta"),
        ("yarn", "must be a dict"),
    ],
)
def test_bad_rope_scaling_is_named(scaling, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(vocab_size=8, d_model=16, num_layers=1, num_heads=2, rope_scaling=scaling)


def test_unknown_attention_kind_is_named():
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        ModelConfig(vocab_size=8, d_model=16, num_layers=1, num_heads=2, attention="flash")
