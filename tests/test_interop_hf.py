"""Hugging Face interop beyond the contract every family keeps (tests/test_interop_contract.py):
sharded folders, dtypes, tied embeddings, the fused layout, the config semantics of the
Mixtral-like families, and every error.

Each architecture is its tiny random model from tests/builders.py (the contract suite's).
"""

from __future__ import annotations

import json

import pytest
import torch
from builders import VOCAB
from builders import hf_model as build_hf
from helpers import folder_tensors
from safetensors.torch import load_file, save_file

from moekit.interop import load_hf, model_config_from_hf, save_hf
from moekit.interop.hf import weight_files
from moekit.models import presets

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
TOKENS_BT = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """{arch: (transformers model, folder it was saved to)}; mixtral is saved in shards."""
    folders = {}
    for arch in ARCHS:
        model = build_hf(arch)
        folder = tmp_path_factory.mktemp(arch)
        model.save_pretrained(folder, max_shard_size="40KB" if arch == "mixtral" else "5GB")
        folders[arch] = (model, folder)
    return folders


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS_BT).logits


def test_sharded_checkpoint_is_read_through_its_index(hf_folders):
    _, folder = hf_folders["mixtral"]
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(set(weight_files(folder).values())) > 1


def test_bfloat16_checkpoint_stays_bfloat16_and_round_trips(tmp_path):
    model = build_hf("olmoe").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    assert ours.tok_embed.weight.dtype == torch.bfloat16
    save_hf(ours, tmp_path / "out")
    for name, tensor in folder_tensors(tmp_path / "hf").items():
        assert torch.equal(folder_tensors(tmp_path / "out")[name], tensor), name


def test_fused_expert_layout_is_read_too(hf_folders, tmp_path):
    """transformers' in-memory names (experts.gate_up_proj (E, 2F, D)) load as well."""
    hf_model, folder = hf_folders["qwen2_moe"]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    torch.testing.assert_close(_logits(load_hf(tmp_path)), _logits(hf_model), atol=1e-4, rtol=0)


def test_tied_embeddings_load_save_and_reload(tmp_path):
    hf_model = build_hf("mixtral", tie_word_embeddings=True)
    hf_model.tie_weights()
    hf_model.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    assert ours.lm_head.weight is ours.tok_embed.weight
    torch.testing.assert_close(_logits(ours), _logits(hf_model), atol=1e-4, rtol=0)
    save_hf(ours, tmp_path / "out")
    assert "lm_head.weight" not in folder_tensors(tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(back), _logits(ours), atol=1e-5, rtol=0)


def test_config_semantics_are_mapped(hf_folders):
    qwen2 = model_config_from_hf(
        json.loads((hf_folders["qwen2_moe"][1] / "config.json").read_text())
    )
    assert qwen2.moe_layers == [0, 2] and qwen2.d_hidden == 40
    assert qwen2.qkv_bias and not qwen2.attn_out_bias and not qwen2.moe.renormalize
    assert qwen2.moe.shared_expert_gate and qwen2.moe.shared_hidden == 24
    mixtral = model_config_from_hf(
        json.loads((hf_folders["mixtral"][1] / "config.json").read_text())
    )
    assert mixtral.rope_theta == 1e6 and mixtral.moe.renormalize and not mixtral.tied_embeddings
    # transformers' balance loss is top_k times Switch's (it sums f_i over the top_k picks)
    assert mixtral.moe.balance_loss_coef == pytest.approx(0.001 * 2)


# ---------------------------------------------------------------- errors


def _copy_folder(folder, tmp_path):
    for file in folder.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    return tmp_path


def test_unsupported_architecture_is_one_clear_error(hf_folders, tmp_path):
    folder = _copy_folder(hf_folders["olmoe"][1], tmp_path)
    config = json.loads((folder / "config.json").read_text()) | {"model_type": "llama"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"unsupported architecture 'llama'.*mixtral, qwen2_moe, qwen3_moe, olmoe"
    ):
        load_hf(folder)


def test_unsupported_options_are_listed_together(hf_folders, tmp_path):
    folder = _copy_folder(hf_folders["mixtral"][1], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config |= {
        "sliding_window": 16,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0},
    }
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"cannot reproduce: .*sliding_window 16.*rope type 'yarn'"
    ):
        load_hf(folder)


def test_missing_tensor_is_named(hf_folders, tmp_path):
    folder = _copy_folder(hf_folders["olmoe"][1], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    del tensors["model.layers.2.self_attn.q_norm.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        ValueError,
        match=r"missing tensors \[model.layers.1.mlp.experts.3.up_proj.weight, "
        r"model.layers.2.self_attn.q_norm.weight\] \(2\)",
    ):
        load_hf(folder)


def test_unexpected_tensor_is_named(hf_folders, tmp_path):
    folder = _copy_folder(hf_folders["olmoe"][1], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.experts.4.up_proj.weight"] = torch.zeros(16, 32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"unexpected tensors \[model.layers.0.mlp.experts.4.up_proj.weight\]"
    ):
        load_hf(folder)


def test_wrong_shape_is_named(hf_folders, tmp_path):
    folder = _copy_folder(hf_folders["olmoe"][1], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(31)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"norm.weight \(31,\) \(config says \(32,\)\)"):
        load_hf(folder)


def test_settings_no_architecture_expresses_are_named(tmp_path):
    torch.manual_seed(0)
    from moekit.models import Transformer

    tiny = Transformer(presets.tiny())  # a shared expert without a gate
    with pytest.raises(
        ValueError, match=r"qwen2_moe architecture cannot express: .*shared_expert_gate False"
    ):
        save_hf(tiny, tmp_path / "out", architecture="qwen2_moe")
    with pytest.raises(
        ValueError, match=r"mixtral architecture cannot express: num_shared_experts 1"
    ):
        save_hf(tiny, tmp_path / "out", architecture="mixtral")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe"])
def test_cached_decoding_equals_the_full_forward_with_qk_norm(hf_folders, arch):
    """q/k norms run before the cache, so token-by-token decoding sees the same keys."""
    from moekit.generate import KVCache

    model = load_hf(hf_folders[arch][1])
    cache = KVCache.for_model(model, batch_size=2, max_len=12)
    with torch.no_grad():
        steps = [model(TOKENS_BT[:, t : t + 1], kv_cache=cache).logits for t in range(12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), _logits(model), atol=1e-5, rtol=0)


def test_dense_layers_must_be_layer_indices():
    from moekit import MoEConfig
    from moekit.models import ModelConfig

    moe = MoEConfig(d_model=16, d_hidden=8, num_experts=4)
    with pytest.raises(ValueError, match=r"dense_layers \[3\] are not layer indices in \[0, 3\)"):
        ModelConfig(
            vocab_size=32, d_model=16, num_layers=3, num_heads=2, moe=moe, dense_layers=[0, 3]
        )
    with pytest.raises(ValueError, match=r"unknown qk_norm 'rms'"):
        ModelConfig(vocab_size=32, d_model=16, num_layers=3, num_heads=2, qk_norm="rms")


def test_tied_head_written_anyway_is_accepted_only_when_equal(tmp_path):
    hf_model = build_hf("olmoe", tie_word_embeddings=True)
    hf_model.tie_weights()
    hf_model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    torch.testing.assert_close(_logits(load_hf(tmp_path)), _logits(hf_model), atol=1e-4, rtol=0)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected tensors \[lm_head.weight\]"):
        load_hf(tmp_path)
