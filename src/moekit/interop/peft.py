"""A moekit model's LoRA adapters as a PEFT adapter folder for the model save_hf writes.

# E experts, D model, F expert hidden, H = 2F (gate and up halves), r rank

The folder holds adapter_config.json and adapter_model.safetensors, as peft's
save_pretrained writes them, so that
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir), adapter_dir)
computes the adapted model. How each moekit adapter is written:

- attention: PEFT's LoRA on the projections (target_modules), the same lora_A (r, in) and
  lora_B (out, r): q_proj, k_proj, v_proj, o_proj (their biases stay in PEFT's base layer);
  for multi-head latent attention (DeepSeek) wq -> q_proj, wq_down -> q_a_proj,
  wq_up -> q_b_proj, wkv_down -> kv_a_proj_with_mqa, wkv_up -> kv_b_proj, wo -> o_proj.
  save_hf reorders the rotary output rows of q_proj / q_b_proj and kv_a_proj_with_mqa
  (moekit's halves -> DeepSeek's interleaved pairs, rules.rope_rows): lora_B's rows
  are those outputs, so they get the same reordering; lora_A (the inputs) is unchanged.
- shared experts: moekit's fused up (2F, D) is transformers' gate_proj and up_proj, so its
  lora_A goes to both and lora_B's halves to each; down to down_proj. For DeepSeek they are
  `target_parameters` entries (shared_experts.gate_proj.weight, ...; a 2-D ParamWrapper
  computes the same s * B @ A): PEFT rewrites a DeepSeek adapter's target_modules ending in
  gate_proj, up_proj or down_proj as transformers 4's per-expert names, moving them onto
  the routed experts' fused gate_up_proj / down_proj with a doubled rank.
- routed experts: transformers 5 holds them as 3-D parameters, which PEFT adapts with
  `target_parameters` (lora.ParamWrapper): gate_up_proj (E, H, D) and down_proj (E, D, F)
  in Mixtral's orientation, or gate_up_proj (E, D, H) and down_proj (E, F, D) in gpt-oss's
  (its experts say is_transposed). Either way PEFT holds one lora_A (E*r, in) whose rows
  are expert-major (row e*r + j), one lora_B (out, r*E) whose columns are rank-major
  (column j*E + e), and the delta of expert e is s * B_e @ A_e (out, in), transposed to the
  parameter's orientation. Ours are A_up (E, D, r) and B_up (E, r, H) with delta
  s * A_up[e] @ B_up[e] (D, H), the transpose: so A = A_up^T stacked, B = B_up^T laid out.
  gpt-oss interleaves gate and up in gate_up_proj's H columns (moekit keeps halves), so
  B_up's output columns are interleaved as save_hf interleaves w_up's.
- router: the gate weight (E, D), a 2-D `target_parameters` entry (mlp.gate.weight;
  gpt-oss: mlp.router.weight, its bias staying in the base).

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
from .architectures import get, hf_config
from .architectures.rules import COPY, LAYER, Rule

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model.model.layers"


def _module(rule: Rule, index: int = 0) -> str:
    """The module path of a rule's Hugging Face tensor inside a layer: `self_attn.q_proj`
    for model.layers.{i}.self_attn.q_proj.weight."""
    return rule.hf[index].removeprefix(f"{LAYER}.").rsplit(".", 1)[0]


class _Names:
    """Where one architecture keeps what moekit adapts, read from its key table (the
    `fused` layout: transformers' in-memory names, which PEFT adapts), and how the output
    rows of each attention projection are reordered on save (the weight's row op)."""

    def __init__(self, model: Transformer, architecture: str | None):
        config = hf_config(model.config, architecture)  # ValueError naming what it cannot express
        self.arch = get(config["model_type"])
        table = self.arch.tables(model.config, config)["fused"]
        self.rules = {rule.moekit: rule for rule in table}

    def rule(self, moekit: str, adapter: str) -> Rule:
        if moekit not in self.rules:
            raise ValueError(f"PEFT cannot express the adapter {adapter!r} ({self.arch.name})")
        return self.rules[moekit]

    def attention(self, projection: str, adapter: str) -> tuple[str, Rule]:
        rule = self.rule(f"layers.{{i}}.attn.{projection}.weight", adapter)
        return _module(rule), rule

    def output_rows(self, rule: Rule, lora_B: Tensor) -> Tensor:
        """lora_B (out, r) with its rows in the order save_hf writes the weight's rows."""
        return rule.op.to_hf(lora_B)[0] if rule.op is not COPY else lora_B


def peft_tensors(
    model: Transformer, architecture: str | None = None
) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """The adapters under PEFT's names, and the target_modules and target_parameters.

    Args:
        model: a moekit Transformer with adapters.
        architecture: the Hugging Face architecture save_hf writes (None: its choice).
    Raises:
        ValueError: an adapter with no place in PEFT's format, named; a base the
            architecture cannot express.
    """
    names = _Names(model, architecture)
    tensors: dict[str, Tensor] = {}
    modules: set[str] = set()
    parameters: set[str] = set()
    for name, tensor in lora_state_dict(model).items():
        parts = name.split(".")
        if parts[0] != "layers" or len(parts) < 5:
            raise ValueError(f"PEFT cannot express the adapter {name!r}")
        layer, where = parts[1], ".".join(parts[2:])
        prefix = f"{_PREFIX}.{layer}"
        if parts[2] == "attn" and len(parts) == 5:
            target, rule = names.attention(parts[3], name)
            if parts[4] == "lora_B":
                tensor = names.output_rows(rule, tensor)
            tensors[f"{prefix}.{target}.{parts[4]}.weight"] = tensor.contiguous()
            modules.add(target)
        elif where.startswith("ffn.shared.") and len(parts) == 6:
            rule = names.rule(f"layers.{{i}}.ffn.shared.{parts[4]}.weight", name)
            # DeepSeek's as parameters, naming the weight (see the module doc)
            as_parameters = names.arch.shared_as_parameters
            targets, suffix = (parameters, ".weight") if as_parameters else (modules, "")
            _shared(tensors, targets, suffix, prefix, rule, parts[5], tensor)
        elif where.startswith("ffn.experts.lora_"):
            if parts[4] == "lora_B_up":
                tensor = names.arch.peft_expert_columns(tensor)
            which = "up" if parts[4].endswith("_up") else "down"
            rule = names.rule(f"layers.{{i}}.ffn.experts.w_{which}", name)
            _experts(tensors, parameters, prefix, parts[4], tensor, _module(rule), rule.hf[0])
        elif where.startswith("ffn.router.parametrizations.weight.0.lora_"):
            router = _module(names.rule("layers.{i}.ffn.router.weight", name))
            tensors[f"{prefix}.{router}.{parts[-1]}.weight"] = tensor
            parameters.add(f"{router}.weight")
        else:
            raise ValueError(f"PEFT cannot express the adapter {name!r}")
    return tensors, sorted(modules), sorted(parameters)


def _shared(
    tensors, targets, suffix: str, prefix: str, rule: Rule, factor: str, tensor: Tensor
) -> None:
    """One shared-expert factor; its targets + suffix go to targets. moekit's up is
    [gate; up] stacked on the output axis: stored as two projections (FUSE_GLU), A is
    shared and B splits in halves; stored as one, both go as they are."""
    paths = [_module(rule, k) for k in range(len(rule.hf))]
    pieces = [tensor] if len(paths) == 1 else [tensor] * 2
    if len(paths) == 2 and factor == "lora_B":
        pieces = list(tensor.chunk(2, dim=0))
    for path, piece in zip(paths, pieces):
        tensors[f"{prefix}.{path}.{factor}.weight"] = piece.clone()  # owned: no shared storage
        targets.add(f"{path.rsplit('.', 2)[-2]}.{path.rsplit('.', 1)[-1]}{suffix}")


def _experts(
    tensors, parameters, prefix: str, factor_name: str, tensor: Tensor, module: str, param: str
) -> None:
    """One routed-experts factor as PEFT's ParamWrapper holds it. PEFT nests the two
    wrappers of one experts module in the order the module registers its parameters: the
    up projection's wrapper holds the module, the down projection's wraps that wrapper, so
    the up projection's factors sit one `base_layer` deeper."""
    factor, which = factor_name.removeprefix("lora_").split("_")  # "A_up" -> ("A", "up")
    nesting = ".base_layer" if which == "up" else ""
    E, rows, cols = tensor.shape
    if factor == "A":  # (E, in, r) -> (E*r, in), expert-major rows
        peft = tensor.transpose(1, 2).reshape(E * cols, rows)
    else:  # (E, r, out) -> (out, r*E), rank-major columns
        peft = tensor.permute(2, 1, 0).reshape(cols, rows * E)
    tensors[f"{prefix}.{module}{nesting}.lora_{factor}.weight"] = peft.contiguous()
    parameters.add(param.removeprefix(f"{LAYER}."))


def save_peft(
    model: Transformer,
    path: str | Path,
    config: LoRAConfig,
    *,
    base_model: str | None = None,
    architecture: str | None = None,
) -> Path:
    """Write model's adapters as a PEFT LoRA folder for the model save_hf writes.

    Args:
        model: a moekit Transformer with adapters (models.lora.add_lora).
        path: the folder to create (it must not exist, or be empty).
        config: the adapters' LoRAConfig (rank, alpha, dropout).
        base_model: recorded as base_model_name_or_path (the save_hf folder, say).
        architecture: the one given to save_hf for the base (None: save_hf's choice).
    Returns:
        The folder, written beside and renamed into place.
    Raises:
        ValueError: a base save_hf cannot write, or an adapter PEFT cannot express (named);
            no adapters; a non-empty path.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{str(path)!r} exists and is not an empty folder")
    tensors, modules, parameters = peft_tensors(model, architecture)
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
