"""DeepSeek-V3 (model_type deepseek_v3): DeepSeek-AI 2024 (arXiv:2412.19437); also R1.

DeepSeek-V2's decoder (deepseek_v2.py) with sigmoid scores plus e_score_correction_bias
for the selection only; n_group groups scored by the sum of their two best biased scores;
weights renormalised (norm_topk_prob) and times routed_scaling_factor -> moekit's
sigmoid_topk. The rotary dims are interleaved when rope_interleave (its default).

Multi-token prediction: the checkpoint stores num_nextn_predict_layers MTP modules as the
layers after the last decoder layer, model.layers.{L + k}: a decoder layer plus enorm,
hnorm, eh_proj, shared_head.norm, and copies of the embedding (embed_tokens) and of the
head (shared_head.head). load_hf skips them by default, as transformers does; with mtp=True
they become moekit's mtp.{k} (models/mtp.py). save_hf writes a model's MTP modules there,
with the copies. FP8 block-quantised weights are dequantized by the loader (interop/fp8.py).
"""

from __future__ import annotations

import dataclasses

from ...models import ModelConfig
from .base import HFConfig, Published, trailing_layers
from .deepseek_v2 import DeepseekV2
from .rules import Rule


class DeepseekV3(DeepseekV2):
    name = "deepseek_v3"
    hf_class = "DeepseekV3ForCausalLM"
    priority = 5
    router = "sigmoid_topk"
    defaults = dict(
        rope_theta=1e4,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        first_k_dense_replace=3,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        n_group=8,
        topk_group=4,
        norm_topk_prob=True,
        q_lora_rank=1536,
    )
    original_code = dict(scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1)
    tiny = {
        **{k: v for k, v in DeepseekV2.tiny.items() if k != "topk_method"},
        "routed_scaling_factor": 2.5,
    }
    # published figures only: the flagship's count (interop/famous.py) adds its MTP module
    flagships = {}
    published = {
        "deepseek_v3": Published(
            671e9,
            37e9,
            "DeepSeek-AI, DeepSeek-V3 Technical Report (arXiv:2412.19437), abstract",
            active_without_input_embedding=True,
        )
    }

    def refuse_routing(self, hf: HFConfig) -> None:
        if hf["n_routed_experts"] // (hf.get("n_group") or 1) < 2:
            hf.refuse(f"n_group {hf.get('n_group')} (groups need two experts to be scored)")

    def num_groups(self, hf: HFConfig) -> int:
        return hf.get("n_group") or 1

    def routing_problems(self, config: ModelConfig) -> list[str]:
        moe = config.moe
        if moe.num_experts // moe.num_groups < 2:
            return [f"num_groups {moe.num_groups} (groups of one expert cannot be scored)"]
        return []

    def hf_keys(self, config: ModelConfig) -> dict:
        return {"rope_interleave": True, "num_nextn_predict_layers": config.mtp_depth}

    def load_options(self, config: ModelConfig, hf: dict, *, mtp: bool) -> ModelConfig:
        if not mtp:
            return config
        return dataclasses.replace(config, mtp_depth=hf.get("num_nextn_predict_layers") or 0)

    def rope_interleaved(self, hf: dict) -> bool:
        return bool(hf.get("rope_interleave", True))

    def tables(self, config: ModelConfig, hf: dict) -> dict[str, tuple[Rule, ...]]:
        tables = super().tables(config, hf)
        return {layout: mtp_rules(config, rules) + rules for layout, rules in tables.items()}

    def unloaded_prefixes(self, hf: dict) -> tuple[str, ...]:
        """The MTP layers, stored after the last decoder layer (transformers does not load
        them either)."""
        return trailing_layers(hf, hf.get("num_nextn_predict_layers"))


def mtp_rules(config: ModelConfig, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """The key table of the MTP modules, made from a model's per-layer rules.

    Module k is the checkpoint's layer L + k: its decoder layer maps as the main layers do
    (mtp.{k}.block.* <- model.layers.{L + k}.*). The copies of the embedding and head come
    first, so that on load the main model's own tensors (later in the table) win.
    """
    out: list[Rule] = []
    for k in range(config.mtp_depth):
        layer = f"model.layers.{config.num_layers + k}"
        out += [
            Rule("tok_embed.weight", (f"{layer}.embed_tokens.weight",)),
            Rule("lm_head.weight", (f"{layer}.shared_head.head.weight",)),
            Rule(f"mtp.{k}.embed_norm.weight", (f"{layer}.enorm.weight",)),
            Rule(f"mtp.{k}.hidden_norm.weight", (f"{layer}.hnorm.weight",)),
            Rule(f"mtp.{k}.proj.weight", (f"{layer}.eh_proj.weight",)),
            Rule(f"mtp.{k}.norm.weight", (f"{layer}.shared_head.norm.weight",)),
        ]
        i = str(config.num_layers + k)
        out += [
            Rule(
                f"mtp.{k}.block." + rule.moekit.removeprefix("layers.{i}."),
                tuple(name.replace("{i}", i) for name in rule.hf),
                rule.op,
            )
            for rule in rules
            if rule.moekit.startswith("layers.{i}.")
        ]
    return tuple(out)
