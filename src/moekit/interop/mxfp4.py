"""MXFP4 weights, as the published gpt-oss checkpoints store their experts.

# G blocks per row, K = 32 * G values per row

The format is MXFP4 of the OCP Microscaling Formats (MX) Specification v1.0 (Open Compute
Project, 2023): values come in blocks of 32 that share one scale.
- Each element is FP4 E2M1: a sign bit, 2 exponent bits (bias 1) and 1 mantissa bit, so
  the codes 0..7 are the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 and bit 3 is the sign
  (codes 8..15 are -0, -0.5, ..., -6). There is no infinity or NaN.
- The shared scale is E8M0: an unsigned 8-bit exponent, X = 2^(s - 127); s = 255 is NaN.
- A block's values are element_i * X (spec section 6.3).
gpt-oss checkpoints pack two elements per byte: `<name>_blocks` (..., G, 16) uint8 holds
element 2j in the low nibble of byte j and element 2j + 1 in the high nibble, and
`<name>_scales` (..., G) uint8 the block scales; the dequantized tensor is (..., K).
transformers reads them the same way (`transformers.integrations.mxfp4`); the tests check
that both give the same tensor.

Every FP4 value times a power of two in [2^-127, 2^127] is exact in float32 (and in
bfloat16), so dequantizing to float32 and casting to the requested dtype loses nothing.

`quantize_mxfp4` is the spec's conversion (section 6.3): X = 2^(floor(log2(max |v|)) - 2)
(2 is E2M1's largest exponent), elements rounded to the nearest FP4 value, saturating at
+-6. moekit never writes MXFP4 (save_hf writes the dequantized weights); the quantizer
exists to build test checkpoints like the published ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 32  # values per scale
# FP4 E2M1 code -> value; bit 3 is the sign.
FP4_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)
_SCALE_BIAS, _SCALE_NAN = 127, 255
_EMAX_ELEMENT = 2  # E2M1's largest exponent: 6 = 1.5 * 2^2


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The values of an MXFP4 tensor.

    Args:
        blocks: (..., G, 16) uint8, two FP4 elements per byte (low nibble first).
        scales: (..., G) uint8 E8M0 exponents, one per block of 32.
        dtype: the result's dtype.
    Returns:
        (..., G * 32) values.
    Raises:
        ValueError: a dtype, a shape or a scale (NaN) outside the format, named.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(
            f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}"
        )
    if blocks.dim() < 2 or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(
            f"MXFP4 blocks must be (..., G, {BLOCK // 2}) bytes, got {tuple(blocks.shape)}"
        )
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 scales {tuple(scales.shape)} do not match blocks {tuple(blocks.shape)}: "
            f"expected {tuple(blocks.shape[:-1])}"
        )
    if (scales == _SCALE_NAN).any():
        raise ValueError("MXFP4 scales hold 255 (NaN in E8M0)")
    table = torch.tensor(FP4_VALUES, dtype=torch.float32)
    low, high = table[(blocks & 0x0F).long()], table[(blocks >> 4).long()]
    elements = torch.stack((low, high), dim=-1).flatten(-2)  # (..., G, 32)
    exponents = scales.to(torch.int32) - _SCALE_BIAS
    values = torch.ldexp(elements, exponents.unsqueeze(-1))
    return values.flatten(-2).to(dtype)


def quantize_mxfp4(values: Tensor) -> tuple[Tensor, Tensor]:
    """Blocks and scales of values (..., K) with K a multiple of 32; see the module docstring.

    Returns:
        blocks (..., K / 32, 16) uint8 and scales (..., K / 32) uint8.
    """
    if values.shape[-1] % BLOCK:
        raise ValueError(f"the last dim ({values.shape[-1]}) must be a multiple of {BLOCK}")
    v = values.float().unflatten(-1, (-1, BLOCK))  # (..., G, 32)
    amax = v.abs().amax(dim=-1)
    # X = 2^(floor(log2(amax)) - emax); an all-zero block takes the smallest scale.
    exponent = torch.floor(torch.log2(amax.clamp_min(2.0**-127))) - _EMAX_ELEMENT
    exponent = exponent.clamp(-_SCALE_BIAS, _SCALE_BIAS)
    scaled = v / torch.ldexp(torch.ones_like(amax), exponent.int()).unsqueeze(-1)
    table = torch.tensor(FP4_VALUES[:8])
    nearest = (scaled.abs().clamp_max(6.0).unsqueeze(-1) - table).abs().argmin(dim=-1)
    codes = (nearest | ((scaled < 0).long() << 3)).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exponent + _SCALE_BIAS).to(torch.uint8)
    return blocks, scales
