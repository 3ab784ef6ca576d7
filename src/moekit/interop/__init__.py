"""Hugging Face interop (load_hf / save_hf, `moekit convert`) and parameter accounting
(count_by_part, `moekit inspect`); see docs/interop.md."""

from .accounting import PARTS, Accounting, count_by_part
from .convert import convert
from .hf import load_hf, save_hf
from .hf_config import ARCHITECTURES, hf_config, model_config_from_hf

__all__ = [
    "ARCHITECTURES",
    "PARTS",
    "Accounting",
    "convert",
    "count_by_part",
    "hf_config",
    "load_hf",
    "model_config_from_hf",
    "save_hf",
]
