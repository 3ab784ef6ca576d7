"""MiniMax-M2 beyond the contract suite (tests/test_interop_contract.py): the config mapping,
where the partial rotary width comes from, every refusal in one error, what the
architecture cannot write, YaRN with partial rotary against transformers, the MTP layers a
checkpoint may hold skipped, and the flagship's count against the model card.

Tiny random MiniMaxM2ForCausalLM models (offline, seeded, fp32, eager attention): head_dim
12 on a 32-wide model, 6 of each head's dims rotated, weights std 0.3, correction biases
std 0.1 so that they change the routing.
"""

from __future__ import annotations

import dataclasses
import json

import builders
import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit.config import MoEConfig
from moekit.interop import famous, hf_config, load_hf, model_config_from_hf, save_hf
from moekit.interop.architectures import get
from moekit.interop.architectures.minimax_m2 import MINIMAX_M2
from moekit.models import ModelConfig

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96
TOKENS_BT = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
SETTINGS = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    rotary_dim=6,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def _build(**overrides):
    return builders.hf_model("minimax_m2", settings=SETTINGS, **overrides)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS_BT).logits


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    model = _build()
    folder = tmp_path_factory.mktemp("minimax_m2")
    model.save_pretrained(folder)
    return model, folder


def test_config_maps_to_sigmoid_routing_full_qk_norm_and_partial_rotary(hf_folder):
    hf_model, folder = hf_folder
    ours = load_hf(folder)
    config, moe = ours.config, ours.config.moe
    assert (config.head_dim, config.rotary_dim, config.qk_norm) == (12, 6, "full")
    assert (config.num_kv_heads, config.tied_embeddings, config.rope_theta) == (2, False, 5e6)
    assert (config.qkv_bias, config.attn_out_bias, config.moe_layers) == (False, False, [0, 1])
    assert (moe.router, moe.num_experts, moe.top_k, moe.d_hidden) == ("sigmoid_topk", 8, 2, 16)
    assert (moe.renormalize, moe.num_groups, moe.routed_scaling) == (True, 1, 1.0)
    assert moe.num_shared_experts == 0
    assert moe.balance_loss_coef == pytest.approx(0.001 * 2)  # router_aux_loss_coef * top_k
    for i, layer in enumerate(hf_model.model.layers):
        torch.testing.assert_close(
            ours.layers[i].ffn.router.bias, layer.mlp.e_score_correction_bias, atol=0, rtol=0
        )


def test_saved_config_gives_the_rotary_width_both_ways(hf_folder, tmp_path):
    _, folder = hf_folder
    save_hf(load_hf(folder), tmp_path / "out", architecture="minimax_m2")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["rotary_dim"] == 6
    assert written["rope_parameters"]["partial_rotary_factor"] == 0.5
    on_disk = load_file(tmp_path / "out" / "model.safetensors")
    assert "model.layers.0.block_sparse_moe.e_score_correction_bias" in on_disk
    assert "model.layers.0.block_sparse_moe.experts.7.w3.weight" in on_disk


@pytest.mark.parametrize(
    "keys, rotary",
    [
        ({"rotary_dim": 32}, 32),  # the released checkpoints' legacy key
        ({"partial_rotary_factor": 0.25, "rotary_dim": 64}, 32),  # a top-level factor first
        ({"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.75}}, 96),
        ({}, None),  # the whole head
    ],
)
def test_rotary_width_is_read_as_transformers_reads_it(keys, rotary):
    base = {k: v for k, v in MINIMAX_M2.items() if k != "rotary_dim"}
    assert model_config_from_hf(base | keys).rotary_dim == rotary
    theirs = transformers.MiniMaxM2Config(**{k: v for k, v in (base | keys).items()})
    factor = theirs.rope_parameters.get("partial_rotary_factor", 1.0)
    assert int(theirs.head_dim * factor) == (rotary or theirs.head_dim)


def test_every_unsupported_option_is_refused_in_one_error():
    hf = MINIMAX_M2 | {
        "router_jitter_noise": 0.1,
        "attention_bias": True,
        "sliding_window": 4096,
        "attn_type_list": [0, 1],
        "scoring_func": "softmax",
        "use_qk_norm": False,
        "use_routing_bias": False,
        "routed_scaling_factor": 2.5,
        "shared_intermediate_size": 1536,
        "num_expert_group": 8,
        "rotary_dim": 63,
        "hidden_act": "gelu",
        "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e6},
    }
    with pytest.raises(ValueError) as refused:
        model_config_from_hf(hf)
    message = str(refused.value)
    for named in (
        "router_jitter_noise 0.1",
        "attention_bias",
        "sliding_window 4096",
        "attn_type_list",
        "scoring_func 'softmax'",
        "use_qk_norm False",
        "use_routing_bias False",
        "routed_scaling_factor 2.5",
        "shared_intermediate_size 1536",
        "num_expert_group 8",
        "rotary width of 63",
        "hidden_act 'gelu'",
        "rope type 'linear'",
    ):
        assert named in message, named


def test_a_config_outside_the_architecture_names_every_setting():
    moe = MoEConfig(
        d_model=64,
        d_hidden=32,
        num_experts=4,
        top_k=2,
        router="softmax_topk",
        num_shared_experts=1,
        routed_scaling=2.0,
        renormalize=False,
    )
    config = ModelConfig(
        vocab_size=VOCAB,
        d_model=64,
        num_layers=3,
        num_heads=4,
        qk_norm="head",
        qkv_bias=True,
        first_dense_layers=1,
        norm="layer",
        lm_head_bias=True,
        moe=moe,
    )
    problems = "; ".join(get("minimax_m2").inexpressible(config))
    for named in (
        "router 'softmax_topk'",
        "qk_norm 'head'",
        "num_shared_experts 1",
        "dense layers [0]",
        "attention biases",
        "routed_scaling 2.0",
        "renormalize false",
        "norm 'layer'",
        "lm_head_bias",
    ):
        assert named in problems, named
    fits = dataclasses.replace(
        config,
        qk_norm="full",
        qkv_bias=False,
        first_dense_layers=0,
        norm="rms",
        lm_head_bias=False,
        rotary_dim=8,
        moe=dataclasses.replace(
            moe, router="sigmoid_topk", num_shared_experts=0, routed_scaling=1.0, renormalize=True
        ),
    )
    assert get("minimax_m2").inexpressible(fits) == []
    assert hf_config(fits, "minimax_m2")["rope_parameters"]["partial_rotary_factor"] == 0.5


def test_yarn_with_partial_rotary_gives_transformers_logits(tmp_path):
    rope = {
        "rope_type": "yarn",
        "rope_theta": 5e6,
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "partial_rotary_factor": 0.5,
    }
    model = _build(rope_parameters=rope)
    model.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    assert ours.config.rope_scaling["type"] == "yarn" and ours.config.rotary_dim == 6
    torch.testing.assert_close(_logits(ours), _logits(model), atol=1e-4, rtol=0)


def test_mtp_layers_in_a_checkpoint_are_skipped(hf_folder, tmp_path):
    hf_model, folder = hf_folder
    tensors = load_file(folder / "model.safetensors")
    # one MTP module stored after the last layer, as the released checkpoints may hold it
    tensors |= {
        name.replace("model.layers.1.", "model.layers.2."): t.clone()
        for name, t in tensors.items()
        if name.startswith("model.layers.1.")
    }
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="unexpected tensors"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf | {"num_mtp_modules": 1}))
    torch.testing.assert_close(_logits(load_hf(tmp_path)), _logits(hf_model), atol=1e-4, rtol=0)


def test_flagship_is_the_published_config_and_lands_on_the_card():
    config = get("minimax_m2").flagships["minimax_m2"]()
    assert (config.d_model, config.num_layers, config.head_dim, config.rotary_dim) == (
        3072,
        62,
        128,
        64,
    )
    assert (config.moe.num_experts, config.moe.top_k, config.moe.d_hidden) == (256, 8, 1536)
    accounting = famous.FAMOUS["minimax_m2"]()
    published = famous.PUBLISHED["minimax_m2"]
    # MINIMAX_M2 is the Hub's config.json: transformers reads it as moekit does, its
    # rotary_dim 64 as half of each 128-wide head (transformers' own defaults have the same
    # sizes but rotate the whole head: the key is the checkpoint's)
    theirs = transformers.MiniMaxM2Config(
        **{k: v for k, v in MINIMAX_M2.items() if k != "model_type"}
    )
    assert theirs.rope_parameters["partial_rotary_factor"] == 0.5
    defaults = transformers.MiniMaxM2Config()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim"):
        assert MINIMAX_M2[key] == getattr(defaults, key) == getattr(theirs, key), key
    assert "partial_rotary_factor" not in defaults.rope_parameters
    assert accounting.total_params == pytest.approx(published.total, rel=0.01)  # 228.69B
    without_lookup = accounting.active_params - accounting.input_embedding
    assert round(without_lookup / 1e9) == 10  # 10.42B: the card's 10B to its two digits
