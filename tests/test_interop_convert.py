"""`moekit convert`: a run directory to a Hugging Face folder transformers loads with equal
logits, and back to a run directory that `moekit eval` and `moekit generate` read."""

from __future__ import annotations

import json

import pytest
import torch

from moekit import MoEConfig
from moekit.cli import main
from moekit.data import Tokenizer, train_tokenizer
from moekit.interop.convert import write_run
from moekit.models import ModelConfig, Transformer
from moekit.train.rundir import load_trained_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    "the quick brown fox jumps over the lazy dog. " * 3,
    "a mixture of experts routes tokens. " * 3,
]


def _qwen2_like() -> ModelConfig:
    """A config qwen2_moe expresses: gated shared expert, q/k/v biases, one dense layer."""
    return ModelConfig(
        vocab_size=320,
        d_model=32,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=64,
        qkv_bias=True,
        d_hidden=48,
        dense_layers=[1],
        tied_embeddings=False,
        moe=MoEConfig(
            d_model=32,
            d_hidden=16,
            num_experts=4,
            top_k=2,
            renormalize=False,
            num_shared_experts=1,
            d_shared_hidden=24,
            shared_expert_gate=True,
        ),
    )


@pytest.fixture
def run_dir(tmp_path):
    torch.manual_seed(0)
    model = Transformer(_qwen2_like()).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    run = tmp_path / "run"
    run.mkdir()
    write_run(model, run, source="test")
    train_tokenizer(TEXTS, vocab_size=300).save(run)
    return run


def _logits(model, tokens_BT):
    with torch.no_grad():
        return model(tokens_BT).logits


def test_run_to_hf_to_run(run_dir, tmp_path, capsys):
    tokens_BT = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    ours = load_trained_model(run_dir)

    # 1. run -> Hugging Face: transformers reads it, with equal logits and the token ids
    assert main(["convert", str(run_dir), str(tmp_path / "hf")]) == 0
    assert "wrote Hugging Face folder" in capsys.readouterr().out
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf_model).__name__ == "Qwen2MoeForCausalLM"
    torch.testing.assert_close(
        _logits(hf_model, tokens_BT), _logits(ours, tokens_BT), atol=1e-5, rtol=0
    )
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == 0 and config["mlp_only_layers"] == [1]
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == (
        run_dir / "tokenizer.json"
    ).read_text()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer.encode(TEXTS[1]) == Tokenizer.load(run_dir).encode(TEXTS[1])
    assert hf_tokenizer.eos_token_id == 0

    # 2. Hugging Face -> run: the same weights, bit for bit; eval and generate read it
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "run2")]) == 0
    back = load_trained_model(tmp_path / "run2")
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    (tmp_path / "text.txt").write_text(TEXTS[0] * 40)
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                str(tmp_path / "run2"),
                "--data",
                str(tmp_path / "text.txt"),
                "--max-batches",
                "1",
            ]
        )
        == 0
    )
    assert "validation loss" in capsys.readouterr().out
    assert (
        main(
            [
                "generate",
                str(tmp_path / "run2"),
                "--prompt",
                "the",
                "--max-new-tokens",
                "3",
                "--temperature",
                "0",
            ]
        )
        == 0
    )


def test_hf_folder_to_run_keeps_transformers_logits(tmp_path):
    from builders import hf_model

    tokens_BT = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    hf = hf_model("qwen3_moe")
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["qk_norm"] == "head" and saved["model"]["head_dim"] == 12
    ours = load_trained_model(tmp_path / "run")
    torch.testing.assert_close(_logits(ours, tokens_BT), _logits(hf, tokens_BT), atol=1e-4, rtol=0)


def test_convert_errors_are_one_line(run_dir, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["convert", str(run_dir), str(tmp_path / "full")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert main(["convert", str(run_dir), str(tmp_path / "out"), "--architecture", "olmoe"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moekit convert: error: the olmoe architecture cannot express:")
    assert "num_shared_experts 1" in err and "qk_norm None" in err
    assert not (tmp_path / "out").exists()
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "is not a Hugging Face model folder" in capsys.readouterr().err
