"""A small Vision Transformer whose feed-forward blocks are MoE layers (V-MoE, Riquelme et
al. 2021), for grey-scale images such as scikit-learn's digits or MNIST.

# B images, N patches per image, P pixels per patch, D model, C classes

Images are cut into non-overlapping square patches, embedded linearly with a learned
position embedding, run through pre-norm blocks (bidirectional attention, then an MLP or
an MoE layer), mean-pooled and classified. As in V-MoE, every `moe_every`-th block has an
MoE layer. Token choice routes the B*N tokens of a batch together (capacity counts them
all, image after image in position order; `batch_priority` orders them by router score
instead); Soft MoE mixes the N tokens of each image into its slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import MoEConfig
from ..experts import MLP
from ..moe import MoE
from .classic import GateChoice, TaskOutput, first_choice
from .expert_ids import tap_routers


@dataclass(kw_only=True)
class ViTConfig:
    """The image size, patching and transformer widths; moe=None gives a dense ViT."""

    image_size: int = 28
    patch_size: int = 7
    num_classes: int = 10
    d_model: int = 64
    num_layers: int = 4
    num_heads: int = 4
    mlp_hidden: int = 128  # the dense blocks' MLP width
    moe: MoEConfig | None = None
    moe_every: int = 2  # blocks moe_every-1, 2*moe_every-1, ... get an MoE layer

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size ({self.patch_size}) must divide image_size ({self.image_size})"
            )
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide d_model ({self.d_model})")
        if self.moe is not None and self.moe.d_model != self.d_model:
            raise ValueError(
                f"moe.d_model ({self.moe.d_model}) must equal d_model ({self.d_model})"
            )
        if self.moe_every < 1:
            raise ValueError(f"moe_every ({self.moe_every}) must be >= 1")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def is_moe_block(self, index: int) -> bool:
        return self.moe is not None and index % self.moe_every == self.moe_every - 1


def patchify(images_BHW: Tensor, patch_size: int) -> Tensor:
    """(B, H, W) -> (B, N, P) with patches in row-major order, pixels row-major inside."""
    B, H, W = images_BHW.shape
    p = patch_size
    patches = images_BHW.reshape(B, H // p, p, W // p, p).permute(0, 1, 3, 2, 4)
    return patches.reshape(B, (H // p) * (W // p), p * p)


class ViTBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + ffn(norm(x)) with an MLP or an MoE."""

    def __init__(self, config: ViTConfig, use_moe: bool):
        super().__init__()
        D = config.d_model
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, config.num_heads, batch_first=True)
        self.ffn = MoE(config.moe) if use_moe else MLP(D, config.mlp_hidden, activation="gelu")

    def forward(self, x_BND: Tensor):
        h_BND = self.norm1(x_BND)
        x_BND = x_BND + self.attn(h_BND, h_BND, h_BND, need_weights=False)[0]
        h_BND = self.norm2(x_BND)
        if isinstance(self.ffn, MoE):
            out = self.ffn(h_BND)
            return x_BND + out.hidden, out
        return x_BND + self.ffn(h_BND), None


class ViTMoE(nn.Module):
    """The ViT classifier; forward takes (B, H, W) images and returns TaskOutput logits."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        D, N = config.d_model, config.num_patches
        self.patch_embed = nn.Linear(config.patch_size**2, D)
        self.position = nn.Parameter(torch.randn(1, N, D) * 0.02)
        self.blocks = nn.ModuleList(
            ViTBlock(config, config.is_moe_block(i)) for i in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, config.num_classes)

    def forward(self, images_BHW: Tensor) -> TaskOutput:
        size = self.config.image_size
        if images_BHW.shape[-2:] != (size, size):
            raise ValueError(f"images must be {size} x {size}; got shape {tuple(images_BHW.shape)}")
        x_BND = self.patch_embed(patchify(images_BHW, self.config.patch_size)) + self.position
        aux_loss, stats = x_BND.new_zeros(()), []
        for block in self.blocks:
            x_BND, out = block(x_BND)
            if out is not None:
                aux_loss = aux_loss + out.aux_loss
                stats.append(out.stats)
        logits_BC = self.head(self.norm(x_BND).mean(dim=1))
        return TaskOutput(logits_BC, aux_loss, stats)

    @torch.no_grad()
    def gate_choices(self, images_BHW: Tensor) -> dict[str, GateChoice]:
        """Per MoE block ("block1", ...), the expert each patch's router ranks first: (B, N)."""
        B, N = images_BHW.shape[0], self.config.num_patches
        with tap_routers(self.blocks) as routings:
            self(images_BHW)
        choices = {}
        for i, routing in enumerate(routings):
            if routing is None:
                continue
            E = self.blocks[i].ffn.config.num_experts
            choices[f"block{i + 1}"] = GateChoice(first_choice(routing, E).reshape(B, N), E)
        return choices
