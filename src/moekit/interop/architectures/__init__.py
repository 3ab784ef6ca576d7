"""The Hugging Face architectures moekit reads and writes: one file per family, one registry.

Every module of this package other than base.py and rules.py defines one or more
`Architecture` subclasses (base.py); the registry finds them when the package is imported,
so adding a family is adding its file (docs/interop.md, "Adding a family"). Nothing outside
this package compares architecture names: it asks the registry.
"""

from __future__ import annotations

import importlib
import pkgutil

from ...models import ModelConfig
from .base import Architecture, HFConfig, Published

_SHARED_MODULES = {"base", "rules"}


def _discover() -> dict[str, Architecture]:
    found: dict[str, Architecture] = {}
    for module_info in pkgutil.iter_modules(__path__):
        if module_info.name in _SHARED_MODULES or module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, Architecture)
                and value.__module__ == module.__name__
                and "name" in vars(value)
            ):
                if value.name in found:
                    raise RuntimeError(f"two architectures named {value.name!r}")
                found[value.name] = value()
    return dict(sorted(found.items(), key=lambda item: (item[1].priority, item[0])))


ARCHITECTURES: dict[str, Architecture] = _discover()


def get(name: str) -> Architecture:
    """The registered architecture of that model_type; ValueError listing them otherwise."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def of_hf(hf: dict) -> Architecture:
    """The architecture of a config.json, checked against the registered ones."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {model_type!r} (config.json model_type, architectures "
            f"{hf.get('architectures')}); moekit reads {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def model_type_of(hf: dict) -> str:
    """The config's model_type, checked against the registered architectures."""
    return of_hf(hf).name


def model_config_from_hf(hf: dict) -> ModelConfig:
    """The moekit ModelConfig of a Hugging Face config.json (as a dict).

    Raises:
        ValueError: an unsupported model_type; or, in one message, every missing key and
            every option moekit cannot reproduce.
    """
    return of_hf(hf).to_moekit(hf)


def problems_by_architecture(config: ModelConfig) -> dict[str, list[str]]:
    """{architecture: what it cannot express of config}, fewest problems first (ties in
    registry order)."""
    if config.moe is None:
        raise ValueError(
            "a dense model (moe None) has no Hugging Face MoE architecture; moekit writes MoE "
            "models only"
        )
    problems = {name: arch.inexpressible(config) for name, arch in ARCHITECTURES.items()}
    return dict(sorted(problems.items(), key=lambda item: len(item[1])))


def choose_architecture(config: ModelConfig) -> str:
    """The architecture that writes config: of those that express it, the first in the
    registry's priority order; when none does, the closest (fewest problems), whose
    hf_config then names what to change."""
    problems = problems_by_architecture(config)
    return next(iter(problems))


def hf_config(
    config: ModelConfig, architecture: str | None = None, *, dtype: str = "float32"
) -> dict:
    """The Hugging Face config.json (as a dict) of a moekit config.

    Args:
        config: the moekit ModelConfig.
        architecture: a key of ARCHITECTURES, or None for choose_architecture's.
        dtype: the weights' dtype name, recorded in the config.
    Raises:
        ValueError: naming every setting the architecture cannot express (when it was
            chosen, also the next closest architectures and theirs).
    """
    by_architecture = problems_by_architecture(config)  # a dense model: its error
    name = next(iter(by_architecture)) if architecture is None else get(architecture).name
    problems = by_architecture[name]
    if problems:
        message = f"the {name} architecture cannot express: {'; '.join(problems)}"
        if architecture is None:
            message += _alternatives(by_architecture, name)
        raise ValueError(message)
    return get(name).to_hf(config, dtype)


def _alternatives(by_architecture: dict[str, list[str]], closest: str) -> str:
    others = [
        f"{name}: {'; '.join(problems)}"
        for name, problems in by_architecture.items()
        if name != closest
    ][:2]
    return (
        f" (the closest of {len(ARCHITECTURES)} architectures; change those settings, or see "
        f"the next closest: {' | '.join(others)})"
    )


__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "HFConfig",
    "Published",
    "get",
    "choose_architecture",
    "hf_config",
    "model_config_from_hf",
    "model_type_of",
    "of_hf",
    "problems_by_architecture",
]
