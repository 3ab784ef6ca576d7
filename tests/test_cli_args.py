"""`--preset NAME` plus dotted overrides: parsing, types, and errors that name the key."""

from __future__ import annotations

import pytest

from moekit.cli import main
from moekit.train.overrides import build_configs, parse_overrides


def configs(*args: str):
    return build_configs("tiny", parse_overrides(list(args)))


def test_overrides_reach_model_moe_and_train_configs():
    model, train = configs(
        "--model.num_experts",
        "16",
        "--model.moe.d_hidden=64",
        "--model.num_layers",
        "2",
        "--train.lr",
        "3e-4",
        "--train.warmup_steps",
        "none",
        "--model.moe.renormalize",
        "false",
    )
    assert (model.moe.num_experts, model.moe.d_hidden, model.num_layers) == (16, 64, 2)
    assert model.moe.renormalize is False
    assert train.lr == 3e-4
    assert train.warmup_steps == 12  # None derives 5% of the 225 default steps (rounded up)


def test_model_d_model_sets_the_moe_layer_width_too():
    model, _ = configs("--model.d_model", "64", "--model.num_heads", "2")
    assert model.d_model == model.moe.d_model == 64


def test_capacity_factor_accepts_numbers_and_none():
    assert configs("--model.capacity_factor", "1.25")[0].moe.capacity_factor == 1.25
    assert configs("--model.capacity_factor", "None")[0].moe.capacity_factor is None


def test_layer_lists_take_comma_separated_indices():
    gpt_oss = parse_overrides(["--model.num_layers", "6", "--model.sliding_layers", "0,2, 4"])
    model, _ = build_configs("gpt_oss_tiny", gpt_oss)
    assert model.sliding_layers == [0, 2, 4]
    assert build_configs("gpt_oss_tiny", {"model.sliding_layers": "none"})[0].sliding_layers is None
    assert configs("--model.dense_layers", "1")[0].dense_layers == [1]
    assert configs("--model.dense_layers", "")[0].dense_layers == []
    with pytest.raises(ValueError, match=r"--model\.dense_layers expects an integer, got 'x'"):
        configs("--model.dense_layers", "1,x")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.num_expert", "4"], r"unknown setting --model\.num_expert\b"),
        (["--train.learning_rate", "1"], r"unknown setting --train\.learning_rate"),
        (["--optim.lr", "1"], r"unknown setting --optim\.lr"),
        (
            ["--model.num_experts", "many"],
            r"--model\.num_experts expects an integer, got 'many'",
        ),
        (["--train.lr", "fast"], r"--train\.lr expects a number, got 'fast'"),
        (["--train.steps", "1.5"], r"--train\.steps expects an integer"),
        (
            ["--model.moe.renormalize", "maybe"],
            r"--model\.moe\.renormalize expects true or false",
        ),
        (["--train.lr"], r"--train\.lr needs a value"),
        (["stray"], r"unrecognised argument 'stray'"),
    ],
)
def test_unknown_keys_and_wrong_types_name_the_key(args, message):
    with pytest.raises(ValueError, match=message):
        configs(*args)


def test_moe_setting_on_a_dense_preset_is_an_error():
    with pytest.raises(ValueError, match=r"--model\.top_k: the preset 'tiny_dense' is dense"):
        build_configs("tiny_dense", {"model.top_k": "1"})


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match=r"unknown preset 'huge'; choose one of tiny, "):
        build_configs("huge", {})


def test_config_validation_errors_pass_through():
    with pytest.raises(ValueError, match=r"top_k \(17\) must be <= num_experts \(16\)"):
        configs("--model.top_k", "17")


def test_train_command_reports_a_bad_key_and_exits_2(capsys):
    assert main(["train", "--model.bogus", "1", "--no-progress"]) == 2
    assert "--model.bogus" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "prepare", "eval", "generate", "bench", "routers"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
