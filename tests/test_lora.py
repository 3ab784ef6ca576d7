"""LoRA adapters: the grouped expert path equals a per-expert loop with W + s*A@B (forward
and backward), merging gives the adapted logits, only adapters train, removing gives the
base back."""

from __future__ import annotations

import copy

import pytest
import torch

from moekit.config import MoEConfig
from moekit.experts import GroupedExperts
from moekit.models import ModelConfig, Transformer
from moekit.models.lora import (
    LoRAConfig,
    LoRAGroupedExperts,
    add_lora,
    lora_state_dict,
    merge_lora,
    remove_lora,
)

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENS_BT = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
ALL = "attention,experts,shared,router"


def _model(shared: bool = True, moe: bool = True) -> Transformer:
    config = MoEConfig(
        d_model=32,
        d_hidden=16,
        num_experts=4,
        top_k=2,
        num_shared_experts=1 if shared else 0,
        d_shared_hidden=16 if shared else None,
        shared_expert_gate=shared,
    )
    torch.manual_seed(0)
    return Transformer(
        ModelConfig(
            vocab_size=64,
            d_model=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            max_seq_len=32,
            moe=config if moe else None,
        )
    ).eval()


def _randomise_adapters(model: Transformer, seed: int = 1) -> None:
    """B starts at zero; draw every factor so that the adapters change the function."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def test_an_adapted_model_starts_equal_to_its_base():
    base = _model()
    adapted = add_lora(copy.deepcopy(base), LoRAConfig(rank=4, targets=ALL))
    torch.testing.assert_close(adapted(TOKENS_BT).logits, base(TOKENS_BT).logits)


@pytest.mark.parametrize("targets", ["attention", "experts", "shared", "router", ALL])
def test_merged_logits_equal_the_adapted_logits(targets):
    model = add_lora(_model(), LoRAConfig(rank=4, alpha=8.0, targets=targets))
    _randomise_adapters(model)
    base_logits = remove_lora(model).eval()(TOKENS_BT).logits
    adapted = model(TOKENS_BT).logits
    merged_model = merge_lora(model).eval()
    assert not lora_state_dict(merged_model)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)  # the adapters do something
    torch.testing.assert_close(merged_model(TOKENS_BT).logits, adapted, atol=1e-5, rtol=1e-5)


def _reference(experts: LoRAGroupedExperts, x_RD, counts_E):
    """Per-expert loop with w + s * A @ B, differentiable in every factor."""
    s, outputs, start = experts.scaling, [], 0
    for e, count in enumerate(counts_E.tolist()):
        w_up = experts.w_up[e] + s * experts.lora_A_up[e] @ experts.lora_B_up[e]
        w_down = experts.w_down[e] + s * experts.lora_A_down[e] @ experts.lora_B_down[e]
        h = x_RD[start : start + count] @ w_up
        h = h if experts.b_up is None else h + experts.b_up[e]
        y = experts.activation(h) @ w_down
        outputs.append(y if experts.b_down is None else y + experts.b_down[e])
        start += count
    return torch.cat(outputs)


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_lora_experts_equal_the_per_expert_loop(backend, bias):
    """With bias: gpt-oss's experts (biases, the clamped SwiGLU), the biases frozen."""
    torch.manual_seed(0)
    activation = "swiglu_clamped" if bias else "swiglu"
    base = GroupedExperts(4, 32, 16, activation=activation, backend=backend, bias=bias)
    if bias:
        base.requires_grad_(False)  # as add_lora leaves them
    experts = LoRAGroupedExperts(base, LoRAConfig(rank=4, alpha=8.0))
    _randomise_adapters(torch.nn.ModuleDict({"e": experts}))
    counts_E = torch.tensor([5, 0, 7, 4])
    x_RD = torch.randn(16, 32, requires_grad=True)
    grad_RD = torch.randn(16, 32)
    fast = experts(x_RD, counts_E)
    factors = [experts.lora_A_up, experts.lora_B_up, experts.lora_A_down, experts.lora_B_down]
    fast_grads = torch.autograd.grad(fast, [x_RD, *factors], grad_RD)
    slow = _reference(experts, x_RD, counts_E)
    slow_grads = torch.autograd.grad(slow, [x_RD, *factors], grad_RD)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, experts.forward_reference(x_RD, counts_E))
    for got, want in zip(fast_grads, slow_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # idle expert 1 gets an exact zero gradient
    assert torch.equal(fast_grads[1][1], torch.zeros_like(fast_grads[1][1]))


def test_only_the_adapters_train():
    model = add_lora(_model(), LoRAConfig(rank=4, targets=ALL)).train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert any("experts.lora_A_up" in n for n in trainable)
    assert any("router.parametrizations.weight.0.lora_B" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(TOKENS_BT, TOKENS_BT)
    (out.loss + out.aux_loss).backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    assert model.layers[0].ffn.experts.lora_B_up.abs().sum() > 0


def test_removing_the_adapters_gives_the_base_back():
    base = _model()
    model = add_lora(copy.deepcopy(base), LoRAConfig(rank=4, targets=ALL))
    _randomise_adapters(model)
    plain = remove_lora(model).eval()
    assert set(plain.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(plain(TOKENS_BT).logits, base(TOKENS_BT).logits)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="lora.targets"):
        LoRAConfig(rank=4, targets="attention,mlp")
    with pytest.raises(ValueError, match=r"lora.dropout \(1.5\)"):
        LoRAConfig(rank=4, dropout=1.5)
    with pytest.raises(ValueError, match="the model is dense"):
        add_lora(_model(moe=False), LoRAConfig(rank=4))
    with pytest.raises(ValueError, match="has none"):
        add_lora(_model(shared=False), LoRAConfig(rank=4, targets="shared"))


def test_attention_or_moe_outside_the_decoder_layers_is_refused():
    """No adapter covers a module beside model.layers (a multi-token-prediction head, say):
    fine-tuning it silently frozen, or exporting adapters PEFT cannot place, would mislead."""
    model = _model()
    model.extra_head = torch.nn.ModuleDict({"block": copy.deepcopy(model.layers[0])})
    with pytest.raises(ValueError, match=r"decoder layers only.*extra_head\.block\.attn"):
        add_lora(model, LoRAConfig(rank=4, targets="attention"))
