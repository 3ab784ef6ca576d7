"""GLM-4.5 MoE (glm4_moe) beyond the contract suite: what its config.json maps to, what is
refused, a second tiny model (YaRN over a quarter of each head, no renormalisation, every
layer MoE), the MTP layers after the last layer, and the flagships' counts against the
published figures."""

from __future__ import annotations

import dataclasses
import json

import builders
import pytest
import torch
from safetensors.torch import load_file

from moekit.config import MoEConfig
from moekit.interop import hf_config, load_hf, model_config_from_hf, save_hf
from moekit.interop.accounting import count_by_part
from moekit.interop.architectures import get
from moekit.interop.architectures.glm4_moe import GLM_4_5, GLM_4_5_AIR, glm_4_5, glm_4_5_air
from moekit.models import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "partial_rotary_factor": 0.25,
}
CASES = {
    "tiny": get("glm4_moe").tiny,
    # head_dim 16, 4 dims rotated with YaRN; no biases, no q/k norm, no renormalisation,
    # one group, every layer MoE, one shared expert
    "yarn_quarter": dict(
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=0,
        head_dim=16,
        rope_parameters=YARN,
        norm_topk_prob=False,
        routed_scaling_factor=1.5,
    ),
}
TOKENS_BT = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def _build(kwargs):
    return builders.hf_model("glm4_moe", settings=COMMON | kwargs)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    folders = {}
    for case, kwargs in CASES.items():
        model = _build(json.loads(json.dumps(kwargs)))  # transformers edits rope_parameters
        folder = tmp_path_factory.mktemp(case)
        model.save_pretrained(folder)
        folders[case] = (model, folder)
    return folders


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS_BT).logits


def _config_json(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_config_maps_to_moekit_fields(hf_folders):
    config = load_hf(hf_folders["tiny"][1]).config
    assert (config.head_dim, config.rotary_dim) == (12, 6)  # default factor 0.5
    assert (config.qkv_bias, config.attn_out_bias, config.qk_norm) == (True, False, "head")
    assert (config.first_dense_layers, config.moe_layers, config.d_hidden) == (1, [1, 2], 48)
    moe = config.moe
    assert (moe.router, moe.renormalize, moe.routed_scaling) == ("sigmoid_topk", True, 2.5)
    assert (moe.num_groups, moe.topk_groups, moe.num_experts, moe.top_k) == (4, 2, 8, 2)
    assert (moe.num_shared_experts, moe.shared_hidden, moe.shared_expert_gate) == (2, 32, False)
    assert moe.balance_loss_coef == 0.0 and config.mtp_depth == 0

    flagship = glm_4_5()
    assert (flagship.head_dim, flagship.rotary_dim, flagship.qk_norm) == (128, 64, "head")
    assert (flagship.first_dense_layers, len(flagship.moe_layers)) == (3, 89)
    assert flagship.rope_theta == 1e6 and not flagship.tied_embeddings
    assert glm_4_5_air().qk_norm is None and glm_4_5_air().moe.routed_scaling == 1.0


def test_yarn_over_a_quarter_of_each_head_matches_transformers(hf_folders, tmp_path):
    hf_model, folder = hf_folders["yarn_quarter"]
    ours = load_hf(folder)
    assert (ours.config.rotary_dim, ours.config.rope_scaling["type"]) == (4, "yarn")
    assert not ours.config.moe.renormalize and ours.config.moe_layers == [0, 1, 2]
    torch.testing.assert_close(_logits(ours), _logits(hf_model), atol=1e-4, rtol=0)
    save_hf(ours, tmp_path / "out", architecture="glm4_moe")
    rope = _config_json(tmp_path / "out")["rope_parameters"]
    assert rope["partial_rotary_factor"] == 0.25 and rope["rope_type"] == "yarn"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(back), _logits(hf_model), atol=1e-4, rtol=0)
    original, again = (
        load_file(folder / "model.safetensors"),
        load_file(tmp_path / "out/model.safetensors"),
    )
    assert sorted(again) == sorted(original)
    assert all(torch.equal(again[name], original[name]) for name in original)


def test_the_whole_head_rotated_is_written_as_factor_one(hf_folders):
    config = dataclasses.replace(load_hf(hf_folders["tiny"][1]).config, rotary_dim=None)
    written = hf_config(config, "glm4_moe")
    assert written["rope_parameters"]["partial_rotary_factor"] == 1.0
    assert "router_aux_loss_coef" not in written
    assert model_config_from_hf(written).rotary_dim is None


def test_unsupported_options_are_refused_together():
    hf = GLM_4_5 | {
        "hidden_act": "gelu",
        "attention_dropout": 0.1,
        "n_shared_experts": 0,
        "n_group": 160,
        "partial_rotary_factor": 0.01,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        "topk_method": "greedy",
        "scoring_func": "softmax",
    }
    with pytest.raises(ValueError) as error:
        model_config_from_hf(hf)
    message = str(error.value)
    for part in (
        "hidden_act 'gelu'",
        "attention_dropout 0.1",
        "n_shared_experts 0",
        "n_group 160 with topk_group 1",
        "partial_rotary_factor 0.01 (rotates 1 of 128 dims",
        "rope type 'linear'",
        "topk_method 'greedy'",
        "scoring_func 'softmax'",
    ):
        assert part in message, part
    with pytest.raises(ValueError, match=r"lacks \['moe_intermediate_size'\]"):
        model_config_from_hf({k: v for k, v in GLM_4_5.items() if k != "moe_intermediate_size"})
    # the original code's keys at the values transformers computes anyway are accepted
    assert model_config_from_hf(GLM_4_5 | {"topk_method": "noaux_tc"}).moe.num_experts == 160


def test_settings_glm_cannot_write_are_named():
    config = ModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        num_layers=4,
        num_heads=4,
        qk_norm="full",
        attn_out_bias=True,
        norm="layer",
        moe_every=2,
        moe=MoEConfig(
            d_model=32,
            d_hidden=16,
            num_experts=4,
            top_k=2,
            router_bias=True,
            num_shared_experts=1,
            d_shared_hidden=24,
            shared_expert_gate=True,
        ),
    )
    problems = "; ".join(get("glm4_moe").inexpressible(config))
    for part in (
        "router 'softmax_topk' (glm4_moe has sigmoid_topk)",
        "qk_norm 'full'",
        "attn_out_bias true",
        "norm 'layer'",
        "router_bias True",
        "MoE layers [1, 3]",
        "shared_expert_gate True",
        "d_shared_hidden 24",
    ):
        assert part in problems, part
    assert get("glm4_moe").inexpressible(glm_4_5()) == []
    assert get("glm4_moe").inexpressible(dataclasses.replace(glm_4_5(), rotary_dim=32)) == []


def test_mtp_layers_are_skipped_and_load_with_mtp_true(hf_folders, tmp_path):
    """GLM-4.5 stores its MTP layer as layer L in DeepSeek-V3's layout: load_hf skips it by
    default, as transformers does; mtp=True loads it, and save_hf writes it back."""
    hf_model, folder = hf_folders["tiny"]
    base = load_hf(folder)
    model = Transformer(dataclasses.replace(base.config, mtp_depth=1))
    model.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for tensor in [*model.mtp.parameters(), *model.mtp.buffers()]:
            tensor.normal_(0.0, 0.3)
    save_hf(model, tmp_path / "a")
    assert _config_json(tmp_path / "a")["num_nextn_predict_layers"] == 1
    tensors = load_file(tmp_path / "a/model.safetensors")
    for name in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "self_attn.q_proj"):
        assert f"model.layers.3.{name}.weight" in tensors, name
    assert "model.layers.3.mlp.gate.e_score_correction_bias" in tensors
    assert torch.equal(tensors["model.layers.3.shared_head.head.weight"], tensors["lm_head.weight"])
    skipped = load_hf(tmp_path / "a")
    assert len(skipped.mtp) == 0
    torch.testing.assert_close(_logits(skipped), _logits(hf_model), atol=1e-4, rtol=0)
    in_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    torch.testing.assert_close(_logits(in_hf), _logits(hf_model), atol=1e-4, rtol=0)
    back = load_hf(tmp_path / "a", mtp=True)
    expected = model.state_dict()
    assert back.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[name]) for name, value in back.state_dict().items())


def test_flagship_counts_against_the_published_figures():
    """355B / 32B and 106B / 12B. The totals leave the MTP layer out: with it, Air would
    count 109.2B (+3%). The active figures are the counts without both embedding matrices
    (a lookup and the head); moekit's report leaves out only the input table."""
    expected = {
        # name: (total, MTP layer, active without input table, without both embeddings)
        "glm_4_5": (352_797_814_784, 3_988_069_632, 32_856_305_664, 32_080_359_424),
        "glm_4_5_air": (106_852_245_504, 2_375_059_456, 12_803_366_912, 12_182_609_920),
    }
    published = get("glm4_moe").published
    for name, build in (("glm_4_5", glm_4_5), ("glm_4_5_air", glm_4_5_air)):
        total, mtp, active, active_no_embeddings = expected[name]
        counted = count_by_part(build())
        assert counted.total_params == total
        assert counted.active_params - counted.input_embedding == active
        assert counted.active_params - counted.total["embeddings"] == active_no_embeddings
        assert count_by_part(dataclasses.replace(build(), mtp_depth=1)).total["mtp"] == mtp
        figures = published[name]
        assert abs(total / figures.total - 1) < 0.01
        assert abs(active_no_embeddings / figures.active - 1) < 0.016
    assert (total + mtp) / published["glm_4_5_air"].total - 1 > 0.03
    assert GLM_4_5_AIR["num_hidden_layers"] == 46
