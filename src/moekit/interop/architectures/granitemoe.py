"""IBM Granite 3.x MoE (model_type granitemoe): GraniteMoE (Shen et al. 2024, "Power
Scheduler", arXiv:2408.13359), the Granite 3.0 / 3.1 1B-A400M and 3B-A800M models.

granitemoeshared (granitemoeshared.py) without the shared MLP, read and written by the same
code: the four multipliers to the ModelConfig fields of those names (an
attention_multiplier of head_dim ** -0.5 is moekit's None both ways), the router's softmax
over the top-k logits as renormalised softmax_topk, the fused SwiGLU experts, one
attention_bias switch for q/k/v and o_proj, every layer MoE, default rotary only. The same
two layouts: the original checkpoints' names that save_pretrained writes ("checkpoint") and
transformers' in-memory names ("fused", PEFT's names). A moekit config with a shared expert
is not written here (granitemoeshared writes it). transformers' GraniteMoe has no
shared_intermediate_size; a config.json naming one is read as transformers reads it, without
a shared MLP.
"""

from __future__ import annotations

from ...models import ModelConfig
from .base import Published, no_shared_expert
from .granitemoeshared import TABLES as _WITH_SHARED
from .granitemoeshared import GraniteMoeShared

_SHARED_KEY = "shared_intermediate_size"
TABLES = {
    layout: tuple(rule for rule in rules if ".ffn.shared." not in rule.moekit)
    for layout, rules in _WITH_SHARED.items()
}

# config.json of ibm-granite/granite-3.1-3b-a800m-instruct (Hugging Face Hub, main; the
# 3.0 models differ only in rope_theta 1e4, max_position_embeddings 4096, vocab 49152/49155
# and router_aux_loss_coef 0.001, none of which changes a count beyond the vocabulary's rows)
GRANITE_3_1_3B_A800M = dict(
    model_type="granitemoe",
    hidden_size=1536,
    intermediate_size=512,
    num_hidden_layers=32,
    num_attention_heads=24,
    num_key_value_heads=8,
    num_local_experts=40,
    num_experts_per_tok=8,
    vocab_size=49155,
    max_position_embeddings=131072,
    rope_theta=10000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    attention_bias=False,
    attention_dropout=0.0,
    hidden_act="silu",
    embedding_multiplier=12.0,
    residual_multiplier=0.22,
    attention_multiplier=0.015625,
    logits_scaling=6.0,
    router_aux_loss_coef=0.0,
)
# config.json of ibm-granite/granite-3.1-1b-a400m-instruct (Hugging Face Hub, commit 8290d32)
GRANITE_3_1_1B_A400M = GRANITE_3_1_3B_A800M | dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_local_experts=32,
    rope_theta=1500000.0,
)


def granite_3_1_3b_a800m() -> ModelConfig:
    """Granite 3.1 3B-A800M (3.3B total, 800M active), from its config.json."""
    return GraniteMoe().to_moekit(GRANITE_3_1_3B_A800M)


def granite_3_1_1b_a400m() -> ModelConfig:
    """Granite 3.1 1B-A400M (1.3B total, 400M active), from its config.json."""
    return GraniteMoe().to_moekit(GRANITE_3_1_1B_A400M)


_CARD = (
    "IBM, {name} model card (Hugging Face Hub ibm-granite/{name}, model architecture table: "
    "# Parameters, # Active parameters; Dec 2024)"
)


class GraniteMoe(GraniteMoeShared):
    name = "granitemoe"
    hf_class = "GraniteMoeForCausalLM"
    priority = 12
    # transformers 5.25's GraniteMoeConfig defaults: GraniteMoeSharedConfig's without the
    # shared MLP
    defaults = {k: v for k, v in GraniteMoeShared.defaults.items() if k != _SHARED_KEY}
    tiny = {k: v for k, v in GraniteMoeShared.tiny.items() if k != _SHARED_KEY}
    flagships = {
        "granite_3_1_3b_a800m": granite_3_1_3b_a800m,
        "granite_3_1_1b_a400m": granite_3_1_1b_a400m,
    }
    # The model cards' table: 3.3B / 800M and 1.3B / 400M. moekit counts 3,298,793,472
    # (-0.04%) and 1,334,628,352 (+2.7%, which the card's two digits round to 1.3B) total.
    # Active: 882.9M and 428.7M with the tied embedding table (the head's matmul); without
    # it (V x D = 75.5M, 50.3M) 807.4M and 378.3M, which round to the cards' one digit, so
    # the cards leave the table out of the active figure, which moekit's accounting of a
    # tied table (the head, always active) does not: the active figures are not within 1%.
    published = {
        "granite_3_1_3b_a800m": Published(
            3.3e9, 800e6, _CARD.format(name="granite-3.1-3b-a800m-base")
        ),
        "granite_3_1_1b_a400m": Published(
            1.3e9, 400e6, _CARD.format(name="granite-3.1-1b-a400m-base")
        ),
    }

    def to_moekit(self, hf: dict) -> ModelConfig:
        return super().to_moekit({k: v for k, v in hf.items() if k != _SHARED_KEY})

    def inexpressible(self, config: ModelConfig) -> list[str]:
        return super().inexpressible(config) + no_shared_expert(config)

    def hf_keys(self, config: ModelConfig) -> dict:
        keys = super().hf_keys(config)
        del keys[_SHARED_KEY]
        return keys

    def tables(self, config, hf):
        return TABLES
