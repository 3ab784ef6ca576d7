"""Meta-device construction replayed on real tensors (parallel/meta.py) gives exactly the
weights and buffers of a model built in one process from the same seed, and leaves the
global RNG where that construction leaves it; what cannot be replayed is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moekit import MoEConfig
from moekit.models import PRESETS, ModelConfig, Transformer
from moekit.parallel.meta import record_init
from moekit.routing import ROUTER_CLASSES


def _config(router: str, **model) -> ModelConfig:
    moe = MoEConfig(
        d_model=16, d_hidden=8, num_experts=4, top_k=1 if router == "switch" else 2,
        router=router, num_shared_experts=1, shared_expert_gate=True,
    )  # fmt: skip
    return ModelConfig(
        vocab_size=48, d_model=16, num_layers=3, num_heads=2, max_seq_len=8, moe=moe,
        first_dense_layers=1, **model,
    )  # fmt: skip


def _replayed(config: ModelConfig) -> Transformer:
    recorded = record_init(lambda: Transformer(config))
    model = recorded.model
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets |= dict(model.named_buffers())

    def write(name, value):
        targets[name].data.copy_(value)

    written = recorded.replay(write)
    assert set(targets) - written == {"rope_cos", "rope_sin"}
    model.init_rope()
    return model


@pytest.mark.parametrize("router", sorted(ROUTER_CLASSES))
def test_replayed_meta_construction_equals_one_process(router):
    extra = {"qkv_bias": True, "qk_norm": "head"} if router == "sigmoid_topk" else {}
    if router == "soft":
        extra["tied_embeddings"] = False
    config = _config(router, **extra)
    torch.manual_seed(7)
    reference = Transformer(config)
    after_reference = torch.get_rng_state()
    torch.manual_seed(7)
    model = _replayed(config)
    assert torch.equal(torch.get_rng_state(), after_reference)
    want, got = reference.state_dict(), model.state_dict()
    assert set(want) == set(got)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    for name, buffer in reference.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], buffer), name


@pytest.mark.parametrize("preset", ["deepseek_v3_tiny", "gpt_oss_tiny"])
def test_replayed_meta_construction_of_mla_and_sink_models_equals_one_process(preset):
    # multi-head latent attention; attention sinks with biased routers and experts
    config = PRESETS[preset]()
    torch.manual_seed(3)
    reference = Transformer(config)
    torch.manual_seed(3)
    model = _replayed(config)
    want, got = reference.state_dict(), model.state_dict()
    assert set(want) == set(got)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


class _RandomFactory(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3))


class _InitOnView(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(4, 3))
        with torch.no_grad():
            self.weight[:2].normal_()


class _UpdatesAFactoryValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))
        with torch.no_grad():
            self.weight.mul_(2.0)


def test_what_cannot_be_replayed_is_refused():
    with pytest.raises(ValueError, match="torch.randn"):
        record_init(_RandomFactory, init=None)
    with pytest.raises(ValueError, match="view of a parameter"):
        record_init(_InitOnView, init=None)
    recorded = record_init(_UpdatesAFactoryValue, init=None)
    with pytest.raises(ValueError, match="mul_ .* no recorded initialiser set"):
        recorded.replay(lambda name, value: None)
