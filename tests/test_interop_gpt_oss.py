"""gpt-oss in and out of the Hugging Face format: logits equal transformers' own forward,
the round trip is bit-exact, greedy generation picks transformers' tokens, and MXFP4
experts load as transformers dequantizes them.

The model is a tiny random GptOssForCausalLM (offline, seeded, fp32): four layers, so
sliding (0, 2) and full (1, 3) attention both occur, a window of 4 under a 12-token input,
YaRN rotary positions with truncate false, weights drawn wide (std 0.3; the sinks std 1)
so that routing, biases, sinks and the SwiGLU clamp (limit 1.5) all matter.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from builders import TOKENS_BT, gpt_oss_model
from safetensors.torch import load_file, save_file

from moekit.cli import main
from moekit.generate import generate
from moekit.interop import load_hf, model_config_from_hf, save_hf
from moekit.interop.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from moekit.train.rundir import load_trained_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    model = gpt_oss_model()
    folder = tmp_path_factory.mktemp("gpt_oss")
    model.save_pretrained(folder)
    return model, folder


def _logits(model, tokens_BT=TOKENS_BT) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens_BT).logits


def test_config_maps_every_gpt_oss_setting(hf_folder):
    _, folder = hf_folder
    config = model_config_from_hf(json.loads((folder / "config.json").read_text()))
    assert config.attention == "sinks" and config.sliding_window == 4
    assert config.sliding_layers == [0, 2]
    assert config.rope_scaling["truncate"] is False and config.rope_scaling["factor"] == 4.0
    assert config.qkv_bias and config.attn_out_bias and not config.tied_embeddings
    moe = config.moe
    assert (moe.router_bias, moe.expert_bias, moe.activation) == (True, True, "swiglu_clamped")
    assert (moe.swiglu_alpha, moe.swiglu_limit, moe.renormalize) == (1.702, 1.5, True)


def test_loaded_model_computes_transformers_logits(hf_folder):
    hf_model, folder = hf_folder
    ours = load_hf(folder)
    torch.testing.assert_close(_logits(ours), _logits(hf_model), atol=1e-4, rtol=0)


def test_saved_model_reloads_in_transformers_with_equal_logits(hf_folder, tmp_path):
    hf_model, folder = hf_folder
    save_hf(load_hf(folder), tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == "GptOssForCausalLM"
    assert reloaded.config.layer_types == hf_model.config.layer_types
    torch.testing.assert_close(_logits(reloaded), _logits(hf_model), atol=1e-4, rtol=0)


def test_round_trip_is_bit_exact(hf_folder, tmp_path):
    _, folder = hf_folder
    save_hf(load_hf(folder), tmp_path / "out")
    before = load_file(folder / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((folder / "config.json").read_text())
    for key in ("layer_types", "sliding_window", "rope_parameters", "swiglu_limit", "head_dim"):
        assert written[key] == original[key], key


def test_greedy_generation_picks_transformers_tokens(hf_folder):
    hf_model, folder = hf_folder
    prompt_BT = TOKENS_BT[:, :6]
    with torch.no_grad():
        theirs = hf_model.generate(
            prompt_BT, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(prompt_BT)
        )[:, 6:]
    ours = generate(load_hf(folder), prompt_BT, max_new_tokens=10, temperature=0.0)
    torch.testing.assert_close(ours.tokens_BN, theirs)


def test_convert_both_ways(hf_folder, tmp_path, capsys):
    hf_model, folder = hf_folder
    assert main(["convert", str(folder), str(tmp_path / "run")]) == 0
    torch.testing.assert_close(
        _logits(load_trained_model(tmp_path / "run")), _logits(hf_model), atol=1e-4, rtol=0
    )
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert "wrote Hugging Face folder" in capsys.readouterr().out
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(_logits(reloaded), _logits(hf_model), atol=1e-4, rtol=0)


def test_options_without_an_equivalent_are_refused_in_one_error(hf_folder):
    _, folder = hf_folder
    hf = json.loads((folder / "config.json").read_text())
    hf["attention_dropout"] = 0.1
    hf["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    with pytest.raises(ValueError, match=r"attention_dropout 0\.1.*rope type 'linear'"):
        model_config_from_hf(hf)


def test_other_architectures_refuse_gpt_oss_settings(hf_folder):
    _, folder = hf_folder
    model = load_hf(folder)
    with pytest.raises(ValueError, match="the mixtral architecture cannot express: attention"):
        save_hf(model, "unused", architecture="mixtral")


# ---------------------------------------------------------------- MXFP4


def test_dequantization_equals_transformers_on_a_synthetic_tensor():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 2, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(110, 140, (3, 8, 2), dtype=torch.uint8, generator=generator)
    for dtype in (torch.float32, torch.bfloat16):
        theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # (E, K, N)
        ours = dequantize_mxfp4(blocks, scales, dtype)  # (E, N, K)
        assert torch.equal(ours.transpose(1, 2), theirs)


def test_worked_mxfp4_block():
    # byte 0x3A: low nibble 0xA = -1.0, high nibble 0x3 = 1.5; scale 128 = 2^1
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0] = 0x3A
    values = dequantize_mxfp4(blocks, torch.tensor([128], dtype=torch.uint8))
    assert values[:2].tolist() == [-2.0, 3.0] and not values[2:].any()
    # the quantizer is exact on values the format holds
    b, s = quantize_mxfp4(values.unsqueeze(0))
    assert torch.equal(dequantize_mxfp4(b, s)[0], values)


def _mxfp4_folder(hf_model, folder, *, drop=None, edit=None, quant_method="mxfp4"):
    """hf_model's experts quantized as the published checkpoints store them; the model's
    own expert weights are replaced by transformers' dequantization of them (the reference)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    with torch.no_grad():
        for i, layer in enumerate(hf_model.model.layers):
            prefix = f"model.layers.{i}.mlp.experts."
            for name in ("gate_up_proj", "down_proj"):
                weight = getattr(layer.mlp.experts, name)  # (E, K, N): stored as (E, N, K)
                blocks, scales = quantize_mxfp4(weight.transpose(1, 2))
                weight.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
                del state[prefix + name]
                state[prefix + name + "_blocks"], state[prefix + name + "_scales"] = blocks, scales
    if drop:
        del state[drop]
    if edit:
        state[edit] = state[edit][..., :-1].contiguous()
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = hf_model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": quant_method,
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_mxfp4_checkpoint_loads_with_transformers_logits(tmp_path):
    hf_model = gpt_oss_model()
    folder = _mxfp4_folder(hf_model, tmp_path / "mxfp4")
    ours = load_hf(folder)
    assert ours.layers[0].ffn.experts.w_up.dtype == torch.float32
    torch.testing.assert_close(_logits(ours), _logits(hf_model), atol=1e-4, rtol=0)
    # transformers reads the folder itself too (without its kernels it dequantizes)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.testing.assert_close(_logits(ours), _logits(theirs.eval()), atol=1e-4, rtol=0)
    # saved dequantized, without the quantization_config
    save_hf(ours, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in written
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert not any(name.endswith(("_blocks", "_scales")) for name in tensors)
    assert torch.equal(
        tensors["model.layers.0.mlp.experts.gate_up_proj"],
        hf_model.model.layers[0].mlp.experts.gate_up_proj,
    )
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(reloaded), _logits(hf_model), atol=1e-4, rtol=0)


def test_mxfp4_loads_in_the_requested_dtype(tmp_path):
    folder = _mxfp4_folder(gpt_oss_model(), tmp_path / "mxfp4")
    model = load_hf(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing scales", r"missing tensors \[model\.layers\.1\.mlp\.experts\.down_proj_scales\]"),
        ("wrong blocks", r"cannot read model\.layers\.0\.mlp\.experts\.gate_up_proj_blocks"),
        ("unknown method", r"quant_method 'gptq' is not supported"),
    ],
)
def test_malformed_mxfp4_checkpoints_are_refused(tmp_path, kind, message):
    settings = {
        "missing scales": dict(drop="model.layers.1.mlp.experts.down_proj_scales"),
        "wrong blocks": dict(edit="model.layers.0.mlp.experts.gate_up_proj_blocks"),
        "unknown method": dict(quant_method="gptq"),
    }[kind]
    folder = _mxfp4_folder(gpt_oss_model(), tmp_path / "bad", **settings)
    with pytest.raises(ValueError, match=message):
        load_hf(folder)


def test_quantized_tensors_without_a_quantization_config_are_refused(tmp_path):
    folder = _mxfp4_folder(gpt_oss_model(), tmp_path / "bad")
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unexpected tensors .*gate_up_proj_blocks"):
        load_hf(folder)


# ---------------------------------------------------------------- counting


def test_hf_config_counts_equal_transformers_model(hf_folder):
    from moekit.interop.inspect import inspect_target

    hf_model, folder = hf_folder
    report = inspect_target(str(folder / "config.json"))
    assert report["kind"] == "Hugging Face gpt_oss"
    assert report["total"] == sum(p.numel() for p in hf_model.parameters())


def test_published_config_json_counts_as_the_preset(tmp_path):
    """openai/gpt-oss-20b's config.json (the transformers 4 form: rope_scaling and a
    top-level rope_theta, MXFP4 quantization_config) counts as models.published."""
    from moekit.interop.inspect import inspect_target
    from moekit.models.published import gpt_oss_20b

    hub = {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "attention_bias": True,
        "attention_dropout": 0.0,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "layer_types": ["sliding_attention", "full_attention"] * 12,
        "max_position_embeddings": 131072,
        "num_attention_heads": 64,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 24,
        "num_key_value_heads": 8,
        "num_local_experts": 32,
        "quantization_config": {"quant_method": "mxfp4"},
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": 150000,
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "vocab_size": 201088,
    }
    (tmp_path / "config.json").write_text(json.dumps(hub))
    config = model_config_from_hf(hub)
    # the same model; only the training losses' coefficients differ (router_aux_loss_coef)
    losses = dict(balance_loss_coef=0.0, z_loss_coef=0.0)
    assert dataclasses.replace(config, moe=dataclasses.replace(config.moe, **losses)) == (
        dataclasses.replace(gpt_oss_20b(), moe=dataclasses.replace(gpt_oss_20b().moe, **losses))
    )
    report = inspect_target(str(tmp_path / "config.json"))
    assert (report["total"], report["active"]) == tuple(
        inspect_target("gpt_oss_20b")[k] for k in ("total", "active")
    )


def test_gpt_oss_refuses_what_it_cannot_hold():
    from moekit.interop import hf_config
    from moekit.models import presets

    config = presets.gpt_oss_tiny()
    plain = dataclasses.replace(
        config,
        moe=dataclasses.replace(config.moe, router_bias=False, activation="swiglu"),
        attn_out_bias=False,
    )
    with pytest.raises(
        ValueError,
        match=r"gpt_oss architecture cannot express: qkv_bias True with attn_out_bias False.*"
        r"router_bias False.*expert activation 'swiglu'",
    ):
        hf_config(plain, "gpt_oss")
