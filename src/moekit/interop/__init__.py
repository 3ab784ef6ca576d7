"""Hugging Face interop (load_hf / save_hf, `moekit convert`) and parameter accounting."""

from .hf import load_hf, save_hf
from .hf_config import ARCHITECTURES, hf_config, model_config_from_hf

__all__ = ["ARCHITECTURES", "hf_config", "load_hf", "model_config_from_hf", "save_hf"]
