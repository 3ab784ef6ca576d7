"""LoRA on DeepSeek-V2/V3 (multi-head latent attention) and gpt-oss (sink attention with
biases, biased experts with the clamped SwiGLU) equals PEFT on transformers' model.

Each case starts from a tiny random transformers model (offline, seeded, fp32, weights drawn
wide so that routing, rotary dims and the clamp matter), loads it into moekit, adds random
adapters (random lora_B too, so they are not zero), and exports the base (save_hf) and the
adapters (save_peft): PeftModel on the exported base computes our adapted logits, and the
merge computes them too. The DeepSeek cases cover q_proj and q_a_proj/q_b_proj, whose
rotary output rows (and kv_a_proj_with_mqa's) are reordered on export; gpt-oss's cover the
gate/up interleave of gate_up_proj and its (E, D, 2F) orientation.
"""

from __future__ import annotations

import json

import pytest
import torch
from builders import DEEPSEEK_COMMON, VOCAB, gpt_oss_model
from safetensors.torch import load_file

from moekit.interop import load_hf, save_hf
from moekit.interop.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_peft
from moekit.models.lora import LoRAConfig, add_lora, merge_lora, remove_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS_BT = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
# the interop tests' tiny DeepSeek shapes, with two layers and four experts
DEEPSEEK = DEEPSEEK_COMMON | dict(num_hidden_layers=2, n_routed_experts=4)


def deepseek_v3():
    # a compressed query (q_a_proj, q_b_proj), 2 groups of 2 experts, one kept
    config = transformers.DeepseekV3Config(**DEEPSEEK, q_lora_rank=16, n_group=2, topk_group=1)
    return transformers.DeepseekV3ForCausalLM(config)


def deepseek_v2():
    # DeepSeek-V2-Lite's shape: one query projection (q_proj), plain top-k, 2 shared experts
    config = transformers.DeepseekV2Config(
        **DEEPSEEK, q_lora_rank=None, topk_method="greedy", n_shared_experts=2
    )
    return transformers.DeepseekV2ForCausalLM(config)


def gpt_oss():
    # the interop tests' tiny gpt-oss (eager attention), two layers, experts of width 16
    return gpt_oss_model(intermediate_size=16, num_hidden_layers=2)


def wide(hf_model):
    """Weights drawn wide (std 0.3; gpt-oss's sinks std 1), in place; returns the model."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            param.normal_(0.0, 1.0 if name.endswith("sinks") else 0.3)
        for name, buffer in hf_model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.1)
    return hf_model.eval()


def adapted(folder, targets: str):
    """The moekit model of folder with random adapters on targets (lora_B random too)."""
    model = add_lora(load_hf(folder), LoRAConfig(rank=4, alpha=8.0, targets=targets))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


CASES = {
    "deepseek_v3": (deepseek_v3, "attention,experts,shared,router"),
    "deepseek_v2": (deepseek_v2, "attention,experts,shared,router"),
    # shared experts without routed ones: no fused expert parameter for PEFT to confuse them with
    "deepseek_v3_shared": (deepseek_v3, "attention,shared"),
    "gpt_oss": (gpt_oss, "attention,experts,router"),
}


@pytest.mark.parametrize("case", CASES)
def test_peft_on_transformers_model_gives_our_logits(tmp_path, case):
    build, targets = CASES[case]
    wide(build()).save_pretrained(tmp_path / "original")
    model = adapted(tmp_path / "original", targets)
    base_dir, adapter_dir = tmp_path / "hf", tmp_path / "adapter"
    save_hf(remove_lora(model), base_dir)
    save_peft(model, adapter_dir, LoRAConfig(rank=4, alpha=8.0), base_model=str(base_dir))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        base_dir, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        base_logits = hf_model(TOKENS_BT).logits
        peft_model = peft.PeftModel.from_pretrained(hf_model, adapter_dir).eval()
        peft_logits = peft_model(TOKENS_BT).logits
        ours = model(TOKENS_BT).logits
        merged = merge_lora(model).eval()(TOKENS_BT).logits
    assert not torch.allclose(base_logits, ours, atol=1e-2)  # the adapters matter
    torch.testing.assert_close(peft_logits, ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged, ours, atol=1e-5, rtol=1e-5)
    # every adapter in the folder was loaded (none left unused by a wrong name)
    saved = load_file(adapter_dir / ADAPTER_WEIGHTS)
    loaded = peft.get_peft_model_state_dict(peft_model)
    assert set(saved) == set(loaded)


def test_deepseek_targets_name_its_projections(tmp_path):
    wide(deepseek_v3()).save_pretrained(tmp_path / "original")
    model = adapted(tmp_path / "original", "attention,shared")
    save_peft(model, tmp_path / "adapter", LoRAConfig(rank=4, alpha=8.0))
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["target_modules"] == [
        "self_attn.kv_a_proj_with_mqa",
        "self_attn.kv_b_proj",
        "self_attn.o_proj",
        "self_attn.q_a_proj",
        "self_attn.q_b_proj",
    ]
    # as parameters: PEFT would rewrite target_modules ending in gate_proj/up_proj/down_proj
    # onto the routed experts (transformers 4 names), see interop/peft.py
    assert config["target_parameters"] == [
        "shared_experts.down_proj.weight",
        "shared_experts.gate_proj.weight",
        "shared_experts.up_proj.weight",
    ]
    assert config["lora_dropout"] == 0.0


def test_adapters_on_biased_experts_keep_the_biases_frozen(tmp_path):
    wide(gpt_oss()).save_pretrained(tmp_path / "original")
    model = adapted(tmp_path / "original", "experts").train()
    experts = model.layers[0].ffn.experts
    assert experts.b_up is not None and not experts.b_up.requires_grad
    model(TOKENS_BT).logits.sum().backward()
    assert experts.lora_B_up.grad is not None and experts.b_up.grad is None
    # the merge keeps the biases as they are and folds the deltas into the weights
    merged = merge_lora(model).layers[0].ffn.experts
    assert torch.equal(merged.b_up, experts.b_up) and torch.equal(merged.b_down, experts.b_down)
