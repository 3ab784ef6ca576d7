"""FP8 block-quantised weights, as the published DeepSeek-V3 and R1 checkpoints store them.

# N output rows, K input columns, B0 x B1 the block (128 x 128 in DeepSeek's checkpoints)

DeepSeek-V3 (technical report, arXiv:2412.19437, section 3.3, fine-grained quantization)
stores its linear weights in FP8 E4M3 (float8_e4m3fn: 4 exponent bits, 3 mantissa bits,
largest finite value 448) with one float32 scale per 128 x 128 block of the weight:
    X.weight            float8_e4m3fn (..., N, K)
    X.weight_scale_inv  float32 (..., ceil(N / B0), ceil(K / B1))
The weight's value at (n, k) is weight[n, k] * scale_inv[n // B0, k // B1]; the blocks at
the bottom and right edges are partial when N or K is not a multiple of the block. ("inv":
the scale the values were divided by when quantised, so reading multiplies by it.)
config.json says so in `quantization_config`: {"quant_method": "fp8", "fmt": "e4m3",
"activation_scheme": "dynamic", "weight_block_size": [128, 128]}. The attention and MLP
projections (the experts' included) are quantised; the embedding, the head, the norms and
the router (its weight and e_score_correction_bias) are not. transformers reads them the
same way (`transformers.integrations.finegrained_fp8`); the tests check that both give the
same tensor. The scale name is the tensor's name plus `_scale_inv`, so a fused expert
tensor `experts.gate_up_proj` (E, 2F, D) goes with `experts.gate_up_proj_scale_inv`
(E, ceil(2F / B0), ceil(D / B1)).

The product is computed in float32 (as DeepSeek's reference inference code does) and cast
once to the requested dtype. moekit never writes FP8 (save_hf writes the dequantized
weights); `quantize_fp8` (per-block absmax / 448) exists to build test checkpoints like
the published ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
_FMT = "e4m3"
_ACTIVATION_SCHEMES = ("dynamic",)
# safetensors' names of the 8-bit float dtypes (get_slice(...).get_dtype())
_FP8_STORED = ("F8_E4M3", "F8_E5M2", "F8_E8M0")


def fp8_block_size(quantization: object) -> tuple[int, int]:
    """The (rows, columns) block of a quantization_config moekit reads as FP8 blocks.

    Raises:
        ValueError: a quant_method, fmt, activation_scheme or weight_block_size moekit
            does not read, named.
    """
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "fp8":
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        raise ValueError(
            f"quantization_config quant_method {method!r} is not supported "
            "(moekit reads DeepSeek's 'fp8' block-quantised weights)"
        )
    fmt = quantization.get("fmt", _FMT)
    if fmt != _FMT:
        raise ValueError(f"quantization_config fmt {fmt!r} is not supported (only {_FMT!r})")
    scheme = quantization.get("activation_scheme", "dynamic")
    if scheme not in _ACTIVATION_SCHEMES:
        raise ValueError(
            f"quantization_config activation_scheme {scheme!r} is not supported "
            "(only 'dynamic': no stored activation scales)"
        )
    block = quantization.get("weight_block_size")
    if (
        not isinstance(block, (list, tuple))
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ValueError(
            f"quantization_config weight_block_size {block!r} is not supported "
            "(two positive integers, [rows, columns], are needed)"
        )
    return int(block[0]), int(block[1])


def dequantize_fp8(
    weight: Tensor,
    scale_inv: Tensor,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.float32,
    *,
    name: str = "weight",
) -> Tensor:
    """The values of an FP8 block-quantised weight; see the module docstring.

    Args:
        weight: (..., N, K) float8_e4m3fn.
        scale_inv: (..., ceil(N / B0), ceil(K / B1)) scales, multiplied in float32.
        block: (B0, B1).
        dtype: the result's dtype.
        name: the tensor's name, for the errors.
    Returns:
        (..., N, K) values in dtype.
    Raises:
        ValueError: a weight that is not float8_e4m3fn, or a scale of the wrong shape,
            naming the tensor.
    """
    if weight.dtype != FP8_DTYPE:
        raise ValueError(f"{name} is {weight.dtype}, expected {FP8_DTYPE} with its scale")
    if weight.dim() < 2:
        raise ValueError(f"{name} is {tuple(weight.shape)}: FP8 blocks need a matrix")
    rows, cols = weight.shape[-2:]
    expected = (*weight.shape[:-2], math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"{name}{SCALE_SUFFIX} is {tuple(scale_inv.shape)}, expected {expected} for "
            f"{name} {tuple(weight.shape)} in blocks of {block[0]}x{block[1]}"
        )
    if not scale_inv.dtype.is_floating_point:
        raise ValueError(f"{name}{SCALE_SUFFIX} is {scale_inv.dtype}, expected float32")
    scale = scale_inv.float()
    scale = scale.repeat_interleave(block[0], dim=-2)[..., :rows, :]
    scale = scale.repeat_interleave(block[1], dim=-1)[..., :cols]
    return (weight.float() * scale).to(dtype)


def quantize_fp8(values: Tensor, block: tuple[int, int] = (128, 128)) -> tuple[Tensor, Tensor]:
    """weight (..., N, K) float8_e4m3fn and scale_inv (..., ceil(N / B0), ceil(K / B1))
    float32 of values: each block divided by its absmax / 448 (an all-zero block: 1)."""
    v = values.float()
    rows, cols = v.shape[-2:]
    pad_r, pad_c = -rows % block[0], -cols % block[1]
    padded = torch.nn.functional.pad(v, (0, pad_c, 0, pad_r))
    grid = padded.unflatten(-1, (-1, block[1])).unflatten(-3, (-1, block[0]))
    # grid (..., R, B0, C, B1)
    amax = grid.abs().amax(dim=(-3, -1))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    full = scale_inv.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    weight = (padded / full).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)[..., :rows, :cols]
    return weight.contiguous(), scale_inv


def stored_fp8(dtype_name: str) -> bool:
    """Whether a safetensors dtype name (get_slice(...).get_dtype()) is an 8-bit float."""
    return dtype_name in _FP8_STORED


def fp8_reader(
    files: dict,
    stored_dtype: Callable[[str], str],
    raw: Callable[[str], Tensor],
    block: tuple[int, int] | None,
    dtype: torch.dtype,
) -> tuple[dict, Callable[[str], Tensor]]:
    """The checkpoint's tensor names without the scales, and a reader that dequantizes.

    Args:
        files: {tensor name: file}, as weight_files gives it.
        stored_dtype: name -> its safetensors dtype name, read without loading it.
        raw: name -> the stored tensor.
        block: the quantization_config's block; None: the checkpoint has no FP8 config.
        dtype: what each FP8 weight is dequantized to.
    Returns:
        ({name: file} less every scale that goes with a weight, read(name)).
    Raises:
        ValueError: FP8 weights without an FP8 quantization_config, or without their
            scales; scales of weights that are not FP8; each list in one message.
    """
    fp8 = sorted(name for name in files if stored_fp8(stored_dtype(name)))
    if block is None:
        if fp8:
            raise ValueError(
                f"the tensors {_short(fp8)} are 8-bit floats but config.json has no FP8 "
                "quantization_config (quant_method 'fp8', weight_block_size) to read them"
            )
        return files, raw
    scales = {name: name + SCALE_SUFFIX for name in fp8 if not name.endswith(SCALE_SUFFIX)}
    unscaled = [name for name, scale in scales.items() if scale not in files]
    if unscaled:
        raise ValueError(
            f"the FP8 weights {_short(unscaled)} have no {SCALE_SUFFIX} tensor "
            f"(expected {unscaled[0]}{SCALE_SUFFIX})"
        )
    orphans = sorted(
        name
        for name in files
        if name.endswith(SCALE_SUFFIX)
        and name.removesuffix(SCALE_SUFFIX) in files
        and name.removesuffix(SCALE_SUFFIX) not in scales
    )
    if orphans:
        raise ValueError(
            f"the tensors {_short(orphans)} scale weights that are not stored in FP8 "
            f"(expected {FP8_DTYPE} weights with them)"
        )
    consumed = set(scales.values())
    kept = {name: file for name, file in files.items() if name not in consumed}

    def read(name: str) -> Tensor:
        if name in scales:
            return dequantize_fp8(raw(name), raw(scales[name]), block, dtype, name=name)
        return raw(name)

    return kept, read


def _short(names: list[str], shown: int = 10) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"[{', '.join(names[:shown])}]{more}"
