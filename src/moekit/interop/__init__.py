"""Hugging Face interop (load_hf / save_hf, `moekit convert`) and parameter accounting
(count_by_part, `moekit inspect`); the architectures are a registry, one file per family
(interop/architectures/); see docs/interop.md."""

from .accounting import PARTS, Accounting, count_by_part
from .architectures import ARCHITECTURES, choose_architecture, hf_config, model_config_from_hf
from .convert import convert
from .hf import load_hf, save_hf

__all__ = [
    "ARCHITECTURES",
    "PARTS",
    "Accounting",
    "choose_architecture",
    "convert",
    "count_by_part",
    "hf_config",
    "load_hf",
    "model_config_from_hf",
    "save_hf",
]
