"""The vocabulary of the key tables: named tensor operations (each with its inverse), rules
pairing a moekit tensor with the Hugging Face tensors it is made of, and the rule sets most
architectures share. Each architecture's file composes its table from these.

# E experts, D model, F expert hidden (moekit keeps gate and up side by side: 2F), L layers

A rule pairs one moekit tensor with the Hugging Face tensors it is made of and names the
operation between them. `{i}` stands for the layer and `{e}` for the expert; a rule only
applies to the layers whose moekit model has that tensor (a dense layer has no router, a
model without q/k norm no q_norm), so one table serves every layer pattern.

On disk, transformers 5 writes every expert as its own set of matrices
(`experts.{e}.gate_proj.weight`, ...), and converts them on load into the fused 3-D
tensors it holds in memory (`experts.gate_up_proj` (E, 2F, D), `experts.down_proj`
(E, D, F)). Both layouts are read here; the per-expert one is written.

gpt-oss has no per-expert layout: its experts are stored fused, gate_up_proj (E, D, 2F)
with the gate and up columns interleaved (gate at even, up at odd columns; moekit keeps
them as halves, so the table permutes them), down_proj (E, F, D) as moekit's w_down, plus
their biases; published checkpoints store the two matrices in MXFP4 (interop/mxfp4.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..mxfp4 import dequantize_mxfp4, quantize_mxfp4


@dataclass(frozen=True)
class TensorOp:
    """A named, reversible map between Hugging Face tensors and one moekit tensor."""

    name: str
    to_moekit: Callable[[list[Tensor]], Tensor]
    to_hf: Callable[[Tensor], list[Tensor]]


def _stack_glu_experts(hf: list[Tensor]) -> Tensor:
    # [gate_0 .. gate_E-1, up_0 .. up_E-1], each (F, D) -> w_up (E, D, 2F), gate half first
    E = len(hf) // 2
    gate_EFD, up_EFD = torch.stack(hf[:E]), torch.stack(hf[E:])
    return torch.cat((gate_EFD, up_EFD), dim=1).transpose(1, 2)


def _unstack_glu_experts(w_up_EDH: Tensor) -> list[Tensor]:
    gate_EFD, up_EFD = w_up_EDH.transpose(1, 2).chunk(2, dim=1)
    return list(gate_EFD) + list(up_EFD)


COPY = TensorOp("copy", lambda hf: hf[0], lambda t: [t])
# nn.Linear gate (F, D) and up (F, D) <-> moekit MLP.up (2F, D)
FUSE_GLU = TensorOp("fuse_glu", lambda hf: torch.cat(hf, dim=0), lambda t: list(t.chunk(2, dim=0)))
# per-expert gate/up (F, D) <-> w_up (E, D, 2F)
STACK_GLU_EXPERTS = TensorOp("stack_glu_experts", _stack_glu_experts, _unstack_glu_experts)
# per-expert down (D, F) <-> w_down (E, F, D)
STACK_DOWN_EXPERTS = TensorOp(
    "stack_down_experts",
    lambda hf: torch.stack(hf).transpose(1, 2),
    lambda t: list(t.transpose(1, 2)),
)
# fused gate_up_proj (E, 2F, D) <-> w_up (E, D, 2F); fused down_proj (E, D, F) <-> w_down (E, F, D)
TRANSPOSE_EXPERTS = TensorOp(
    "transpose_experts", lambda hf: hf[0].transpose(1, 2), lambda t: [t.transpose(1, 2)]
)


def _deinterleave(gate_up_XH: Tensor) -> Tensor:
    # gpt-oss: gate at even, up at odd columns -> moekit: [gate half, up half]
    return torch.cat((gate_up_XH[..., 0::2], gate_up_XH[..., 1::2]), dim=-1)


def _interleave(w_up_XH: Tensor) -> Tensor:
    gate_XF, up_XF = w_up_XH.chunk(2, dim=-1)
    return torch.stack((gate_XF, up_XF), dim=-1).flatten(-2)


# gpt-oss gate_up_proj (E, D, 2F) / gate_up_proj_bias (E, 2F) <-> w_up (E, D, 2F) / b_up
DEINTERLEAVE_GLU = TensorOp(
    "deinterleave_glu", lambda hf: _deinterleave(hf[0]), lambda t: [_interleave(t)]
)
# gpt-oss MXFP4 gate_up_proj_blocks/_scales (E, 2F, D/32, 16)/(E, 2F, D/32) <-> w_up; the
# inverse quantizes (lossy; save_hf writes the fused layout, never this one)
MXFP4_GLU_EXPERTS = TensorOp(
    "mxfp4_glu_experts",
    lambda hf: _deinterleave(dequantize_mxfp4(*hf).transpose(1, 2)),
    lambda t: list(quantize_mxfp4(_interleave(t).transpose(1, 2))),
)
# gpt-oss MXFP4 down_proj_blocks/_scales (E, D, F/32, 16)/(E, D, F/32) <-> w_down (E, F, D)
MXFP4_EXPERTS = TensorOp(
    "mxfp4_experts",
    lambda hf: dequantize_mxfp4(*hf).transpose(1, 2),
    lambda t: list(quantize_mxfp4(t.transpose(1, 2))),
)


@dataclass(frozen=True)
class Rule:
    """moekit tensor name <- Hugging Face tensor names, through op (templates in {i}, {e})."""

    moekit: str
    hf: tuple[str, ...]
    op: TensorOp = COPY


LAYER = "model.layers.{i}"
# the decoder around the FFN: embeddings, norms, grouped-query attention, dense FFN layers
DECODER = (
    Rule("tok_embed.weight", ("model.embed_tokens.weight",)),
    Rule("norm.weight", ("model.norm.weight",)),
    Rule("lm_head.weight", ("lm_head.weight",)),
    Rule("layers.{i}.attn_norm.weight", (f"{LAYER}.input_layernorm.weight",)),
    Rule("layers.{i}.ffn_norm.weight", (f"{LAYER}.post_attention_layernorm.weight",)),
    *(
        Rule(f"layers.{{i}}.attn.{ours}.{kind}", (f"{LAYER}.self_attn.{theirs}.{kind}",))
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj"))
        for kind in ("weight", "bias")
    ),
    Rule("layers.{i}.attn.q_norm.weight", (f"{LAYER}.self_attn.q_norm.weight",)),
    Rule("layers.{i}.attn.k_norm.weight", (f"{LAYER}.self_attn.k_norm.weight",)),
    # dense FFN layers (Qwen-MoE's mlp_only_layers / decoder_sparse_step)
    Rule(
        "layers.{i}.ffn.up.weight",
        (f"{LAYER}.mlp.gate_proj.weight", f"{LAYER}.mlp.up_proj.weight"),
        FUSE_GLU,
    ),
    Rule("layers.{i}.ffn.down.weight", (f"{LAYER}.mlp.down_proj.weight",)),
)


def per_expert(block: str, gate: str, up: str, down: str) -> tuple[Rule, ...]:
    """Router and experts stored one expert at a time (save_pretrained's on-disk layout)."""
    experts = f"{LAYER}.{block}.experts.{{e}}"
    return (
        Rule("layers.{i}.ffn.router.weight", (f"{LAYER}.{block}.gate.weight",)),
        Rule(
            "layers.{i}.ffn.experts.w_up",
            (f"{experts}.{gate}.weight", f"{experts}.{up}.weight"),
            STACK_GLU_EXPERTS,
        ),
        Rule("layers.{i}.ffn.experts.w_down", (f"{experts}.{down}.weight",), STACK_DOWN_EXPERTS),
    )


# transformers' in-memory names: the experts as two 3-D tensors
FUSED_EXPERTS = (
    Rule("layers.{i}.ffn.router.weight", (f"{LAYER}.mlp.gate.weight",)),
    Rule("layers.{i}.ffn.experts.w_up", (f"{LAYER}.mlp.experts.gate_up_proj",), TRANSPOSE_EXPERTS),
    Rule("layers.{i}.ffn.experts.w_down", (f"{LAYER}.mlp.experts.down_proj",), TRANSPOSE_EXPERTS),
)
# one shared expert (Qwen2-MoE), a SwiGLU MLP, and its sigmoid gate
SHARED_EXPERT = (
    Rule(
        "layers.{i}.ffn.shared.up.weight",
        (
            f"{LAYER}.mlp.shared_expert.gate_proj.weight",
            f"{LAYER}.mlp.shared_expert.up_proj.weight",
        ),
        FUSE_GLU,
    ),
    Rule("layers.{i}.ffn.shared.down.weight", (f"{LAYER}.mlp.shared_expert.down_proj.weight",)),
    Rule("layers.{i}.ffn.shared_gate.weight", (f"{LAYER}.mlp.shared_expert_gate.weight",)),
)
PER_EXPERT = per_expert("mlp", "gate_proj", "up_proj", "down_proj")
# where a checkpoint stores its experts fused (transformers' in-memory layout)
FUSED_MARKER = ".mlp.experts.gate_up_proj"


# ---------------------------------------------------------------- rotary rows


def _to_rotate_half(t: Tensor, rows: int, start: int, width: int) -> Tensor:
    """Reorder the rotary rows of every block of `rows` rows: interleaved -> halves."""
    blocks = t.reshape(-1, rows, *t.shape[1:])
    rotary = blocks[:, start : start + width]
    reordered = torch.cat((rotary[:, 0::2], rotary[:, 1::2]), dim=1)
    return torch.cat((blocks[:, :start], reordered, blocks[:, start + width :]), dim=1).reshape(
        t.shape
    )


def _to_interleaved(t: Tensor, rows: int, start: int, width: int) -> Tensor:
    """The inverse of _to_rotate_half: halves -> interleaved pairs."""
    blocks = t.reshape(-1, rows, *t.shape[1:]).clone()
    rotary = blocks[:, start : start + width].clone()
    blocks[:, start : start + width : 2] = rotary[:, : width // 2]
    blocks[:, start + 1 : start + width : 2] = rotary[:, width // 2 :]
    return blocks.reshape(t.shape)


def rope_rows(name: str, rows: int, start: int, width: int) -> TensorOp:
    """A projection whose output rows come in blocks of `rows` (one head), rows start ..
    start + width of each rotated in interleaved pairs (x0, x1), (x2, x3), ... on the
    Hugging Face side and as halves (x_i, x_{i + width/2}) in moekit. Both rotate the same
    pairs by the same angles, so moving the even rows first, then the odd, is exact; the
    inverse is written back, so a round trip is bit-exact. Works on weights (rows, in) and
    biases (rows,)."""
    return TensorOp(
        name,
        lambda hf: _to_rotate_half(hf[0], rows, start, width),
        lambda t: [_to_interleaved(t, rows, start, width)],
    )


@dataclass(frozen=True)
class Mapping:
    """One concrete moekit tensor and the Hugging Face tensors it is made of."""

    moekit: str
    hf: tuple[str, ...]
    op: TensorOp


def expand(
    rules: tuple[Rule, ...], moekit_names: set[str], num_layers: int, num_experts: int
) -> list[Mapping]:
    """The rules made concrete for one model: every layer, every expert.

    Args:
        rules: an architecture's table.
        moekit_names: the model's state_dict keys; a rule applies where its name exists.
        num_layers, num_experts: L and E.
    Returns:
        The mappings, in table order.
    """
    mappings = []
    for rule in rules:
        for i in range(num_layers) if "{i}" in rule.moekit else (None,):
            name = rule.moekit.format(i=i)
            if name not in moekit_names:
                continue
            hf_names: list[str] = []
            for template in rule.hf:
                if "{e}" in template:
                    hf_names += [template.format(i=i, e=e) for e in range(num_experts)]
                else:
                    hf_names.append(template.format(i=i))
            mappings.append(Mapping(name, tuple(hf_names), rule.op))
    return mappings
