"""The decoder: shapes, causality, the one-expert oracle, GQA, parameter counts, training."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moekit import MoE, MoEConfig, MoEStats
from moekit.models import ModelConfig, Transformer, count_parameters

TOKEN_CHOICE_ROUTERS = [
    "softmax_topk",
    "noisy_topk",
    "switch",
    "sigmoid_topk",
    "top_p",
    "dense",
    "sparsemixer",
]


def make_config(**overrides) -> ModelConfig:
    moe = MoEConfig(d_model=16, d_hidden=8, num_experts=4, top_k=2)
    fields = dict(
        vocab_size=32,
        d_model=16,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=24,
        moe=moe,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def moe_config(**overrides) -> MoEConfig:
    fields = dict(d_model=16, d_hidden=8, num_experts=4, top_k=2)
    fields.update(overrides)
    return MoEConfig(**fields)


def tokens(B: int, T: int, vocab: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_output_shapes_and_stats_per_layer():
    torch.manual_seed(0)
    cfg = make_config(num_layers=3, moe_every=2, d_hidden=24)
    model = Transformer(cfg)
    x_BT = tokens(2, 10)
    out = model(x_BT, targets=x_BT)
    assert out.logits.shape == (2, 10, 32)
    assert out.loss.shape == () and out.aux_loss.shape == ()
    # moe_every=2: the 2nd layer (index 1) is MoE, layers 0 and 2 are dense.
    assert cfg.moe_layers == [1]
    assert out.stats[0] is None and out.stats[2] is None
    assert isinstance(out.stats[1], MoEStats)
    assert int(out.stats[1].tokens_per_expert.sum()) == 2 * 10 * 2  # T * top_k, dropless
    assert out.aux_loss.item() > 0
    assert out.expert_ids is None


def test_moe_layer_placement():
    cfg = make_config(num_layers=6, moe_every=2, first_dense_layers=1)
    # After one dense layer, every 2nd layer: indices 2 and 4.
    assert cfg.moe_layers == [2, 4]
    model = Transformer(cfg)
    kinds = [isinstance(block.ffn, MoE) for block in model.layers]
    assert kinds == [False, False, True, False, True, False]
    assert make_config(moe=None).moe_layers == []


def test_dense_model_has_zero_aux_loss():
    model = Transformer(make_config(moe=None))
    out = model(tokens(1, 5))
    assert out.loss is None
    assert out.aux_loss.item() == 0.0
    assert out.stats == [None, None]


@pytest.mark.parametrize("router", TOKEN_CHOICE_ROUTERS)
def test_changing_a_future_token_leaves_earlier_logits_unchanged(router):
    torch.manual_seed(0)
    top_k = 1 if router == "switch" else 2
    model = Transformer(make_config(moe=moe_config(router=router, top_k=top_k))).eval()
    x_BT = tokens(2, 12)
    changed_BT = x_BT.clone()
    changed_BT[:, 7] = (changed_BT[:, 7] + 1) % 32
    before = model(x_BT).logits
    after = model(changed_BT).logits
    torch.testing.assert_close(after[:, :7], before[:, :7], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(after[:, 7:], before[:, 7:])


def copy_one_expert_into_dense(moe_model: Transformer, dense_model: Transformer) -> None:
    """The MoE's single expert stores w_up (1, D, 2F) and w_down (1, F, D); MLP's Linear
    layers store the transposes, (2F, D) and (D, F)."""
    dense_state = dense_model.state_dict()
    for name, value in moe_model.state_dict().items():
        if ".ffn.router." in name:
            continue
        if name.endswith("ffn.experts.w_up"):
            dense_state[name.replace("experts.w_up", "up.weight")].copy_(value[0].t())
        elif name.endswith("ffn.experts.w_down"):
            dense_state[name.replace("experts.w_down", "down.weight")].copy_(value[0].t())
        else:
            dense_state[name].copy_(value)


def test_one_expert_top1_equals_dense_model_with_the_same_weights():
    # With one expert and top_k 1 the softmax weight is exactly 1, so the MoE layer is the
    # expert's MLP: logits and gradients must equal the dense model's.
    torch.manual_seed(0)
    moe_cfg = make_config(moe=moe_config(num_experts=1, top_k=1))
    moe_model = Transformer(moe_cfg)
    dense_model = Transformer(dataclasses.replace(moe_cfg, moe=None, d_hidden=8))
    copy_one_expert_into_dense(moe_model, dense_model)
    x_BT, y_BT = tokens(2, 9), tokens(2, 9, seed=1)

    moe_out, dense_out = moe_model(x_BT, targets=y_BT), dense_model(x_BT, targets=y_BT)
    torch.testing.assert_close(moe_out.logits, dense_out.logits)
    moe_out.loss.backward()
    dense_out.loss.backward()
    w_down_grad = moe_model.layers[0].ffn.experts.w_down.grad[0]
    torch.testing.assert_close(w_down_grad.t(), dense_model.layers[0].ffn.down.weight.grad)
    torch.testing.assert_close(moe_model.tok_embed.weight.grad, dense_model.tok_embed.weight.grad)


def test_grouped_query_attention_equals_multi_head_with_repeated_kv_weights():
    # 2 kv heads serving 4 query heads == 4 kv heads where heads (0, 1) copy kv head 0 and
    # heads (2, 3) copy kv head 1.
    torch.manual_seed(0)
    gqa = Transformer(make_config(moe=None, num_kv_heads=2))
    mha = Transformer(make_config(moe=None, num_kv_heads=4))
    state = gqa.state_dict()
    for name, value in state.items():
        if name.endswith(("attn.wk.weight", "attn.wv.weight")):
            # (G * Dh, D) -> (G, Dh, D) -> repeat each head twice -> (H * Dh, D)
            value = value.view(2, 4, 16).repeat_interleave(2, dim=0).reshape(16, 16)
        mha.state_dict()[name].copy_(value)
    x_BT = tokens(2, 11)
    torch.testing.assert_close(gqa(x_BT).logits, mha(x_BT).logits)


def test_expert_ids_match_the_layer_counts():
    torch.manual_seed(0)
    model = Transformer(make_config())
    out = model(tokens(3, 7), return_expert_ids=True)
    for ids_BTK, stats in zip(out.expert_ids, out.stats):
        assert ids_BTK.shape == (3, 7, 2)
        counts_E = torch.bincount(ids_BTK.flatten(), minlength=4)
        torch.testing.assert_close(counts_E, stats.tokens_per_expert)


def test_expert_ids_of_top_p_mark_unused_slots():
    torch.manual_seed(0)
    model = Transformer(make_config(moe=moe_config(router="top_p", top_p=0.3, top_k=3)))
    out = model(tokens(2, 8), return_expert_ids=True)
    ids_BTK = out.expert_ids[0]
    used = ids_BTK[ids_BTK >= 0]
    torch.testing.assert_close(torch.bincount(used, minlength=4), out.stats[0].tokens_per_expert)
    assert (ids_BTK[..., 0] >= 0).all()  # the best expert is always used


def test_meta_construction_and_hand_counted_parameters():
    cfg = make_config()
    # embedding (tied with the head) 32 * 16 = 512
    # per layer: 2 norms 2 * 16 = 32; attention wq 16*16 + wk 16*8 + wv 16*8 + wo 16*16 = 768
    #   (2 kv heads of dim 4); router 4 * 16 = 64; experts w_up 4*16*(2*8) + w_down 4*8*16 = 1536
    #   -> 32 + 768 + 64 + 1536 = 2400
    # final norm 16. total = 512 + 2 * 2400 + 16 = 5328
    # active: top_k / E = 2 / 4 of the experts, so 768 of each layer's 1536 are inactive:
    #   5328 - 2 * 768 = 3792
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.tok_embed.weight.is_meta
    assert count_parameters(model) == (5328, 3792)
    assert count_parameters(cfg) == (5328, 3792)
    untied = count_parameters(dataclasses.replace(cfg, tied_embeddings=False))
    assert untied.total == 5328 + 512


def test_active_parameters_of_dense_and_expert_choice_routers():
    routed = 2 * 1536
    dense = count_parameters(make_config(moe=moe_config(router="dense")))
    assert dense.active == dense.total  # every expert runs for every token
    expert_choice = count_parameters(
        make_config(moe=moe_config(router="expert_choice", capacity_factor=1.0))
    )
    # C = T * top_k / E: on average a token is processed by top_k = 2 of 4 experts.
    assert expert_choice.total - expert_choice.active == routed // 2


def test_huge_config_counts_on_meta_without_memory():
    moe = MoEConfig(d_model=4096, d_hidden=14336, num_experts=8, top_k=2)
    cfg = ModelConfig(
        vocab_size=32000,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        max_seq_len=4096,
        tied_embeddings=False,
        moe=moe,
    )
    total, active = count_parameters(cfg)
    # Mixtral 8x7B: 46.7 B total, 12.9 B active (Jiang et al. 2024).
    assert round(total / 1e9, 1) == 46.7
    assert round(active / 1e9, 1) == 12.9


def test_meta_model_materialises_with_to_empty_and_init_weights():
    cfg = make_config()
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.tok_embed.weight
    out = model(tokens(1, 6), targets=tokens(1, 6))
    assert torch.isfinite(out.loss)


def test_tied_embeddings_share_storage():
    tied = Transformer(make_config())
    assert tied.lm_head.weight.data_ptr() == tied.tok_embed.weight.data_ptr()
    untied = Transformer(make_config(tied_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.tok_embed.weight.data_ptr()


def test_residual_projections_get_the_scaled_init():
    torch.manual_seed(0)
    cfg = make_config(
        d_model=64,
        num_heads=4,
        num_kv_heads=4,
        num_layers=8,
        vocab_size=256,
        moe=moe_config(d_model=64, d_hidden=128),
    )
    model = Transformer(cfg)
    residual_std = 0.02 / (2 * 8) ** 0.5
    assert model.layers[0].attn.wq.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.layers[0].attn.wo.weight.std().item() == pytest.approx(residual_std, rel=0.1)
    assert model.layers[0].ffn.experts.w_down.std().item() == pytest.approx(residual_std, rel=0.1)


def test_loss_decreases_on_a_repeated_sequence():
    torch.manual_seed(0)
    model = Transformer(make_config(num_layers=2))
    sequence_T = tokens(1, 17)[0]
    x_BT, y_BT = sequence_T[:-1].repeat(4, 1), sequence_T[1:].repeat(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        out = model(x_BT, targets=y_BT)
        (out.loss + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_targets_of_minus_100_are_ignored():
    torch.manual_seed(0)
    model = Transformer(make_config())
    x_BT, y_BT = tokens(1, 8), tokens(1, 8, seed=1)
    masked_BT = y_BT.clone()
    masked_BT[:, 4:] = -100
    full = model(x_BT, targets=y_BT).logits
    expected = torch.nn.functional.cross_entropy(full[0, :4], y_BT[0, :4])
    torch.testing.assert_close(model(x_BT, targets=masked_BT).loss, expected)


def test_too_long_input_raises():
    model = Transformer(make_config())
    with pytest.raises(ValueError, match=r"sequence length \(25\) exceeds max_seq_len \(24\)"):
        model(tokens(1, 25))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(vocab_size=0), r"vocab_size \(0\)"),
        (dict(num_layers=-1), r"num_layers \(-1\)"),
        (dict(num_heads=3), r"num_heads \(3\) must divide d_model \(16\)"),
        (dict(num_kv_heads=3), r"num_kv_heads \(3\)"),
        (dict(d_model=24, num_heads=8), r"head dim .* \(3\) must be even"),
        (dict(d_hidden=0), r"d_hidden \(0\)"),
        (dict(moe_every=0), r"moe_every \(0\)"),
        (dict(first_dense_layers=-2), r"first_dense_layers \(-2\)"),
        (dict(first_dense_layers=2), r"no MoE layer"),
        (dict(rope_theta=0.0), r"rope_theta \(0.0\)"),
        (dict(norm_eps=-1.0), r"norm_eps \(-1.0\)"),
        (dict(activation="tanh"), r"unknown activation 'tanh'"),
        (
            dict(moe=MoEConfig(d_model=32, d_hidden=8, num_experts=4)),
            r"moe.d_model \(32\) must equal d_model \(16\)",
        ),
    ],
)
def test_bad_config_values_raise_naming_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)
