"""`moekit finetune` with LoRA's default targets (attention, experts) on tiny DeepSeek-V3 and
gpt-oss checkpoints built with transformers: two steps, and the exported adapter loaded by
PEFT on the exported base computes what moekit reads back from the run."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.cli import main
from moekit.data import train_tokenizer
from moekit.train import load_trained_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "What is two plus two? It is four. Hello there, how are you? I am fine, thanks.\n" * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TEXT], vocab_size=300)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    lines = [
        {"prompt": "What is two plus two?", "response": "It is four."},
        {"prompt": "Hello there", "response": "how are you? I am fine, thanks."},
    ] * 6
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def deepseek_v3(vocab_size: int):
    config = transformers.DeepseekV3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=16,
        kv_lora_rank=12,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        max_position_embeddings=64,
    )
    return transformers.DeepseekV3ForCausalLM(config)


def gpt_oss(vocab_size: int):
    config = transformers.GptOssConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4,
        max_position_embeddings=64,
        swiglu_limit=1.5,
    )
    config._attn_implementation = "eager"
    return transformers.GptOssForCausalLM(config)


@pytest.mark.parametrize("build", [deepseek_v3, gpt_oss])
def test_default_lora_finetune_exports_an_adapter_peft_reproduces(
    tmp_path, tokenizer, data_file, build
):
    torch.manual_seed(0)
    base = tmp_path / "base"
    build(tokenizer.vocab_size).save_pretrained(base)
    (base / "tokenizer.json").write_text(tokenizer.backend.to_str())
    out = tmp_path / "sft"
    args = ["finetune", str(base), "--data", str(data_file), "--out", str(out)]
    args += ["--steps", "2", "--train.batch_size", "4", "--lora.rank", "4", "--no-progress"]
    assert main(args) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert "self_attn.o_proj" in config["target_modules"]
    assert "mlp.experts.gate_up_proj" in config["target_parameters"]
    tokens = torch.tensor([[3, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        ours = load_trained_model(out)(tokens).logits  # the run, its adapters merged
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            out / "hf", attn_implementation="eager"
        ).eval()
        base_logits = hf_model(tokens).logits
        peft_model = peft.PeftModel.from_pretrained(hf_model, out / "adapter").eval()
        theirs = peft_model(tokens).logits
    assert not torch.allclose(base_logits, ours, atol=1e-6)  # two steps moved the adapters
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
