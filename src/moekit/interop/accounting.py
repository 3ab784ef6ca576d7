"""Parameter accounting by part: total and active per token, from a config alone.

Parts: embeddings (input table and output head; a tied pair counted once), attention
(projections and their biases), router, routed_experts, shared_experts, dense_ffn (the
FFN of dense layers), norms (every RMSNorm gain, q/k norms included), mtp (the
multi-token-prediction modules of a config with mtp_depth > 0, whole) and other (anything
else), so the parts always sum to the total. Active per token = every part in full except
the routed experts, of which each MoE layer contributes active_expert_fraction (top_k / E
for token choice). The model is built on the meta device: no weight is allocated, so a
671B-parameter config counts in well under a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..models import ModelConfig, active_expert_fraction, kv_cache_bytes_per_token, meta_model
from ..moe import MoE

PARTS = (
    "embeddings",
    "attention",
    "router",
    "routed_experts",
    "shared_experts",
    "dense_ffn",
    "norms",
    "mtp",
    "other",
)


@dataclass
class Accounting:
    """Parameters per part, total and active per token.

    input_embedding: the part of `embeddings` that is the input table alone (0 when tied:
    the table is also the head, so every token multiplies by it); some sources leave it
    out of the active count, since a token only looks up one row. excluded: modules deliberately left out of the totals, with their sizes (e.g.
    DeepSeek-V3's multi-token-prediction module); notes: what was counted, in words.
    kv_bytes_per_layer: bytes the KV cache holds per token and layer in bf16 (None where
    not known), over kv_layers layers.
    """

    name: str
    total: dict[str, int]
    active: dict[str, int]
    input_embedding: int = 0
    excluded: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    kv_bytes_per_layer: int | None = None
    kv_layers: int = 0

    @property
    def total_params(self) -> int:
        return sum(self.total.values())

    @property
    def active_params(self) -> int:
        return sum(self.active.values())

    def replace(self, part: str, total: int, active: int | None = None) -> None:
        """Set one part's counts (a part moekit's Transformer cannot build, such as MLA)."""
        self.total[part] = total
        self.active[part] = total if active is None else active

    def add(self, part: str, total: int, active: int | None = None) -> None:
        """Add parameters to one part (e.g. extra norms the Transformer does not have)."""
        self.total[part] += total
        self.active[part] += total if active is None else active

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "total": self.total_params,
            "active": self.active_params,
            "active_without_input_embedding": self.active_params - self.input_embedding,
            "input_embedding": self.input_embedding,
            "parts": {p: {"total": self.total[p], "active": self.active[p]} for p in PARTS},
            "excluded": self.excluded,
            "notes": self.notes,
            "kv_cache_bytes_per_token": None
            if self.kv_bytes_per_layer is None
            else {
                "per_layer": self.kv_bytes_per_layer,
                "layers": self.kv_layers,
                "total": self.kv_bytes_per_layer * self.kv_layers,
                "dtype": "bfloat16",
            },
        }


def _part_of(name: str) -> str:
    """The part a Transformer parameter belongs to, from its name."""
    if name.startswith("mtp."):
        return "mtp"
    if name.startswith(("tok_embed.", "lm_head.")):
        return "embeddings"
    if "norm" in name.rsplit(".", 2)[-2]:
        return "norms"
    if ".attn." in name:
        return "attention"
    if ".ffn.router." in name:
        return "router"
    if ".ffn.experts." in name:
        return "routed_experts"
    if ".ffn.shared" in name:
        return "shared_experts"
    if ".ffn.up." in name or ".ffn.down." in name:
        return "dense_ffn"
    return "other"


def count_by_part(config: ModelConfig, name: str = "model") -> Accounting:
    """Total and active-per-token parameters of a moekit config, split into PARTS.

    Args:
        config: the ModelConfig; built on the meta device, so any size costs no memory.
        name: a label for the result.
    Returns:
        The Accounting; its sums equal models.count_parameters(config).
    """
    model = meta_model(config)
    total = dict.fromkeys(PARTS, 0)
    inactive = dict.fromkeys(PARTS, 0.0)
    fractions = {
        f"{module_name}.experts.": active_expert_fraction(module.config)
        for module_name, module in model.named_modules()
        if isinstance(module, MoE)
    }
    for param_name, param in model.named_parameters():  # a tied head is listed once
        part = _part_of(param_name)
        total[part] += param.numel()
        if ".ffn.experts." in param_name:  # the main model's and the MTP modules' experts
            fraction = next(f for prefix, f in fractions.items() if param_name.startswith(prefix))
            inactive[part] += param.numel() * (1.0 - fraction)
    active = {part: total[part] - round(inactive[part]) for part in PARTS}
    notes = [
        "embeddings: input table and output head"
        + (
            " (tied: one matrix, counted once)"
            if config.tied_embeddings
            else " (untied: both counted)"
        )
    ]
    if config.mtp_depth:
        notes.append(
            f"mtp: {config.mtp_depth} multi-token-prediction module(s), active as in training "
            "(generation skips them: subtract the part for inference)"
        )
    input_embedding = 0 if config.tied_embeddings else config.vocab_size * config.d_model
    return Accounting(
        name=name,
        total=total,
        active=active,
        input_embedding=input_embedding,
        notes=notes,
        kv_bytes_per_layer=kv_cache_bytes_per_token(config) // config.num_layers,
        kv_layers=config.num_layers,
    )


def config_from_file(path: str | Path) -> tuple[ModelConfig, str]:
    """The ModelConfig in a moekit run directory / its config.json, or a Hugging Face config.json.

    Returns:
        (config, kind) with kind "moekit run" or "Hugging Face <model_type>".
    """
    from ..train.config import model_config_from_dict
    from .architectures import model_config_from_hf

    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read a config from {str(path)!r}: {error}") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        return model_config_from_dict(data["model"]), "moekit run"
    if isinstance(data, dict) and "model_type" in data:
        return model_config_from_hf(data), f"Hugging Face {data['model_type']}"
    raise ValueError(
        f"{str(file)!r} is neither a moekit run config (a 'model' section) nor a Hugging Face "
        "config.json (a 'model_type')"
    )
