"""An unknown dotted override names the closest setting, and the add-experts count error
names the method chosen and the counts that work."""

from __future__ import annotations

import dataclasses

import pytest

from moekit.models import PRESETS
from moekit.surgery.add_experts import added_experts_config
from moekit.train.overrides import build_configs


@pytest.mark.parametrize(
    "preset,key,suggestion",
    [
        ("tiny", "model.num_expert", "did you mean --model.num_experts?"),
        ("tiny", "model.moe.d_hiden", "did you mean --model.moe.d_hidden?"),
        ("tiny", "train.lr_warmup", "did you mean --train.warmup_steps?"),
        ("tiny_dense", "model.d_hiden", "did you mean --model.d_hidden?"),
    ],
)
def test_an_unknown_key_suggests_the_closest_setting(preset, key, suggestion):
    with pytest.raises(ValueError, match=f"unknown setting --{key} ") as error:
        build_configs(preset, {key: "8"})
    assert suggestion in str(error.value)


def test_nothing_close_is_suggested_and_dense_models_get_no_moe_keys():
    with pytest.raises(ValueError) as error:
        build_configs("tiny", {"optim.lr": "1"})
    assert "did you mean" not in str(error.value)
    with pytest.raises(ValueError) as error:  # num_experts is not a dense model's setting
        build_configs("tiny_dense", {"model.num_expert": "4"})
    assert "did you mean" not in str(error.value)


def test_a_count_split_cannot_take_names_the_method_and_what_works():
    # The main job's model: 16 experts of width 128. 8 is no multiple of 16; 32 new experts
    # would cut each into 3 parts of 128 / 3 units; 16 (2 parts) and 48 (4 parts) work.
    config = PRESETS["tiny"]()
    with pytest.raises(ValueError) as error:
        added_experts_config(config, 8, "grow")
    message = str(error.value)
    assert message.startswith("method 'grow' adds a multiple of num_experts (16) experts, got 8")
    assert "--num 16, 48, 112, ..." in message and "offset" not in message
    with pytest.raises(ValueError, match=r"method 'split' with 32 new .* 3 parts.*--num 16, 48"):
        added_experts_config(config, 32, "split")
    assert added_experts_config(config, 16, "grow").moe.num_experts == 32
    sigmoid = dataclasses.replace(
        config, moe=dataclasses.replace(config.moe, router="sigmoid_topk")
    )
    with pytest.raises(ValueError, match="or method 'offset', which adds any number"):
        added_experts_config(sigmoid, 8, "split")
