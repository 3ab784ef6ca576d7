"""A moekit model's LoRA adapters as a PEFT adapter folder for the model save_hf writes.

# E experts, D model, F expert hidden, H = 2F (gate and up halves), r rank

The folder holds adapter_config.json and adapter_model.safetensors, as peft's
save_pretrained writes them, so that
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir), adapter_dir)
computes the adapted model. How each moekit adapter is written:

- attention q/k/v/o: PEFT's LoRA on q_proj, k_proj, v_proj, o_proj (target_modules), the
  same lora_A (r, in) and lora_B (out, r).
- shared experts: moekit's fused up (2F, D) is transformers' gate_proj and up_proj, so its
  lora_A goes to both and lora_B's halves to each; down to down_proj.
- routed experts: transformers 5 holds them as 3-D parameters, gate_up_proj (E, H, D) and
  down_proj (E, D, F), which PEFT adapts with `target_parameters` (lora.ParamWrapper): one
  lora_A (E*r, in) whose rows are expert-major (row e*r + j), one lora_B (out, r*E) whose
  columns are rank-major (column j*E + e), and the delta of expert e is
  s * B_e @ A_e (out, in). Ours are A_up (E, D, r) and B_up (E, r, H) with delta
  s * A_up[e] @ B_up[e] (D, H), the transpose: so A = A_up^T stacked, B = B_up^T laid out.
- router: the gate weight (E, D), a 2-D `target_parameters` entry.

PEFT's adapters on parameters have no dropout (lora.ParamWrapper refuses it): dropout only
acts in training, so with experts or router adapted the folder records lora_dropout 0, and
the adapted function is the same.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from ..models import Transformer
from ..models.lora import LoRAConfig, lora_state_dict
from .hf_config import hf_config

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model.model.layers"
_ATTENTION = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
# PEFT nests the two ParamWrappers of one experts module in the order the module registers
# its parameters: gate_up_proj's wrapper holds the module, down_proj's wraps that wrapper,
# so gate_up_proj's factors sit one `base_layer` deeper.
_EXPERT_PARAMS = {"up": ("gate_up_proj", ".base_layer"), "down": ("down_proj", "")}


def peft_tensors(model: Transformer) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """The adapters under PEFT's names, and the target_modules and target_parameters.

    Raises:
        ValueError: an adapter with no place in PEFT's format, named.
    """
    tensors: dict[str, Tensor] = {}
    modules: set[str] = set()
    parameters: set[str] = set()
    adapters = lora_state_dict(model)
    for name, tensor in adapters.items():
        parts = name.split(".")
        if parts[0] != "layers":
            raise ValueError(f"PEFT cannot express the adapter {name!r}")
        layer, where = parts[1], ".".join(parts[2:])
        prefix = f"{_PREFIX}.{layer}"
        if parts[2] == "attn" and parts[3] in _ATTENTION and len(parts) == 5:
            target = f"self_attn.{_ATTENTION[parts[3]]}"
            tensors[f"{prefix}.{target}.{parts[4]}.weight"] = tensor
            modules.add(target)
        elif where.startswith("ffn.shared.") and len(parts) == 6:
            _shared(tensors, modules, prefix, parts[4], parts[5], tensor)
        elif where.startswith("ffn.experts.lora_"):
            _experts(tensors, parameters, prefix, parts[4], tensor)
        elif where.startswith("ffn.router.parametrizations.weight.0.lora_"):
            tensors[f"{prefix}.mlp.gate.{parts[-1]}.weight"] = tensor
            parameters.add("mlp.gate.weight")
        else:
            raise ValueError(f"PEFT cannot express the adapter {name!r}")
    return tensors, sorted(modules), sorted(parameters)


def _shared(tensors, modules, prefix: str, which: str, factor: str, tensor: Tensor) -> None:
    base = f"{prefix}.mlp.shared_expert"
    if which == "down":
        tensors[f"{base}.down_proj.{factor}.weight"] = tensor
        modules.add("shared_expert.down_proj")
        return
    # moekit's up is [gate; up] stacked on the output axis: A is shared, B splits in halves.
    gate_part, up_part = (tensor, tensor) if factor == "lora_A" else tensor.chunk(2, dim=0)
    tensors[f"{base}.gate_proj.{factor}.weight"] = gate_part.clone()  # owned: no shared storage
    tensors[f"{base}.up_proj.{factor}.weight"] = up_part.clone()
    modules.update(("shared_expert.gate_proj", "shared_expert.up_proj"))


def _experts(tensors, parameters, prefix: str, factor_name: str, tensor: Tensor) -> None:
    factor, which = factor_name.removeprefix("lora_").split("_")  # "A_up" -> ("A", "up")
    param, nesting = _EXPERT_PARAMS[which]
    E, rows, cols = tensor.shape
    if factor == "A":  # (E, in, r) -> (E*r, in), expert-major rows
        peft = tensor.transpose(1, 2).reshape(E * cols, rows)
    else:  # (E, r, out) -> (out, r*E), rank-major columns
        peft = tensor.permute(2, 1, 0).reshape(cols, rows * E)
    tensors[f"{prefix}.mlp.experts{nesting}.lora_{factor}.weight"] = peft.contiguous()
    parameters.add(f"mlp.experts.{param}")


def save_peft(
    model: Transformer,
    path: str | Path,
    config: LoRAConfig,
    *,
    base_model: str | None = None,
) -> Path:
    """Write model's adapters as a PEFT LoRA folder for the model save_hf writes.

    Args:
        model: a moekit Transformer with adapters (models.lora.add_lora).
        path: the folder to create (it must not exist, or be empty).
        config: the adapters' LoRAConfig (rank, alpha, dropout).
        base_model: recorded as base_model_name_or_path (the save_hf folder, say).
    Returns:
        The folder, written beside and renamed into place.
    Raises:
        ValueError: a base save_hf cannot write, or an adapter PEFT cannot express (named);
            no adapters; a non-empty path.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{str(path)!r} exists and is not an empty folder")
    hf_config(model.config)  # the base must have a Hugging Face form (ValueError naming why)
    tensors, modules, parameters = peft_tensors(model)
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save")
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": 0.0 if parameters else config.dropout,
        "target_modules": modules,
        "target_parameters": parameters or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2), encoding="utf-8")
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
