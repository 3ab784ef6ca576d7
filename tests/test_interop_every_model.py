"""Every model moekit makes leaves for transformers: each MoE preset, and what upcycling,
adding experts and merging produce, is written by save_hf to the architecture chosen by
default (the first in the registry's priority order that expresses it) and reloads in
transformers with equal logits; the main job's preset's LoRA adapters load in PEFT with
the adapted logits. Random weights (seeded), fp32, at the presets' own sizes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moekit.interop import choose_architecture, hf_config, save_hf
from moekit.interop.architectures import problems_by_architecture
from moekit.interop.peft import save_peft
from moekit.models import Transformer, presets
from moekit.models.lora import LoRAConfig, add_lora, remove_lora
from moekit.surgery.add_experts import add_experts
from moekit.surgery.merge import merge_dense_models
from moekit.surgery.upcycle import upcycle, upcycle_config

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS_BT = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(3))
MOE_PRESETS = ("tiny", "small", "deepseek_v3_tiny", "gpt_oss_tiny")


def _model(config) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("router.bias"):  # selection biases: make them matter
                buffer.normal_(0.0, 0.01)
    return model


def _reloads_with_equal_logits(model: Transformer, folder) -> str:
    """save_hf's default choice, reloaded by transformers; returns the architecture."""
    save_hf(model, folder)
    back = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            back(TOKENS_BT).logits, model(TOKENS_BT).logits, atol=1e-4, rtol=0
        )
    return back.config.model_type


@pytest.mark.parametrize("name", MOE_PRESETS)
def test_every_moe_preset_has_an_architecture(name):
    config = presets.PRESETS[name]()
    chosen = choose_architecture(config)
    assert problems_by_architecture(config)[chosen] == [], chosen
    assert hf_config(config)["model_type"] == chosen


@pytest.mark.parametrize("name", ("tiny", "deepseek_v3_tiny", "gpt_oss_tiny"))
def test_every_small_preset_reloads_in_transformers(tmp_path, name):
    model = _model(presets.PRESETS[name]())
    assert _reloads_with_equal_logits(model, tmp_path / "hf") == choose_architecture(model.config)


def test_the_main_jobs_adapters_load_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    lora = LoRAConfig(rank=4, alpha=8.0, targets="attention,experts,shared,router")
    model = add_lora(_model(presets.tiny()), lora)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        ours = model(TOKENS_BT).logits
    save_peft(model, tmp_path / "adapter", lora)
    save_hf(remove_lora(model), tmp_path / "hf")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        torch.testing.assert_close(adapted(TOKENS_BT).logits, ours, atol=1e-4, rtol=1e-4)


def test_an_upcycled_model_leaves(tmp_path):
    dense = _model(presets.tiny_dense())
    moe = upcycle(dense, upcycle_config(dense.config, num_experts=4, top_k=2)).eval()
    _reloads_with_equal_logits(moe, tmp_path / "hf")


def _sigmoid_ungrouped():
    """deepseek_v3_tiny with one group: what `offset` adds experts to exactly."""
    config = presets.deepseek_v3_tiny()
    moe = dataclasses.replace(config.moe, num_groups=1, topk_groups=1)
    return dataclasses.replace(config, moe=moe)


@pytest.mark.parametrize(
    ("build", "method"),
    [(presets.tiny, "split"), (presets.tiny, "grow"), (_sigmoid_ungrouped, "offset")],
)
def test_a_model_with_added_experts_leaves(tmp_path, build, method):
    model = add_experts(_model(build()), 16, method).eval()
    _reloads_with_equal_logits(model, tmp_path / "hf")


def test_merged_dense_models_leave(tmp_path):
    config = dataclasses.replace(presets.tiny_dense(), num_layers=2)
    models = [_model(config) for _ in range(2)]
    with torch.no_grad():
        for seed, model in enumerate(models):
            for param in model.parameters():
                param.add_(
                    torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)) * 0.01
                )
    merged = merge_dense_models(models).eval()
    _reloads_with_equal_logits(merged, tmp_path / "hf")


def test_a_model_no_architecture_expresses_names_the_closest():
    config = presets.tiny()
    config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, capacity_factor=1.25))
    with pytest.raises(ValueError, match=r"cannot express: capacity_factor 1.25.*the closest of"):
        hf_config(config)


MICRO_TINY = [
    "--preset", "tiny", "--no-compare", "--model.vocab_size", "320", "--model.d_model", "32",
    "--model.num_layers", "2", "--model.num_heads", "2", "--model.num_kv_heads", "1",
    "--model.max_seq_len", "128", "--model.moe.d_model", "32", "--model.moe.d_hidden", "16",
    "--model.moe.d_shared_hidden", "32", "--steps", "2", "--batch-size", "4", "--seq-len", "32",
    "--no-progress",
]  # fmt: skip


def test_finetune_of_a_tiny_run_writes_a_peft_adapter_with_the_runs_logits(tmp_path, text_file):
    """The main job's model, LoRA-fine-tuned by `moekit finetune`, leaves as a base folder
    plus a PEFT adapter that transformers + peft run with moekit's logits."""
    import json

    from helpers import run_cli

    from moekit.train import load_trained_model

    peft = pytest.importorskip("peft")
    code, _, stderr = run_cli(
        "train", "--data", str(text_file), "--out", str(tmp_path / "run"), *MICRO_TINY
    )
    assert code == 0, stderr
    chats = tmp_path / "chats.jsonl"
    line = json.dumps({"prompt": "What is two plus two?", "response": "It is four."})
    chats.write_text((line + "\n") * 8)
    out = tmp_path / "sft"
    code, stdout, stderr = run_cli(
        "finetune", str(tmp_path / "run"), "--data", str(chats), "--out", str(out),
        "--steps", "2", "--train.batch_size", "2", "--train.seq_len", "128", "--lora.rank", "4",
        "--no-progress",
    )  # fmt: skip
    assert code == 0, stderr
    tokens_BT = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(0))
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    with torch.no_grad():
        adapted = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
        ours = load_trained_model(out)(tokens_BT).logits
        torch.testing.assert_close(adapted(tokens_BT).logits, ours, atol=1e-4, rtol=1e-4)
