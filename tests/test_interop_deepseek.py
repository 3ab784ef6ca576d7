"""DeepSeek-V2 and DeepSeek-V3 in and out of the Hugging Face format: logits equal
transformers' own forward, both ways; HF -> moekit -> HF is bit-exact tensor by tensor;
greedy generation picks transformers' tokens.

Each case is a tiny random model built with transformers' own classes (offline, seeded,
fp32, three layers of which the first is dense, eight experts), its weights drawn wide
(std 0.3) and DeepSeek-V3's score-correction biases random, so that the latent attention,
the group-limited routing and the biases all matter.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from builders import DEEPSEEK_CASES, TOKENS_BT, deepseek_case
from helpers import folder_tensors
from safetensors.torch import load_file, save_file

from moekit.cli import main
from moekit.generate import generate
from moekit.interop import load_hf, model_config_from_hf, save_hf
from moekit.models import Transformer
from moekit.train import load_trained_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """{case: (transformers model, folder it was saved to)}."""
    folders = {}
    for case in DEEPSEEK_CASES:
        model = deepseek_case(case)
        folder = tmp_path_factory.mktemp(case)
        model.save_pretrained(folder)
        folders[case] = (model, folder)
    return folders


def _logits(model, tokens_BT=TOKENS_BT) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens_BT).logits


@pytest.mark.parametrize("case", DEEPSEEK_CASES)
def test_loaded_model_computes_transformers_logits(hf_folders, case):
    hf_model, folder = hf_folders[case]
    ours = load_hf(folder)
    assert ours.config.attention == "mla"
    torch.testing.assert_close(_logits(ours), _logits(hf_model), atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", DEEPSEEK_CASES)
def test_saved_model_reloads_in_transformers_with_equal_logits(hf_folders, tmp_path, case):
    hf_model, folder = hf_folders[case]
    ours = load_hf(folder)
    save_hf(ours, tmp_path / "out", max_shard_bytes=30_000)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(hf_model)
    torch.testing.assert_close(_logits(back), _logits(ours), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", DEEPSEEK_CASES)
def test_round_trip_is_bit_exact(hf_folders, tmp_path, case):
    _, folder = hf_folders[case]
    hf = json.loads((folder / "config.json").read_text())
    # the checkpoint's rotary layout is kept (DeepSeek-V3 with rope_interleave false)
    extra = {"rope_interleave": hf["rope_interleave"]} if "rope_interleave" in hf else {}
    save_hf(load_hf(folder), tmp_path / "out", config_extra=extra)
    original = folder_tensors(folder)
    again = folder_tensors(tmp_path / "out")
    assert sorted(again) == sorted(original)
    for name, tensor in original.items():
        assert again[name].dtype == tensor.dtype and torch.equal(again[name], tensor), name


@pytest.mark.parametrize("case", DEEPSEEK_CASES)
def test_greedy_generation_picks_transformers_tokens(hf_folders, case):
    hf_model, folder = hf_folders[case]
    ours = load_hf(folder)
    prompt_BT = TOKENS_BT[:, :5]
    with torch.no_grad():
        theirs = hf_model.generate(
            prompt_BT,
            attention_mask=torch.ones_like(prompt_BT),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
        )
    mine = generate(ours, prompt_BT, max_new_tokens=8, temperature=0.0)
    torch.testing.assert_close(mine.tokens_BN, theirs[:, 5:])


def test_fused_expert_layout_is_read_too(hf_folders, tmp_path):
    """transformers' in-memory names (experts.gate_up_proj (E, 2F, D)) load as well."""
    hf_model, folder = hf_folders["v3"]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    torch.testing.assert_close(_logits(load_hf(tmp_path)), _logits(hf_model), atol=1e-4, rtol=0)


def test_bf16_checkpoint_with_an_fp32_router_round_trips(tmp_path):
    """transformers keeps DeepSeek-V3's gate and score-correction bias in fp32 in a bf16
    model; they load and save in fp32, the rest in bf16."""
    deepseek_case("v3").to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    for name in tensors:
        if ".mlp.gate." in name:
            tensors[name] = tensors[name].float() * 1.001  # not representable in bf16
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    ours = load_hf(tmp_path / "hf")
    router = ours.layers[1].ffn.router
    assert router.weight.dtype == router.bias.dtype == torch.float32
    assert ours.tok_embed.weight.dtype == torch.bfloat16
    assert ours(TOKENS_BT).logits.isfinite().all()
    save_hf(ours, tmp_path / "out")
    again = folder_tensors(tmp_path / "out")
    for name, tensor in tensors.items():
        assert again[name].dtype == tensor.dtype and torch.equal(again[name], tensor), name


@pytest.mark.parametrize("case", DEEPSEEK_CASES)
def test_inspect_counts_equal_transformers_model(hf_folders, case):
    from moekit.interop.inspect import inspect_target

    hf_model, folder = hf_folders[case]
    report = inspect_target(str(folder / "config.json"))
    assert report["kind"] == f"Hugging Face {DEEPSEEK_CASES[case][0]}"
    assert report["total"] == sum(p.numel() for p in hf_model.parameters())


def test_multi_token_prediction_layers_are_skipped(hf_folders, tmp_path):
    """A DeepSeek-V3 checkpoint stores its MTP module as the layer after the last one;
    transformers does not load it, nor does moekit by default."""
    hf_model, folder = hf_folders["v3"]
    config = json.loads((folder / "config.json").read_text()) | {"num_nextn_predict_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(32, 64)
    tensors["model.layers.3.self_attn.kv_b_proj.weight"] = torch.zeros(56, 12)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    torch.testing.assert_close(_logits(load_hf(tmp_path)), _logits(hf_model), atol=1e-4, rtol=0)
    tensors["model.layers.4.eh_proj.weight"] = torch.zeros(32, 64)  # not an MTP layer
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected tensors \[model.layers.4.eh_proj.weight\]"):
        load_hf(tmp_path)


def test_mtp_layers_load_with_mtp_true_and_save_in_deepseeks_layout(hf_folders, tmp_path):
    """save_hf writes a model's MTP module as the layer after the last one (a decoder layer,
    enorm, hnorm, eh_proj, shared_head.norm and copies of the embedding and head);
    transformers loads the folder with unchanged logits, load_hf skips the layer by default
    and with mtp=True reads it back bit-exactly."""
    hf_model, folder = hf_folders["v3"]
    base = load_hf(folder)
    model = Transformer(dataclasses.replace(base.config, mtp_depth=1))
    model.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():  # distinct values everywhere, so that a swapped name shows
        for tensor in [*model.mtp.parameters(), *model.mtp.buffers()]:
            tensor.normal_(0.0, 0.3)
    save_hf(model, tmp_path / "a", max_shard_bytes=30_000)
    assert json.loads((tmp_path / "a/config.json").read_text())["num_nextn_predict_layers"] == 1
    tensors = folder_tensors(tmp_path / "a")
    for name in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "self_attn.kv_b_proj"):
        assert f"model.layers.3.{name}.weight" in tensors, name
    assert "model.layers.3.mlp.gate.e_score_correction_bias" in tensors
    for copy, original in (("embed_tokens", "model.embed_tokens"), ("shared_head.head", "lm_head")):
        assert torch.equal(tensors[f"model.layers.3.{copy}.weight"], tensors[f"{original}.weight"])
    torch.testing.assert_close(_logits(model), _logits(hf_model), atol=1e-4, rtol=0)
    back_in_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    torch.testing.assert_close(_logits(back_in_hf), _logits(hf_model), atol=1e-4, rtol=0)
    assert len(load_hf(tmp_path / "a").mtp) == 0
    back = load_hf(tmp_path / "a", mtp=True)
    expected = model.state_dict()
    assert back.state_dict().keys() == expected.keys()
    for name, value in back.state_dict().items():
        assert torch.equal(value, expected[name]), name
    save_hf(back, tmp_path / "b")
    again = folder_tensors(tmp_path / "b")
    assert again.keys() == tensors.keys()
    assert all(torch.equal(again[name], tensors[name]) for name in tensors)
    # `moekit convert --mtp` keeps them in the run directory, to train with them
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "run"), "--mtp"]) == 0
    run = load_trained_model(tmp_path / "run")
    assert run.config.mtp_depth == 1
    assert torch.equal(run.mtp[0].proj.weight, model.mtp[0].proj.weight)
    with pytest.raises(ValueError, match="deepseek_v2 checkpoints have no MTP layers"):
        load_hf(hf_folders["v2_group_limited"][1], mtp=True)


def test_config_semantics_are_mapped(hf_folders):
    def read(case):
        return model_config_from_hf(json.loads((hf_folders[case][1] / "config.json").read_text()))

    v3 = read("v3")
    assert v3.moe.router == "sigmoid_topk" and v3.moe.renormalize
    assert (v3.moe.num_groups, v3.moe.topk_groups, v3.moe.routed_scaling) == (4, 2, 2.5)
    assert v3.moe_layers == [1, 2] and v3.d_hidden == 48 and v3.q_lora_rank == 16
    assert v3.rope_scaling["type"] == "yarn" and v3.rope_scaling["original_max_seq_len"] == 16
    v2 = read("v2_group_limited")
    assert v2.moe.router == "softmax_topk" and not v2.moe.renormalize
    assert (v2.moe.num_groups, v2.moe.topk_groups, v2.moe.routed_scaling) == (4, 2, 1.5)
    lite = read("v2_lite_greedy")
    assert lite.q_lora_rank is None and lite.moe.num_groups == 1
    assert lite.moe.shared_hidden == 2 * 16


def test_options_moekit_cannot_reproduce_are_listed_together(hf_folders, tmp_path):
    hf = json.loads((hf_folders["v2_group_limited"][1] / "config.json").read_text())
    hf |= {
        "norm_topk_prob": True,
        "topk_method": "noaux_tc",
        "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
        "hidden_act": "gelu",
    }
    with pytest.raises(
        ValueError,
        match=r"cannot reproduce: hidden_act 'gelu'.*topk_method 'noaux_tc'.*norm_topk_prob true.*rope type 'linear'",
    ):
        model_config_from_hf(hf)


def test_settings_deepseek_cannot_express_are_named(hf_folders, tmp_path):
    import dataclasses

    from moekit.models import Transformer

    ours = load_hf(hf_folders["v3"][1])
    moe = dataclasses.replace(ours.config.moe, capacity_factor=1.0)
    config = dataclasses.replace(ours.config, moe=moe, dense_layers=[2])
    with pytest.raises(
        ValueError,
        match=r"deepseek_v3 architecture cannot express: capacity_factor 1.0.*MoE layers \[1\]",
    ):
        save_hf(Transformer(config), tmp_path / "out")
    with pytest.raises(
        ValueError, match=r"deepseek_v2 architecture cannot express: router 'sigmoid_topk'"
    ):
        save_hf(ours, tmp_path / "out", architecture="deepseek_v2")
    with pytest.raises(ValueError, match=r"mixtral architecture cannot express: .*attention 'mla'"):
        save_hf(ours, tmp_path / "out", architecture="mixtral")


def test_convert_both_ways(hf_folders, tmp_path, capsys):
    """moekit convert: a Hugging Face DeepSeek-V3 folder to a run directory and back."""
    hf_model, folder = hf_folders["v3"]
    assert main(["convert", str(folder), str(tmp_path / "run")]) == 0
    args = ["convert", str(tmp_path / "run"), str(tmp_path / "hf"), "--architecture"]
    assert main([*args, "deepseek_v3"]) == 0
    capsys.readouterr()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(back).__name__ == "DeepseekV3ForCausalLM"
    torch.testing.assert_close(_logits(back), _logits(hf_model), atol=1e-4, rtol=0)
