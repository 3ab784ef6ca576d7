"""DeepSeek's FP8 block-quantised checkpoints: dequantization equals transformers' own, a
quantised tiny DeepSeek-V3 loads with the logits of transformers' model holding the same
dequantized weights, malformed checkpoints are refused naming the tensor, and what moekit
writes back is unquantised.

The test checkpoints are quantised as the published DeepSeek-V3 / R1 ones: the attention
and MLP projections (the experts' and the shared experts' included) in float8_e4m3fn with
a float32 `weight_scale_inv` per block; the embedding, the head, the norms, the router's
gate and its e_score_correction_bias unquantised.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from builders import TOKENS_BT, deepseek_case
from safetensors.torch import load_file, save_file

from moekit.cli import main
from moekit.interop import load_hf, save_hf
from moekit.interop.fp8 import dequantize_fp8, fp8_block_size, quantize_fp8
from moekit.models import Transformer

transformers = pytest.importorskip("transformers")
finegrained_fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
pytestmark = pytest.mark.usefixtures("one_thread")

QUANTISED = re.compile(
    r"\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|"
    r"down_proj)\.weight$|\.mlp\.experts\.(gate_up_proj|down_proj)$"
)
HUB_BLOCK = [128, 128]
SMALL_BLOCK = [8, 16]  # so that the tiny model's matrices have several, partial, blocks


def _theirs(weight, scale_inv, block, dtype=torch.float32):
    return finegrained_fp8._dequantize_fp8_weight(weight, scale_inv, list(block), dtype)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS_BT).logits


# ---------------------------------------------------------------- the format


@pytest.mark.parametrize(
    "shape, block",
    [((300, 200), (128, 128)), ((2, 130, 257), (128, 128)), ((37, 45), (8, 16))],
)
def test_dequantization_equals_transformers_on_synthetic_tensors(shape, block):
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(shape, generator=generator) * 3
    weight, scale_inv = quantize_fp8(values, block)
    assert weight.dtype == torch.float8_e4m3fn and scale_inv.dtype == torch.float32
    assert scale_inv.shape == (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    # random scales, not only the quantizer's, so that every block's own scale matters
    scale_inv = torch.rand(scale_inv.shape, generator=generator) + 0.01
    ours = dequantize_fp8(weight, scale_inv, block, torch.float32)
    assert torch.equal(ours, _theirs(weight, scale_inv, block))
    # bf16: the float32 product rounded once
    ours_bf16 = dequantize_fp8(weight, scale_inv, block, torch.bfloat16)
    assert torch.equal(ours_bf16, _theirs(weight, scale_inv, block).bfloat16())


def test_worked_partial_edge_block():
    weight = torch.ones(3, 5).to(torch.float8_e4m3fn)
    scale_inv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    values = dequantize_fp8(weight, scale_inv, (2, 2))
    assert values.tolist() == [
        [1.0, 1.0, 2.0, 2.0, 3.0],
        [1.0, 1.0, 2.0, 2.0, 3.0],
        [4.0, 4.0, 5.0, 5.0, 6.0],
    ]


def test_quantizer_error_is_within_e4m3_rounding():
    values = torch.randn(40, 70, generator=torch.Generator().manual_seed(2))
    weight, scale_inv = quantize_fp8(values, (16, 32))
    back = dequantize_fp8(weight, scale_inv, (16, 32))
    # 3 mantissa bits: relative rounding error at most 2^-4 (absmax scaling: no overflow)
    assert ((back - values).abs() <= values.abs() * 2**-4 + 1e-6).all()


@pytest.mark.parametrize(
    "quantization, message",
    [
        ({"quant_method": "gptq"}, r"quant_method 'gptq' is not supported"),
        ({"quant_method": "fp8", "fmt": "e5m2"}, r"fmt 'e5m2' is not supported"),
        (
            {"quant_method": "fp8", "activation_scheme": "static"},
            r"activation_scheme 'static'",
        ),
        ({"quant_method": "fp8", "weight_block_size": [128]}, r"weight_block_size \[128\]"),
        ({"quant_method": "fp8"}, r"weight_block_size None"),
    ],
)
def test_unreadable_quantization_configs_are_named(quantization, message):
    with pytest.raises(ValueError, match=message):
        fp8_block_size(quantization)


def test_scale_of_the_wrong_shape_is_named():
    weight, scale_inv = quantize_fp8(torch.randn(20, 30), (8, 16))
    with pytest.raises(ValueError, match=r"w\.weight_scale_inv is \(3, 1\), expected \(3, 2\)"):
        dequantize_fp8(weight, scale_inv[:, :1], (8, 16), name="w.weight")


# ---------------------------------------------------------------- checkpoints


def _fp8_folder(
    folder, *, case="v3", block=SMALL_BLOCK, fused=False, unquantised_dtype=None, edit=None
):
    """A tiny DeepSeek model (tests/test_interop_deepseek.py's case, transformers' classes) saved FP8-quantised as the Hub stores
    it, and transformers' model holding transformers' dequantization of those weights (the
    reference). edit(tensors, config) may spoil the checkpoint before it is written."""
    hf_model = deepseek_case(case)
    dense = folder.parent / f"{folder.name}_dense"
    hf_model.save_pretrained(dense)
    if fused:  # transformers' in-memory names: experts.gate_up_proj (E, 2F, D)
        tensors = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    else:
        tensors = load_file(dense / "model.safetensors")
    config = json.loads((dense / "config.json").read_text())
    stored, dequantized = {}, {}
    for name, tensor in tensors.items():
        if QUANTISED.search(name):
            weight, scale_inv = quantize_fp8(tensor, block)
            stored[name], stored[name + "_scale_inv"] = weight, scale_inv
            dequantized[name] = _theirs(weight, scale_inv, block)
        else:
            stored[name] = tensor if unquantised_dtype is None else tensor.to(unquantised_dtype)
            dequantized[name] = stored[name].float()
    assert any(n.endswith("kv_b_proj.weight_scale_inv") for n in stored)
    assert not any(
        re.search(r"(norm|embed_tokens|lm_head|mlp\.gate)\.weight_scale", n) for n in stored
    )
    # the reference: transformers' model with the dequantized weights
    save_file(dequantized, str(dense / "model.safetensors"), metadata={"format": "pt"})
    reference = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": block,
    }
    if edit:
        edit(stored, config)
    folder.mkdir()
    save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return reference.eval(), folder


@pytest.mark.parametrize(
    "case, block",
    [
        ("v3", SMALL_BLOCK),
        ("v3", HUB_BLOCK),
        ("v3_q_proj_halves", SMALL_BLOCK),
        ("v2_lite_greedy", SMALL_BLOCK),
    ],
)
def test_fp8_checkpoint_loads_with_transformers_logits(tmp_path, case, block):
    reference, folder = _fp8_folder(tmp_path / "fp8", case=case, block=block)
    ours = load_hf(folder)
    assert ours.layers[1].ffn.experts.w_up.dtype == torch.float32  # the embedding's dtype
    torch.testing.assert_close(_logits(ours), _logits(reference), atol=1e-4, rtol=0)


def test_fused_expert_layout_is_read_too(tmp_path):
    reference, folder = _fp8_folder(tmp_path / "fp8", fused=True)
    stored = load_file(folder / "model.safetensors")
    assert "model.layers.1.mlp.experts.gate_up_proj_scale_inv" in stored
    torch.testing.assert_close(_logits(load_hf(folder)), _logits(reference), atol=1e-4, rtol=0)


def test_default_dtype_is_the_checkpoints_unquantised_one(tmp_path):
    """As published: bf16 embedding, head, norms and gate; the weights dequantize to bf16,
    the score-correction bias stored in fp32 stays fp32."""

    def fp32_bias(tensors, config):
        for name in tensors:
            if name.endswith("e_score_correction_bias"):
                tensors[name] = tensors[name].float()

    reference, folder = _fp8_folder(
        tmp_path / "fp8", unquantised_dtype=torch.bfloat16, edit=fp32_bias
    )
    ours = load_hf(folder)
    assert ours.tok_embed.weight.dtype == ours.layers[1].ffn.experts.w_up.dtype == torch.bfloat16
    assert ours.layers[1].ffn.router.bias.dtype == torch.float32
    assert ours.layers[0].attn.wo.weight.dtype == torch.bfloat16
    torch.testing.assert_close(
        _logits(load_hf(folder, dtype=torch.float32)), _logits(reference), atol=1e-4, rtol=0
    )


def _drop(name):
    return lambda tensors, config: tensors.pop(name)


def _narrow(name):
    def edit(tensors, config):
        tensors[name] = tensors[name][..., :-1].contiguous()

    return edit


def _no_config(tensors, config):
    del config["quantization_config"]


def _block(value):
    return lambda tensors, config: config["quantization_config"].update(weight_block_size=value)


def _scaled_dense(tensors, config):
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[name] = tensors[name].float()


ATTN = re.escape("model.layers.0.self_attn")


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            _drop("model.layers.0.self_attn.o_proj.weight_scale_inv"),
            rf"FP8 weights \[{ATTN}\.o_proj\.weight\] have no _scale_inv tensor",
        ),
        (
            _narrow("model.layers.0.self_attn.o_proj.weight_scale_inv"),
            rf"cannot read {ATTN}\.o_proj\.weight: {ATTN}\.o_proj\.weight_scale_inv is "
            r"\(4, 1\), expected \(4, 2\)",
        ),
        (_no_config, r"are 8-bit floats but config.json has no FP8 quantization_config"),
        (_block([8]), r"weight_block_size \[8\] is not supported"),
        (
            lambda t, c: c["quantization_config"].update(quant_method="bitsandbytes"),
            r"quant_method 'bitsandbytes' is not supported",
        ),
        (
            lambda t, c: c["quantization_config"].update(fmt="e5m2"),
            r"fmt 'e5m2' is not supported",
        ),
        (_block([16, 16]), rf"{ATTN}\.\w+\.weight_scale_inv is \(\d+, \d+\), expected"),
        (_scaled_dense, rf"\[{ATTN}\.o_proj\.weight_scale_inv\] scale weights that are not"),
    ],
    ids=[
        "missing scale",
        "wrong scale shape",
        "no quantization_config",
        "bad block size",
        "unknown method",
        "unknown fmt",
        "other block size",
        "scale of a dense weight",
    ],
)
def test_malformed_fp8_checkpoints_are_refused(tmp_path, edit, message):
    _, folder = _fp8_folder(tmp_path / "bad", edit=edit)
    with pytest.raises(ValueError, match=message):
        load_hf(folder)


def test_convert_and_save_write_unquantised_weights(tmp_path, capsys):
    reference, folder = _fp8_folder(tmp_path / "fp8")
    assert main(["convert", str(folder), str(tmp_path / "run")]) == 0
    args = ["convert", str(tmp_path / "run"), str(tmp_path / "hf"), "--architecture"]
    assert main([*args, "deepseek_v3"]) == 0
    capsys.readouterr()
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in written
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert not any(name.endswith("_scale_inv") for name in tensors)
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(_logits(back), _logits(reference), atol=1e-4, rtol=0)
    # save_hf directly as well
    save_hf(load_hf(folder), tmp_path / "out")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_mtp_layers_are_dequantized_or_skipped_with_their_scales(tmp_path):
    """The published V3 quantises its MTP layer's projections (eh_proj included): with
    mtp=True they load as their dequantization, by default they are skipped, scales too."""
    _, folder = _fp8_folder(tmp_path / "fp8")
    base = load_hf(folder)
    model = Transformer(dataclasses.replace(base.config, mtp_depth=1))
    model.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for tensor in [*model.mtp.parameters(), *model.mtp.buffers()]:
            tensor.normal_(0.0, 0.3)
    save_hf(model, tmp_path / "dense")
    tensors = load_file(tmp_path / "dense" / "model.safetensors")
    stored, dequantized = {}, {}
    for name, tensor in tensors.items():
        if QUANTISED.search(name) or name.endswith("eh_proj.weight"):
            weight, scale_inv = quantize_fp8(tensor, SMALL_BLOCK)
            stored[name], stored[name + "_scale_inv"] = weight, scale_inv
            dequantized[name] = _theirs(weight, scale_inv, SMALL_BLOCK)
        else:
            stored[name] = dequantized[name] = tensor
    assert "model.layers.3.eh_proj.weight_scale_inv" in stored
    save_file(dequantized, str(tmp_path / "dense" / "model.safetensors"))
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": SMALL_BLOCK}
    (tmp_path / "q").mkdir()
    save_file(stored, str(tmp_path / "q" / "model.safetensors"))
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    expected = load_hf(tmp_path / "dense", mtp=True).state_dict()
    ours = load_hf(tmp_path / "q", mtp=True).state_dict()
    assert ours.keys() == expected.keys()
    for name, value in ours.items():
        assert torch.equal(value, expected[name]), name
    assert len(load_hf(tmp_path / "q").mtp) == 0


def test_other_architectures_refuse_a_quantization_config(tmp_path):
    """FP8 blocks are read for DeepSeek only; a Mixtral folder with the same
    quantization_config is refused, naming it."""
    t = transformers
    config = t.MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=2,
        num_experts_per_tok=1,
    )
    t.MixtralForCausalLM(config).save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["quantization_config"] = {"quant_method": "fp8", "weight_block_size": HUB_BLOCK}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"mixtral checkpoints with a quantization_config .*fp8"):
        load_hf(tmp_path)
