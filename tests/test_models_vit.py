"""The ViT with MoE blocks: patches, output shape, batch priority versus position order on a
worked example, Soft MoE keeps images independent, gate choices, and learning on digits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit import MoE, MoEConfig
from moekit.models.vit import ViTConfig, ViTMoE, patchify
from moekit.tasks import load_digits_data
from moekit.tasks.loop import specialisation

pytestmark = pytest.mark.usefixtures("one_thread")


def vit_config(**moe_options) -> ViTConfig:
    moe = MoEConfig(
        d_model=16, d_hidden=16, num_experts=4, top_k=1, activation="gelu", **moe_options
    )
    return ViTConfig(image_size=8, patch_size=2, num_classes=10, d_model=16, num_layers=2,
                     num_heads=2, mlp_hidden=16, moe=moe)  # fmt: skip


def test_patches_are_row_major_squares():
    image = torch.arange(16.0).view(1, 4, 4)
    patches = patchify(image, 2)
    # Pixels 0 1 / 4 5 form the top-left patch, 2 3 / 6 7 the top-right, and so on.
    assert patches.tolist() == [[[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]]


def test_output_shape_and_one_stats_per_moe_block():
    torch.manual_seed(0)
    model = ViTMoE(vit_config())
    out = model(torch.rand(3, 8, 8))
    assert out.prediction.shape == (3, 10)
    assert len(out.stats) == 1  # moe_every=2 with 2 layers: block 2 only
    dense = ViTMoE(ViTConfig(image_size=8, patch_size=2, d_model=16, num_layers=2, num_heads=2))
    assert dense(torch.rand(3, 8, 8)).stats == []


def test_batch_priority_and_position_order_drop_different_tokens():
    # 4 tokens, 2 experts, top-1, capacity_factor 0.5: C = ceil(0.5 * 4 * 1 / 2) = 1.
    # Router logits are (x0, 0), so every token prefers expert 0, token 3 most strongly.
    # Position order keeps token 0 at expert 0; batch priority keeps token 3 (highest
    # score). Expert 1 gets no claims. Dropped tokens get a zero output.
    x_TD = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]])
    outputs = {}
    for priority in (False, True):
        torch.manual_seed(0)
        layer = MoE(MoEConfig(d_model=2, d_hidden=4, num_experts=2, top_k=1, capacity_factor=0.5,
                              batch_priority=priority))  # fmt: skip
        with torch.no_grad():
            layer.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        out = layer(x_TD)
        assert out.stats.capacity == 1
        assert out.stats.dropped_fraction.item() == pytest.approx(0.75)
        outputs[priority] = out.hidden.abs().sum(dim=-1) > 0
    assert outputs[False].tolist() == [True, False, False, False]
    assert outputs[True].tolist() == [False, False, False, True]


def test_vit_priority_changes_the_predictions_under_scarce_capacity():
    torch.manual_seed(0)
    images = torch.rand(6, 8, 8)
    position = ViTMoE(vit_config(capacity_factor=0.5))
    priority = ViTMoE(vit_config(capacity_factor=0.5, batch_priority=True))
    priority.load_state_dict(position.state_dict())
    out_position, out_priority = position(images), priority(images)
    assert out_position.stats[0].dropped_fraction > 0
    assert not torch.allclose(out_position.prediction, out_priority.prediction)
    # With room for every token the claim order does not matter.
    roomy = ViTMoE(vit_config(capacity_factor=4.0))
    roomy.load_state_dict(position.state_dict())
    dropless = ViTMoE(vit_config())
    dropless.load_state_dict(position.state_dict())
    torch.testing.assert_close(roomy(images).prediction, dropless(images).prediction)


def test_soft_moe_keeps_images_independent_position_order_does_not():
    torch.manual_seed(0)
    images = torch.rand(5, 8, 8)
    soft = ViTMoE(vit_config(router="soft", slots_per_expert=2))
    torch.testing.assert_close(soft(images).prediction[:1], soft(images[:1]).prediction)
    scarce = ViTMoE(vit_config(capacity_factor=0.5))
    # Position order: in the batch, image 0's 16 tokens claim first among C = 10 slots per
    # expert; alone, they compete among themselves for C = 2.
    assert not torch.allclose(scarce(images).prediction[:1], scarce(images[:1]).prediction)


def test_gate_choices_are_per_patch_for_token_choice_and_soft():
    torch.manual_seed(0)
    images, labels = torch.rand(4, 8, 8), torch.tensor([0, 1, 1, 3])
    for model in (ViTMoE(vit_config()), ViTMoE(vit_config(router="soft"))):
        choices = model.gate_choices(images)
        assert list(choices) == ["block2"]
        assert choices["block2"].ids.shape == (4, 16) and choices["block2"].num_experts == 4
        table = specialisation(model, images, labels, [str(d) for d in range(10)], batch_size=4)
        per_label = [sum(row) for row in table["layers"][0]["counts"]]
        assert per_label == [16, 32, 0, 16] + [0] * 6  # every patch under its image's label


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="patch_size \\(3\\) must divide image_size \\(8\\)"):
        ViTConfig(image_size=8, patch_size=3)
    with pytest.raises(ValueError, match="moe.d_model \\(8\\) must equal d_model \\(16\\)"):
        ViTConfig(d_model=16, num_heads=2, moe=MoEConfig(d_model=8, d_hidden=8, num_experts=2))
    with pytest.raises(ValueError, match="images must be 8 x 8"):
        ViTMoE(vit_config())(torch.rand(2, 7, 7))


def test_vit_moe_learns_digits_well_above_chance():
    torch.manual_seed(0)
    data = load_digits_data(images=True, seed=0)
    model = ViTMoE(vit_config(capacity_factor=1.0, batch_priority=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(120):
        index = torch.randint(len(data.x_train), (64,), generator=gen)
        out = model(data.x_train[index])
        (F.cross_entropy(out.prediction, data.y_train[index]) + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        accuracy = (model.eval()(data.x_val).prediction.argmax(-1) == data.y_val).float().mean()
    assert accuracy > 0.5  # chance is 0.1
