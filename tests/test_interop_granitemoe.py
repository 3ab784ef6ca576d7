"""IBM Granite 3.x MoE (granitemoe) beyond the contract suite: the config mapping (shared
with granitemoeshared, less the shared MLP), the refusals, a shared expert refused on
writing, the on-disk and in-memory layouts, and the flagships against their model cards."""

from __future__ import annotations

import dataclasses

import builders
import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit.interop import ARCHITECTURES, choose_architecture, hf_config, load_hf, save_hf
from moekit.interop.inspect import inspect_target
from moekit.models import Transformer, count_parameters, presets

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = ARCHITECTURES["granitemoe"]
COMMON = builders.COMMON | dict(num_hidden_layers=2)  # the contract's sizes, two layers
TOKENS_BT = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(2))


def _hf_config(**overrides):
    return transformers.GraniteMoeConfig(**(COMMON | ARCH.tiny | overrides))


def _hf_model(**overrides):
    return builders.hf_model("granitemoe", num_hidden_layers=2, **overrides)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS_BT).logits


def test_config_maps_multipliers_and_router_without_a_shared_expert():
    config = ARCH.to_moekit(_hf_config().to_dict())
    assert (config.d_model, config.num_layers, config.num_heads, config.num_kv_heads) == (
        32,
        2,
        4,
        2,
    )
    assert config.embedding_multiplier == 2.0 and config.residual_multiplier == 0.5
    assert config.attention_multiplier == 0.2 and config.logits_scaling == 4.0
    assert config.qkv_bias and config.attn_out_bias and config.tied_embeddings
    assert config.moe_layers == [0, 1]
    moe = config.moe
    assert (moe.router, moe.renormalize, moe.num_experts, moe.top_k, moe.d_hidden) == (
        "softmax_topk",
        True,
        4,
        2,
        16,
    )
    assert moe.num_shared_experts == 0
    assert moe.balance_loss_coef == pytest.approx(0.001 * 2)  # router_aux_loss_coef * top_k


def test_transformers_defaults_and_an_ignored_shared_intermediate_size():
    hf = {k: v for k, v in _hf_config().to_dict().items() if "multiplier" not in k}
    hf.pop("logits_scaling")
    hf["shared_intermediate_size"] = 64  # not a GraniteMoeConfig key: transformers ignores it
    config = ARCH.to_moekit(hf)
    assert config.moe.num_shared_experts == 0
    assert (config.embedding_multiplier, config.residual_multiplier, config.logits_scaling) == (
        1.0,
        1.0,
        1.0,
    )
    assert config.attention_multiplier == 1.0  # transformers' default, not 1/sqrt(head_dim)
    written = hf_config(config, "granitemoe")
    assert "shared_intermediate_size" not in written
    assert written["architectures"] == ["GraniteMoeForCausalLM"]


def test_unsupported_options_are_refused_together():
    hf = _hf_config(hidden_act="gelu", attention_dropout=0.1).to_dict()
    hf["rope_parameters"] = {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}
    hf["residual_multiplier"] = 0.0
    with pytest.raises(ValueError, match="granitemoe config.json") as error:
        ARCH.to_moekit(hf)
    message = str(error.value)
    for part in ("hidden_act 'gelu'", "attention_dropout 0.1", "rope type 'linear'"):
        assert part in message
    assert "residual_multiplier 0.0" in message


def test_a_shared_expert_is_not_written_as_granitemoe():
    tiny = presets.tiny()  # one shared expert of width 256
    problems = "; ".join(ARCH.inexpressible(tiny))
    assert "num_shared_experts 1" in problems
    with pytest.raises(ValueError, match="granitemoe architecture cannot express"):
        hf_config(tiny, "granitemoe")
    assert choose_architecture(tiny) != "granitemoe"
    routed_only = dataclasses.replace(
        tiny, moe=dataclasses.replace(tiny.moe, num_shared_experts=0, d_shared_hidden=None)
    )
    assert ARCH.inexpressible(routed_only) == []
    layered = dataclasses.replace(routed_only, first_dense_layers=1, norm="layer")
    problems = "; ".join(ARCH.inexpressible(layered))
    assert "dense layers [0]" in problems and "norm 'layer'" in problems


def test_save_pretrained_writes_the_checkpoint_names_and_save_hf_the_same(tmp_path):
    model = _hf_model()
    model.save_pretrained(tmp_path / "hf")
    keys = set(load_file(tmp_path / "hf" / "model.safetensors"))
    layer = "model.layers.0"
    assert {
        f"{layer}.block_sparse_moe.input_linear.weight",
        f"{layer}.block_sparse_moe.output_linear.weight",
        f"{layer}.block_sparse_moe.router.layer.weight",
    } <= keys
    assert not any("shared_mlp" in key or "gate_up_proj" in key for key in keys)
    ours = load_hf(tmp_path / "hf")
    torch.testing.assert_close(_logits(ours), _logits(model), atol=1e-4, rtol=0)
    save_hf(ours, tmp_path / "out", architecture="granitemoe")
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == keys


def test_a_folder_with_transformers_in_memory_names_loads(tmp_path):
    model = _hf_model()
    model.save_pretrained(tmp_path / "hf")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert "model.layers.0.block_sparse_moe.experts.gate_up_proj" in state
    save_file(state, tmp_path / "hf" / "model.safetensors")  # the in-memory (fused) names
    assert ARCH.stored_layout({}, state) == "fused"
    torch.testing.assert_close(_logits(load_hf(tmp_path / "hf")), _logits(model), atol=1e-4, rtol=0)


def test_a_routed_only_moekit_model_reloads_in_transformers(tmp_path):
    tiny = presets.tiny()
    config = dataclasses.replace(
        tiny,
        embedding_multiplier=3.0,
        residual_multiplier=0.7,
        attention_multiplier=0.05,
        logits_scaling=2.5,
        moe=dataclasses.replace(tiny.moe, num_shared_experts=0, d_shared_hidden=None),
    )
    torch.manual_seed(0)
    model = Transformer(config).eval()
    save_hf(model, tmp_path / "out", architecture="granitemoe")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(theirs).__name__ == "GraniteMoeForCausalLM"
    tokens_BT = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(tokens_BT).logits, model(tokens_BT).logits, atol=1e-4, rtol=0
        )


def test_flagships_against_the_model_cards():
    """The cards' 3.3B / 800M and 1.3B / 400M (granitemoe.py): the 3B total within 1%, the
    1B total rounding to the card's two digits; the active figures leave out the tied
    embedding table (V x D), counted by moekit as the always-active head."""
    big, small = ARCH.flagships["granite_3_1_3b_a800m"](), ARCH.flagships["granite_3_1_1b_a400m"]()
    assert (big.d_model, big.num_layers, big.moe.num_experts, big.moe.top_k) == (1536, 32, 40, 8)
    assert (small.d_model, small.num_layers, small.moe.num_experts) == (1024, 24, 32)
    assert big.tied_embeddings and big.vocab_size == small.vocab_size == 49155
    assert big.attention_multiplier == 0.015625  # 1 / head_dim (muP), not head_dim ** -0.5
    (big_total, big_active), (small_total, small_active) = map(count_parameters, (big, small))
    assert big_total == 3_298_793_472 and round(small_total / 1e9, 1) == 1.3
    assert round((big_active - 49155 * 1536) / 1e8) == 8
    assert round((small_active - 49155 * 1024) / 1e8) == 4
    assert abs(inspect_target("granite_3_1_3b_a800m")["published"]["total_error"]) < 0.01
