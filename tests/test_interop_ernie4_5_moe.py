"""ERNIE 4.5 MoE beyond the contract suite (tests/test_interop_contract.py): the config
mapping, the MoE layer pattern both ways, every refusal in one error, what the architecture
cannot write, moekit's tiny preset written as ERNIE (zero selection biases) and its LoRA
adapters in PEFT, the MTP layer a checkpoint may hold skipped, and the flagship's count.

Tiny random Ernie4_5_MoeForCausalLM models (offline, seeded, fp32, eager attention).
"""

from __future__ import annotations

import dataclasses

import builders
import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit.interop import choose_architecture, load_hf, model_config_from_hf, save_hf
from moekit.interop.architectures import get
from moekit.interop.architectures.ernie4_5_moe import ROUTER_ZERO_BIAS, layer_pattern
from moekit.interop.peft import save_peft
from moekit.models import Transformer, presets
from moekit.models.lora import LoRAConfig, add_lora, remove_lora

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96
TOKENS_BT = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
SETTINGS = dict(
    model_type="ernie4_5_moe",
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    moe_intermediate_size=16,
    moe_num_experts=8,
    moe_k=2,
    moe_num_shared_experts=2,
    moe_layer_start_index=1,
)
ARCH = get("ernie4_5_moe")


def _hf_folder(tmp_path, **overrides):
    settings = {k: v for k, v in (SETTINGS | overrides).items() if k != "model_type"}
    model = builders.hf_model("ernie4_5_moe", settings=settings)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def test_config_mapping(tmp_path):
    _, folder = _hf_folder(tmp_path, tie_word_embeddings=False)
    config = load_hf(folder).config
    moe = config.moe
    assert (config.d_model, config.num_layers, config.num_heads, config.num_kv_heads) == (
        32,
        3,
        4,
        2,
    )
    assert (config.head_dim, config.d_hidden, config.rope_theta) == (8, 40, 5e5)
    assert (config.first_dense_layers, config.moe_layers, config.tied_embeddings) == (
        1,
        [1, 2],
        False,
    )
    assert (moe.router, moe.renormalize, moe.selection_bias) == ("softmax_topk", True, True)
    assert (moe.num_experts, moe.top_k, moe.d_hidden) == (8, 2, 16)
    # two shared experts of width 16: one ungated MLP of width 32
    assert (moe.num_shared_experts, moe.shared_hidden, moe.shared_expert_gate) == (2, 32, False)
    assert moe.balance_loss_coef == pytest.approx(0.001 * 2)


@pytest.mark.parametrize(
    "num_layers, start, end, interval, expected",
    [
        (6, 1, -1, 1, [1, 2, 3, 4, 5]),
        (6, 1, -1, 2, [1, 3, 5]),
        (6, 2, 3, 1, [2, 3]),
        (8, 2, 6, 3, [2, 5]),
    ],
)
def test_moe_layer_pattern_both_ways(num_layers, start, end, interval, expected):
    hf = SETTINGS | dict(
        num_hidden_layers=num_layers,
        moe_layer_start_index=start,
        moe_layer_end_index=end,
        moe_layer_interval=interval,
    )
    config = model_config_from_hf(hf)
    assert config.moe_layers == expected
    written = ARCH.to_hf(config, "float32")
    assert model_config_from_hf(written).moe_layers == expected
    # transformers' own decoder layers agree
    settings = {k: v for k, v in written.items() if k not in ("architectures", "model_type")}
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model("ernie4_5_moe", **settings)
    )
    moe = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    assert moe == expected


def test_every_refusal_in_one_error():
    hf = SETTINGS | dict(
        use_bias=True,
        hidden_act="gelu",
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
        moe_norm_min=0.5,
        moe_layer_start_index=5,
    )
    with pytest.raises(ValueError) as error:
        model_config_from_hf(hf)
    for part in ("use_bias true", "hidden_act", "rope type 'linear'", "moe_norm_min 0.5"):
        assert part in str(error.value)
    assert "no MoE layer" in str(error.value)


def test_what_the_architecture_cannot_write():
    config = model_config_from_hf(SETTINGS | {"num_hidden_layers": 5})
    moe = dataclasses.replace(
        config.moe,
        renormalize=False,
        shared_expert_gate=True,
        d_shared_hidden=20,
        num_groups=2,
        topk_groups=2,
        routed_scaling=2.0,
    )
    bad = dataclasses.replace(config, moe=moe, qkv_bias=True, qk_norm="head", dense_layers=[2])
    problems = "; ".join(ARCH.inexpressible(bad))
    for part in (
        "renormalize false",
        "shared_expert_gate true",
        "shared width 40",
        "num_groups 2, routed_scaling 2.0",
        "attention biases",
        "qk_norm 'head'",
        "MoE layers [1, 3, 4]",
    ):
        assert part in problems, part
    assert layer_pattern(5, [1, 3, 4]) is None and layer_pattern(5, [1, 3]) == (1, 3, 2)


def _preset_model(config) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_the_presets_are_written_as_ernie(name):
    config = presets.PRESETS[name]()
    assert ARCH.inexpressible(config) == []
    assert choose_architecture(config) == "ernie4_5_moe"


def test_the_tiny_preset_reloads_in_transformers(tmp_path):
    model = _preset_model(presets.tiny())
    save_hf(model, tmp_path / "hf")  # the architecture chosen by default
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    bias = tensors["model.layers.0.mlp.moe_statics.e_score_correction_bias"]
    assert bias.shape == (1, 16) and not bias.any()  # no selection bias: zeros
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert back.config.model_type == "ernie4_5_moe" and back.config.moe_num_shared_experts == 2
    tokens_BT = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(tokens_BT).logits
        torch.testing.assert_close(back(tokens_BT).logits, ours, atol=1e-4, rtol=1e-4)
        again = load_hf(tmp_path / "hf")
        assert again.config.moe.selection_bias and again.config.moe.shared_hidden == 256
        torch.testing.assert_close(again(tokens_BT).logits, ours, atol=1e-4, rtol=1e-4)


def test_the_tiny_presets_adapters_load_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    lora = LoRAConfig(rank=2, alpha=4.0, targets="attention,experts,shared,router")
    model = add_lora(_preset_model(presets.tiny()), lora)
    generator = torch.Generator().manual_seed(1)
    tokens_BT = torch.randint(0, 4096, (2, 16), generator=generator)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        ours = model(tokens_BT).logits
    save_peft(model, tmp_path / "adapter", lora)
    save_hf(remove_lora(model), tmp_path / "hf")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert base.config.model_type == "ernie4_5_moe"
    with torch.no_grad():
        assert not torch.allclose(base(tokens_BT).logits, ours, atol=1e-3)
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        torch.testing.assert_close(adapted(tokens_BT).logits, ours, atol=1e-4, rtol=1e-4)


def test_a_nonzero_bias_needs_selection_bias():
    weight_ED = torch.randn(4, 8)
    assert torch.equal(ROUTER_ZERO_BIAS.to_moekit([weight_ED, torch.zeros(1, 4)]), weight_ED)
    with pytest.raises(ValueError, match="selection_bias"):
        ROUTER_ZERO_BIAS.to_moekit([weight_ED, torch.ones(1, 4)])


def test_the_mtp_layer_is_skipped(tmp_path):
    hf_model, folder = _hf_folder(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.mtp_linear_proj.0.weight"] = torch.zeros(32, 64)
    tensors["model.mtp_block.0.self_attn.q_proj.weight"] = torch.zeros(32, 32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with torch.no_grad():
        torch.testing.assert_close(
            load_hf(folder)(TOKENS_BT).logits, hf_model(TOKENS_BT).logits, atol=1e-4, rtol=0
        )


def test_flagship_counts_match_the_published_figures():
    from moekit.interop.inspect import inspect_target

    report = inspect_target("ernie_4_5_300b_a47b")
    assert round(report["total"] / 1e9, 2) == 299.48  # of the stated 300B
    assert round(report["active_without_input_embedding"] / 1e9, 2) == 47.08  # of 47B
    errors = report["published"]
    assert abs(errors["total_error"]) < 0.01 and abs(errors["active_error"]) < 0.01
    # 21B-A3B: 21.83B / 3.35B, stated as the name's rounding (21B, 3B)
    small = inspect_target("ernie_4_5_21b_a3b")
    assert round(small["total"] / 1e9, 1) == 21.8 and round(small["active"] / 1e9, 2) == 3.35
