"""Phi-3.5-MoE (phimoe) beyond the contract suite: the config mapping, every refusal in one
error, what the architecture cannot write, the fused in-memory layout on disk, and the
published flagship's count.

The model is a tiny random PhimoeForCausalLM (offline, seeded, fp32, eager attention),
its weights drawn wide (std 0.3), with attention and head biases and a jitter threshold
of 0.4, under which about a third of the sparsemixer weights are below 1.
"""

from __future__ import annotations

import json
from dataclasses import replace

import builders
import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit.config import MoEConfig
from moekit.interop import hf_config, load_hf, model_config_from_hf, save_hf
from moekit.interop.architectures import choose_architecture, get
from moekit.interop.architectures.phimoe import PHI_3_5_MOE_INSTRUCT, phi_3_5_moe
from moekit.interop.famous import FAMOUS, PUBLISHED
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
    num_local_experts=4,
    max_position_embeddings=64,
    attention_bias=True,
    lm_head_bias=True,
    router_jitter_noise=0.4,
    sliding_window=64,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def _build(**overrides):
    """A tiny random PhimoeForCausalLM (eager attention), weights drawn with std 0.3."""
    return builders.hf_model("phimoe", settings=SETTINGS, **overrides)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    model = _build()
    folder = tmp_path_factory.mktemp("phimoe")
    model.save_pretrained(folder)
    return model, folder


def _logits(model, tokens_BT=TOKENS_BT) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens_BT).logits


def _hf(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_config_maps_every_phimoe_setting(hf_folder):
    _, folder = hf_folder
    config = model_config_from_hf(_hf(folder))
    assert (config.norm, config.norm_eps, config.lm_head_bias) == ("layer", 1e-5, True)
    assert config.qkv_bias and config.attn_out_bias and config.qk_norm is None
    assert (config.head_dim, config.num_kv_heads, config.rope_theta) == (8, 2, 1e6)
    assert config.rope_scaling is None and config.rotary_dim is None
    assert not config.tied_embeddings and config.moe_layers == [0, 1]
    moe = config.moe
    assert (moe.router, moe.jitter_eps, moe.top_k, moe.renormalize) == (
        "sparsemixer",
        0.4,
        2,
        False,
    )
    assert (moe.num_experts, moe.d_hidden, moe.router_bias, moe.expert_bias) == (4, 16, 0, 0)
    assert moe.balance_loss_coef == pytest.approx(0.001 * 2)  # router_aux_loss_coef * top_k


def test_a_transformers_4_config_json_reads_the_same():
    """Phi-3.5-MoE's own keys (transformers 4.43): rope_theta at the top, rope_scaling
    null, a sliding window as long as the positions, hidden_dropout (unused)."""
    hf = {
        "model_type": "phimoe",
        "architectures": ["PhiMoEForCausalLM"],
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 64,
        "sliding_window": 64,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "hidden_dropout": 0.0,
        "input_jitter_noise": 0.0,
    }
    config = model_config_from_hf(hf)
    assert config.rope_theta == 1e4 and config.moe.jitter_eps == 0.01  # transformers' default
    assert not config.qkv_bias and not config.lm_head_bias and config.norm == "layer"


def test_options_without_an_equivalent_are_refused_in_one_error(hf_folder):
    _, folder = hf_folder
    hf = _hf(folder) | {
        "hidden_act": "gelu",
        "attention_dropout": 0.1,
        "input_jitter_noise": 0.01,
        "num_experts_per_tok": 3,
        "router_jitter_noise": 0.0,
        "sliding_window": 16,
        "rope_parameters": {
            "rope_type": "longrope",
            "rope_theta": 1e4,
            "short_factor": [1.0] * 4,
            "long_factor": [2.0] * 4,
            "short_mscale": 1.2,
            "long_mscale": 1.2,
            "original_max_position_embeddings": 16,
        },
    }
    with pytest.raises(ValueError) as error:
        model_config_from_hf(hf)
    message = str(error.value)
    for part in (
        "hidden_act 'gelu'",
        "attention_dropout 0.1",
        "input_jitter_noise 0.01",
        "num_experts_per_tok 3 (transformers' phimoe router always picks 2",
        "router_jitter_noise 0.0",
        "sliding_window 16 (shorter than max_position_embeddings)",
        "rope type 'longrope'",
    ):
        assert part in message, part


def test_the_published_config_is_refused_for_its_longrope_and_input_jitter():
    with pytest.raises(ValueError, match="input_jitter_noise 0.01.*rope type 'longrope'"):
        model_config_from_hf(PHI_3_5_MOE_INSTRUCT)


def test_flagship_count_matches_the_published_figures():
    """41,873,153,344 total (the Hub's 41.9B), 6,640,999,744 active per token (6.6B): the
    active count includes the input embedding (131,334,144); without it 6.51B."""
    config = phi_3_5_moe()
    assert (config.d_model, config.num_layers, config.moe.d_hidden) == (4096, 32, 6400)
    assert (config.moe.num_experts, config.moe.top_k, config.vocab_size) == (16, 2, 32064)
    accounting = FAMOUS["phi_3_5_moe"]()
    assert accounting.total["routed_experts"] == 32 * 16 * 3 * 4096 * 6400
    # q, o: 4096 x 4096; k, v: 4096 x 1024; all with biases
    per_layer = 2 * (4096 * 4096 + 4096) + 2 * (4096 * 1024 + 1024)
    assert accounting.total["attention"] == 32 * per_layer
    # two LayerNorms per layer and the final one, weights and biases
    assert accounting.total["norms"] == (2 * 32 + 1) * 2 * 4096
    assert accounting.total["embeddings"] == 2 * 32064 * 4096 + 32064  # the head's bias
    published = PUBLISHED["phi_3_5_moe"]
    assert accounting.total_params / published.total == pytest.approx(1, abs=0.01)
    assert accounting.active_params / published.active == pytest.approx(1, abs=0.01)


def test_on_disk_names_are_mixtrals_and_in_memory_names_load_too(hf_folder, tmp_path):
    hf_model, folder = hf_folder
    names = set(load_file(folder / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
    assert {"model.norm.bias", "lm_head.bias", "model.layers.0.input_layernorm.bias"} <= names
    # a folder of transformers' in-memory names: mlp.router, fused experts
    fused = tmp_path / "fused"
    fused.mkdir()
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert "model.layers.0.mlp.router.weight" in state
    save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    (fused / "config.json").write_text(json.dumps(_hf(folder)))
    torch.testing.assert_close(_logits(load_hf(fused)), _logits(hf_model), atol=1e-4, rtol=0)


def test_saved_config_json_keeps_the_phimoe_settings(hf_folder, tmp_path):
    _, folder = hf_folder
    save_hf(load_hf(folder), tmp_path / "out")
    written = _hf(tmp_path / "out")
    assert written["model_type"] == "phimoe" and written["architectures"] == ["PhimoeForCausalLM"]
    assert (written["router_jitter_noise"], written["input_jitter_noise"]) == (0.4, 0.0)
    assert written["attention_bias"] and written["lm_head_bias"]
    assert written["num_experts_per_tok"] == 2 and written["num_local_experts"] == 4


def _sparsemixer_config(**fields) -> ModelConfig:
    moe = MoEConfig(d_model=32, d_hidden=16, num_experts=4, top_k=2, router="sparsemixer")
    settings = dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, norm="layer")
    return ModelConfig(**(settings | {"moe": moe} | fields))


def test_a_sparsemixer_model_with_layer_norms_is_written_as_phimoe():
    config = _sparsemixer_config(lm_head_bias=True)
    assert choose_architecture(config) == "phimoe"
    assert hf_config(config)["model_type"] == "phimoe"


def test_what_phimoe_cannot_write_is_named():
    moe = MoEConfig(
        d_model=32,
        d_hidden=16,
        num_experts=4,
        top_k=3,
        router="softmax_topk",
        num_shared_experts=1,
        router_bias=True,
    )
    config = ModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        num_layers=3,
        num_heads=4,
        qkv_bias=True,
        qk_norm="head",
        rotary_dim=4,
        norm="rms",
        residual_multiplier=0.5,
        rope_scaling={"type": "yarn", "factor": 2.0, "original_max_seq_len": 512},
        first_dense_layers=1,
        moe=moe,
    )
    problems = "; ".join(get("phimoe").inexpressible(config))
    for part in (
        "router 'softmax_topk' (phimoe has sparsemixer)",
        "norm 'rms'",
        "rotary_dim 4",
        "residual_multiplier 0.5",
        "router_bias True",
        "rope_scaling",
        "qk_norm 'head'",
        "num_shared_experts 1",
        "qkv_bias True with attn_out_bias False",
        "dense layers [0]",
    ):
        assert part in problems, part
    top_3 = replace(moe, router="sparsemixer", num_shared_experts=0, router_bias=False)
    assert get("phimoe").inexpressible(_sparsemixer_config(moe=top_3)) == [
        "top_k 3 (phimoe's sparsemixer picks 2)"
    ]
