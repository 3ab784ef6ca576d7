"""`moekit doctor` on PEFT LoRA adapters: untrained adapters, experts whose adapters got no
gradient, targets that miss the routed experts (PEFT's own target_modules on a transformers
5 Qwen2-MoE), shapes that do not fit the base; a trained adapter over every part gives no
error and no warning."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from helpers import run_cli

from moekit.config import MoEConfig
from moekit.doctor.cli import examine
from moekit.doctor.target import read_target
from moekit.interop import save_hf
from moekit.interop.peft import save_peft
from moekit.models import ModelConfig, Transformer
from moekit.models.lora import LoRAConfig, add_lora, remove_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


def _adapted(targets: str, d_model: int = 32, shared: bool = False) -> Transformer:
    moe = MoEConfig(
        d_model=d_model,
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
        d_model=d_model,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=32,
        tied_embeddings=False,
        moe=moe,
    )
    model = add_lora(Transformer(config), LoRAConfig(rank=4, alpha=8.0, targets=targets))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained adapters: both factors away from their initial value
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def _save(model, tmp_path, name: str = "adapter"):
    base, adapter = tmp_path / f"{name}-base", tmp_path / name
    save_hf(remove_lora(model), base)
    save_peft(model, adapter, LoRAConfig(rank=4, alpha=8.0), base_model=str(base))
    return adapter


def _found(adapter, check: str, base=None) -> list:
    return [f for f in examine(read_target(adapter, base)).findings if f.check == check]


def test_trained_adapter_on_every_part_is_healthy_and_left_unchanged(tmp_path):
    adapter = _save(_adapted("attention,experts,shared,router", shared=True), tmp_path)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in adapter.iterdir()}
    code, out, _ = run_cli("doctor", str(adapter), "--json")
    report = json.loads(out)
    assert code == 0 and report["counts"]["warning"] == 0 and report["counts"]["note"] == 0, out
    assert report["checks"] == ["adapter"]
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in adapter.iterdir()}
    assert after == before


def test_an_adapter_never_trained_is_an_error(tmp_path):
    model = _adapted("attention,experts")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B" in name:
                param.zero_()
    adapter = _save(model, tmp_path)
    (found,) = _found(adapter, "adapter.untrained")
    assert found.severity == "error"
    assert run_cli("doctor", str(adapter))[0] == 1


def test_experts_whose_adapters_got_no_gradient_are_named(tmp_path):
    model = _adapted("attention,experts")
    with torch.no_grad():
        model.layers[1].ffn.experts.lora_B_up[2] = 0.0
        model.layers[1].ffn.experts.lora_B_down[2] = 0.0
    found = _found(_save(model, tmp_path), "adapter.untrained_experts")
    assert len(found) == 2  # gate_up_proj's and down_proj's adapters
    assert all(f.layer == 1 and f.experts == [2] for f in found)


def test_attention_only_is_a_note_naming_what_it_covers(tmp_path):
    (found,) = _found(_save(_adapted("attention"), tmp_path), "adapter.misses_experts")
    assert found.severity == "note" and "attention" in found.message


def test_expert_names_that_land_on_shared_experts_only_are_a_warning(tmp_path):
    config = transformers.Qwen2MoeConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=40,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    base = transformers.Qwen2MoeForCausalLM(config)
    base.save_pretrained(tmp_path / "base")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(base, lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    model.save_pretrained(tmp_path / "adapter")
    (found,) = _found(tmp_path / "adapter", "adapter.misses_experts", tmp_path / "base")
    assert found.severity == "warning"
    assert "shared" in found.evidence["covered"] and "routed" not in found.evidence["covered"]


def test_an_adapter_of_another_base_does_not_fit(tmp_path):
    adapter = _save(_adapted("attention,experts"), tmp_path)
    other = _save(_adapted("attention", d_model=48), tmp_path, "other")
    (found,) = _found(adapter, "adapter.shapes", base=tmp_path / "other-base")
    assert found.severity == "error" and found.layer == 0
    assert other.exists()


def test_an_adapter_without_its_base_says_what_was_not_checked(tmp_path):
    adapter = _save(_adapted("attention,experts"), tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some-org/some-model"  # never downloaded
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (found,) = _found(adapter, "adapter.base")
    assert found.severity == "note"
    code, _, err = run_cli("doctor", str(adapter), "--base", str(tmp_path / "nowhere"))
    assert code == 2 and "not a Hugging Face model folder" in err
