"""IBM Granite MoE with a shared expert (granitemoeshared) beyond the contract suite: the
config mapping, the refusals, what a moekit config cannot be written as, the on-disk and
in-memory layouts, and moekit's tiny preset written as this family."""

from __future__ import annotations

import dataclasses
import math

import builders
import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit.config import MoEConfig
from moekit.interop import ARCHITECTURES, hf_config, load_hf, save_hf
from moekit.models import ModelConfig, Transformer, presets

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = ARCHITECTURES["granitemoeshared"]
COMMON = builders.COMMON | dict(num_hidden_layers=2)  # the contract's sizes, two layers
TOKENS_BT = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(2))


def _hf_dict(**overrides) -> dict:
    config = transformers.GraniteMoeSharedConfig(**(COMMON | ARCH.tiny | overrides))
    return config.to_dict()


def _hf_model(**overrides):
    return builders.hf_model("granitemoeshared", num_hidden_layers=2, **overrides)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS_BT).logits


def test_config_maps_multipliers_shared_mlp_and_router():
    config = ARCH.to_moekit(_hf_dict())
    assert (config.d_model, config.num_layers, config.num_heads, config.num_kv_heads) == (
        32,
        2,
        4,
        2,
    )
    assert config.embedding_multiplier == 2.0 and config.residual_multiplier == 0.5
    assert config.attention_multiplier == 0.2 and config.logits_scaling == 4.0
    assert config.qkv_bias and config.attn_out_bias and config.tied_embeddings
    assert config.norm == "rms" and config.rotary_dim is None and not config.lm_head_bias
    assert config.moe_layers == [0, 1]
    moe = config.moe
    assert (moe.router, moe.renormalize, moe.num_experts, moe.top_k, moe.d_hidden) == (
        "softmax_topk",
        True,
        4,
        2,
        16,
    )
    assert (moe.num_shared_experts, moe.d_shared_hidden, moe.shared_expert_gate) == (1, 24, False)
    assert not (moe.router_bias or moe.expert_bias)
    assert moe.balance_loss_coef == pytest.approx(0.001 * 2)  # router_aux_loss_coef * top_k


def test_defaults_no_shared_mlp_and_transformers_attention_multiplier():
    hf = {k: v for k, v in _hf_dict(shared_intermediate_size=0).items() if "multiplier" not in k}
    hf.pop("logits_scaling")
    config = ARCH.to_moekit(hf)
    assert config.moe.num_shared_experts == 0
    assert (config.embedding_multiplier, config.residual_multiplier, config.logits_scaling) == (
        1.0,
        1.0,
        1.0,
    )
    # transformers' default softmax scale is 1.0, not 1/sqrt(head_dim)
    assert config.attention_multiplier == 1.0


def test_attention_multiplier_of_one_over_sqrt_head_dim_is_moekits_none_both_ways():
    head_dim = 32 // 4
    config = ARCH.to_moekit(_hf_dict(attention_multiplier=head_dim**-0.5))
    assert config.attention_multiplier is None
    written = hf_config(config, "granitemoeshared")
    assert written["attention_multiplier"] == head_dim**-0.5  # the same float, bit for bit
    assert ARCH.to_moekit(written) == config
    near = math.nextafter(head_dim**-0.5, 1.0)  # one ulp away: kept as a value
    assert ARCH.to_moekit(_hf_dict(attention_multiplier=near)).attention_multiplier == near
    assert hf_config(ARCH.to_moekit(_hf_dict()), "granitemoeshared")["attention_multiplier"] == 0.2


def test_default_multipliers_are_written_as_granites_no_ops():
    written = hf_config(presets.tiny(), "granitemoeshared")
    head_dim = 128 // 4
    assert written["embedding_multiplier"] == written["residual_multiplier"] == 1.0
    assert written["logits_scaling"] == 1.0
    assert written["attention_multiplier"] == head_dim**-0.5
    assert written["shared_intermediate_size"] == 256 and written["tie_word_embeddings"]


def test_unsupported_options_are_refused_together():
    hf = _hf_dict(hidden_act="gelu", attention_dropout=0.1, logits_scaling=0.0)
    hf["rope_parameters"] = {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}
    hf["embedding_multiplier"] = -1.0
    with pytest.raises(ValueError) as error:
        ARCH.to_moekit(hf)
    message = str(error.value)
    for part in ("hidden_act 'gelu'", "attention_dropout 0.1", "rope type 'linear'"):
        assert part in message
    assert "logits_scaling 0.0" in message and "embedding_multiplier -1.0" in message


def test_missing_structure_is_named():
    hf = _hf_dict()
    del hf["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        ARCH.to_moekit(hf)


def test_what_granitemoeshared_cannot_write_is_named():
    base = ARCH.to_moekit(_hf_dict())
    config = dataclasses.replace(
        base,
        attn_out_bias=False,
        first_dense_layers=1,
        d_hidden=16,
        qk_norm="head",
        norm="layer",
        lm_head_bias=True,
        moe=dataclasses.replace(
            base.moe,
            renormalize=False,
            shared_expert_gate=True,
            routed_scaling=2.0,
            router_bias=True,
        ),
    )
    problems = "; ".join(ARCH.inexpressible(config))
    for part in (
        "qkv_bias True with attn_out_bias False",
        "dense layers [0]",
        "qk_norm 'head'",
        "norm 'layer'",
        "lm_head_bias",
        "renormalize false",
        "shared_expert_gate true",
        "routed_scaling 2.0",
        "router_bias True",
    ):
        assert part in problems, part
    sigmoid = dataclasses.replace(base, moe=dataclasses.replace(base.moe, router="sigmoid_topk"))
    assert any("router 'sigmoid_topk'" in p for p in ARCH.inexpressible(sigmoid))
    with pytest.raises(ValueError, match="granitemoeshared architecture cannot express"):
        hf_config(config, "granitemoeshared")


def test_save_pretrained_writes_the_checkpoint_names_and_save_hf_the_same(tmp_path):
    model = _hf_model()
    model.save_pretrained(tmp_path / "hf")
    keys = set(load_file(tmp_path / "hf" / "model.safetensors"))
    layer = "model.layers.0"
    assert {
        f"{layer}.block_sparse_moe.input_linear.weight",
        f"{layer}.block_sparse_moe.output_linear.weight",
        f"{layer}.block_sparse_moe.router.layer.weight",
        f"{layer}.shared_mlp.input_linear.weight",
        f"{layer}.shared_mlp.output_linear.weight",
    } <= keys
    assert not any("gate_up_proj" in key or key == "lm_head.weight" for key in keys)  # tied
    ours = load_hf(tmp_path / "hf")
    # moekit keeps [gate; up] as halves of w_up (E, D, 2F): the checkpoint's gate rows first
    gate_up_EHD = load_file(tmp_path / "hf" / "model.safetensors")[
        f"{layer}.block_sparse_moe.input_linear.weight"
    ]
    w_up_EDH = ours.layers[0].ffn.experts.w_up.detach()
    assert torch.equal(w_up_EDH[..., :16], gate_up_EHD[:, :16].transpose(1, 2))
    save_hf(ours, tmp_path / "out", architecture="granitemoeshared")
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == keys


def test_a_folder_with_transformers_in_memory_names_loads(tmp_path):
    model = _hf_model()
    model.save_pretrained(tmp_path / "hf")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, tmp_path / "hf" / "model.safetensors")  # the in-memory (fused) names
    assert ARCH.stored_layout({}, state) == "fused"
    torch.testing.assert_close(_logits(load_hf(tmp_path / "hf")), _logits(model), atol=1e-4, rtol=0)


def _two_shared_experts() -> ModelConfig:
    moe = MoEConfig(
        d_model=32, d_hidden=16, num_experts=4, top_k=2, num_shared_experts=2, d_shared_hidden=8
    )
    return ModelConfig(
        vocab_size=96,
        d_model=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=64,
        qkv_bias=True,
        attn_out_bias=True,
        embedding_multiplier=3.0,
        residual_multiplier=0.7,
        attention_multiplier=0.05,
        logits_scaling=2.5,
        moe=moe,
    )


@pytest.mark.parametrize("build", [presets.tiny, _two_shared_experts], ids=["tiny", "two_shared"])
def test_moekit_model_reloads_in_transformers_with_equal_logits(tmp_path, build):
    config = build()
    assert ARCH.inexpressible(config) == []
    torch.manual_seed(0)
    model = Transformer(config).eval()
    save_hf(model, tmp_path / "out", architecture="granitemoeshared")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(theirs).__name__ == "GraniteMoeSharedForCausalLM"
    tokens_BT = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mine, hf_logits = model(tokens_BT).logits, theirs(tokens_BT).logits
    torch.testing.assert_close(hf_logits, mine, atol=1e-4, rtol=0)
