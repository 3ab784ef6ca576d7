"""`--preset NAME` plus dotted overrides: `--model.num_experts 16 --train.lr 3e-4`.

Keys:
    model.FIELD       a ModelConfig field; for an MoE preset also any MoEConfig field that
                      ModelConfig lacks (model.num_experts, model.top_k, model.router, ...).
                      model.d_model sets the MoE layer's d_model too.
    model.moe.FIELD   a MoEConfig field, explicitly (model.moe.d_hidden is the expert width,
                      model.d_hidden the dense FFN width).
    train.FIELD       a TrainConfig field.
Values are parsed by the field's type (int, float, bool, str, or "none" where None is
allowed); an unknown key or a value of the wrong type is a ValueError naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing

from ..config import MoEConfig
from ..models import PRESETS, ModelConfig
from ..routing import check_balance_scope, router_class
from .config import TrainConfig

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_overrides(args: list[str]) -> dict[str, str]:
    """Pair up `--key value` and `--key=value` arguments into {key: raw value}.

    Args:
        args: the arguments argparse did not recognise.
    Returns:
        Raw string values by dotted key, in order.
    """
    overrides: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ValueError(f"unrecognised argument {arg!r}; overrides look like --model.top_k 2")
        key, has_value, value = arg[2:].partition("=")
        if not has_value:
            if i + 1 >= len(args):
                raise ValueError(f"--{key} needs a value")
            value, i = args[i + 1], i + 1
        overrides[key] = value
        i += 1
    return overrides


def build_configs(preset: str, overrides: dict[str, str]) -> tuple[ModelConfig, TrainConfig]:
    """The preset's ModelConfig and the default TrainConfig with overrides applied.

    Args:
        preset: a name in moekit.models.PRESETS.
        overrides: {dotted key: raw value} from parse_overrides.
    Returns:
        (model_config, train_config), validated by their __post_init__.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return apply_overrides(PRESETS[preset](), overrides, label=f"the preset {preset!r}")


def apply_overrides(
    model: ModelConfig,
    overrides: dict[str, str],
    *,
    label: str = "the model",
    train_defaults: dict | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """model with the model.* overrides, and a TrainConfig with the train.* ones.

    Args:
        model: the config to start from (a preset's, or a fine-tuning base's).
        overrides: {dotted key: raw value} from parse_overrides.
        label: what model is, for the error of an MoE setting on a dense model.
        train_defaults: TrainConfig fields that replace its defaults (before the overrides).
    Returns:
        (model_config, train_config), validated by their __post_init__.
    """
    model_changes, moe_changes, train_changes = {}, {}, dict(train_defaults or {})
    for key, raw in overrides.items():
        section, _, name = key.partition(".")
        if section == "train":
            train_changes[name] = parse_setting(TrainConfig, name, raw, key)
        elif section == "model" and name.startswith("moe."):
            moe_changes[name[4:]] = parse_setting(MoEConfig, name[4:], raw, key, model.moe, label)
        elif section == "model" and name in _fields(ModelConfig):
            model_changes[name] = parse_setting(ModelConfig, name, raw, key)
        elif section == "model" and name in _fields(MoEConfig):
            moe_changes[name] = parse_setting(MoEConfig, name, raw, key, model.moe, label)
        else:
            raise ValueError(
                f"unknown setting --{key}{_did_you_mean(key, model)}; "
                "keys are model.FIELD, model.moe.FIELD, train.FIELD"
            )
    if model.moe is not None and "d_model" in model_changes:
        moe_changes.setdefault("d_model", model_changes["d_model"])
    if moe_changes:
        model_changes["moe"] = dataclasses.replace(model.moe, **moe_changes)
        # What the router checks when the model is built, before any data is prepared.
        moe = model_changes["moe"]
        check_balance_scope(router_class(moe.router), moe)
    return dataclasses.replace(model, **model_changes), TrainConfig(**train_changes)


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _did_you_mean(key: str, model: ModelConfig | MoEConfig | None) -> str:
    """ "(did you mean --model.num_experts?)" for the setting closest to key, or "" (also
    when the closest is an MoE setting and the model is dense)."""
    moe_fields = _fields(MoEConfig)
    moe_keys = [f"model.moe.{name}" for name in moe_fields]
    moe_keys += [f"model.{name}" for name in moe_fields - _fields(ModelConfig)]
    keys = [f"train.{name}" for name in _fields(TrainConfig)]
    keys += [f"model.{name}" for name in _fields(ModelConfig) - {"moe"}]
    close = difflib.get_close_matches(key, keys + moe_keys, n=1, cutoff=0.7)
    has_moe = isinstance(model, MoEConfig) or getattr(model, "moe", None) is not None
    if not close or (close[0] in moe_keys and not has_moe):
        return ""
    return f" (did you mean --{close[0]}?)"


def parse_setting(
    cls, name: str, raw: str, key: str, moe: MoEConfig | None = None, label: str = "the model"
):
    """Convert raw to the type of the dataclass field cls.name; errors name the key.

    Args:
        cls: ModelConfig, MoEConfig or TrainConfig.
        name: the field.
        raw: the value as typed.
        key: the dotted key as typed (for the error messages).
        moe, label: for MoEConfig fields, the model's MoE config (None: a dense model) and
            what the model is ("the preset 'tiny'").
    """
    if cls is MoEConfig and moe is None:
        raise ValueError(f"--{key}: {label} is dense (it has no MoE layers)")
    if name not in _fields(cls) or name == "moe":
        raise ValueError(f"unknown setting --{key}{_did_you_mean(key, moe)}")
    hint = typing.get_type_hints(cls)[name]
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in options and raw.lower() in ("none", "null"):
        return None
    for kind in (bool, int, float, str):
        if kind in options:
            return _convert(kind, raw, key)
    if list[int] in options:  # layer lists: "0,2" (an empty string is the empty list)
        return [_convert(int, item.strip(), key) for item in raw.split(",") if item.strip()]
    raise ValueError(f"--{key} cannot be set from the command line")


def _convert(kind: type, raw: str, key: str):
    if kind is bool:
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise ValueError(f"--{key} expects true or false, got {raw!r}")
    if kind is str:
        return raw
    try:
        return kind(raw)
    except ValueError:
        name = "an integer" if kind is int else "a number"
        raise ValueError(f"--{key} expects {name}, got {raw!r}") from None
