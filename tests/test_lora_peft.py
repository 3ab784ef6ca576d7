"""The LoRA round trip to PEFT: a moekit model with adapters, exported with save_hf (the base)
and save_peft (the adapters), computes the same logits in transformers + peft.

Tiny random models, no downloads: Mixtral-shaped (attention, routed experts as 3-D
`target_parameters`, router) and Qwen2-MoE-shaped (plus the gated shared expert, whose
fused gate/up adapter splits into PEFT's gate_proj and up_proj).
"""

from __future__ import annotations

import json

import pytest
import torch

from moekit.config import MoEConfig
from moekit.interop import save_hf
from moekit.interop.peft import ADAPTER_CONFIG, save_peft
from moekit.models import ModelConfig, Transformer
from moekit.models.lora import LoRAConfig, add_lora, remove_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS_BT = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(5))


def _adapted(shared: bool, targets: str, dropout: float = 0.0) -> Transformer:
    moe = MoEConfig(
        d_model=32,
        d_hidden=16,
        num_experts=4,
        top_k=2,
        num_shared_experts=1 if shared else 0,
        d_shared_hidden=24 if shared else None,
        shared_expert_gate=shared,
    )
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=64,
        d_model=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=32,
        tied_embeddings=False,
        moe=moe,
    )
    model = add_lora(
        Transformer(config), LoRAConfig(rank=4, alpha=8.0, dropout=dropout, targets=targets)
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


@pytest.mark.parametrize(
    ("shared", "targets"),
    [
        (False, "attention,experts,router"),
        (False, "experts"),
        (True, "attention,experts,shared,router"),
    ],
)
def test_peft_gives_our_logits(tmp_path, shared, targets):
    model = _adapted(shared, targets, dropout=0.1)
    base_dir, adapter_dir = tmp_path / "hf", tmp_path / "adapter"
    save_hf(remove_lora(model), base_dir)
    save_peft(
        model, adapter_dir, LoRAConfig(rank=4, alpha=8.0, dropout=0.1), base_model=str(base_dir)
    )
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        base_logits = hf_model(TOKENS_BT).logits
        peft_model = peft.PeftModel.from_pretrained(hf_model, adapter_dir).eval()
        peft_logits = peft_model(TOKENS_BT).logits
        ours = model(TOKENS_BT).logits
    assert not torch.allclose(base_logits, ours, atol=1e-3)  # the adapters matter
    torch.testing.assert_close(peft_logits, ours, atol=1e-4, rtol=1e-4)
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    if "experts" in targets:
        assert "mlp.experts.gate_up_proj" in config["target_parameters"]
        assert config["lora_dropout"] == 0.0  # PEFT's parameter adapters have no dropout


def test_an_adapter_peft_cannot_place_is_refused(tmp_path):
    model = _adapted(False, "attention")
    model.lora_extra = torch.nn.Parameter(torch.zeros(2, 2))  # an adapter outside the layers
    with pytest.raises(ValueError, match="PEFT cannot express the adapter 'lora_extra'"):
        save_peft(model, tmp_path / "adapter", LoRAConfig(rank=4))
    assert not (tmp_path / "adapter").exists()


def test_adapters_of_a_base_without_a_hugging_face_form_are_refused(tmp_path):
    model = _adapted(True, "experts")
    model.config.moe.capacity_factor = 1.25  # every Hugging Face MoE is dropless
    with pytest.raises(ValueError, match="cannot express.*capacity_factor 1.25"):
        save_peft(model, tmp_path / "adapter", LoRAConfig(rank=4))
    assert not (tmp_path / "adapter").exists()
