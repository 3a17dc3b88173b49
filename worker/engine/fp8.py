"""FP8 linear layers: weights in float8 e4m3 with one scale per output channel, activations quantized per token.

A weight W [N, K] is stored once, at load, as W8 = W / s_w (rounded to e4m3) with s_w[n] = max|W[n, :]| / 448, the
largest finite e4m3 value; an activation x [M, K] is quantized on the fly the same way per row (per token). Then
x @ W.T ~= (x8 @ W8.T) * s_x[m] * s_w[n]: `torch._scaled_mm` runs x8 @ W8.T on FP8 tensor cores, accumulates in
fp32 and applies both scales before it writes bfloat16. Per-token and per-channel scales follow each row's own range,
so one outlier token or channel does not cost the others their precision (one scale per tensor would).

`fp8_linear_reference` is the same arithmetic dequantized to fp32: what `fp8_linear` must equal up to fp32
accumulation order, on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8 e4m3fn (no infinities: values past it would become NaN, so they are clamped)
# A row of zeros (or nearly) gets this amax: its scale stays positive and its quantized values are 0, never NaN.
AMAX_FLOOR = 1e-12


def fp8_unsupported(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why FP8 linear layers cannot run on `device` with activations in `dtype` (None if they can)."""
    if device.type != "cuda":
        return (
            "FP8 matmuls need a CUDA GPU of compute capability 8.9 or newer (L4, L40S, H100, H200, B200), not the CPU"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        name = torch.cuda.get_device_name(device)
        return (
            f"FP8 matmuls need compute capability 8.9 or newer (L4, L40S, H100, H200, B200); {name} has "
            f"{capability[0]}.{capability[1]}"
        )
    if dtype != torch.bfloat16:
        return f"FP8 runs with RERANK_DTYPE=bfloat16 (the row-wise scaled matmul writes bfloat16), not {dtype}"
    return None


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (x8 [M, K] float8 e4m3, scale [M, 1] fp32) with x ~= x8 * scale, one scale per row. Under
    torch.compile this is one pass that Inductor fuses into the step before it (a norm, SiLU * up, a residual add)."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_FLOOR) / FP8_MAX  # [M, 1]
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@dataclass(frozen=True)
class Fp8Weight:
    """A linear layer's weight in float8 e4m3, one fp32 scale per output channel."""

    data: Tensor  # [N, K] float8 e4m3, row-major: `data.t()` is the column-major operand `_scaled_mm` wants
    scale: Tensor  # [1, N] float32

    @classmethod
    def quantize(cls, weight: Tensor) -> Fp8Weight:
        """Quantize a [N, K] weight (any float dtype) row by row (each row is an output channel)."""
        data, scale = quantize_rows(weight)
        return cls(data.contiguous(), scale.t().contiguous())

    def dequantized(self) -> Tensor:
        """The weight this stands for, in fp32: [N, K]."""
        return self.data.float() * self.scale.t()

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


def fp8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor) -> Tensor:
    """x @ W.T for x [M, K] in bfloat16 and W given as `Fp8Weight`'s `data` [N, K] and `scale` [1, N] (tensors, not
    the dataclass: compiled steps take them as plain arguments, so every layer shares one graph): x is quantized per
    row, the product accumulated in fp32, both scales applied, the result [M, N] written in x's dtype. K and N must
    be multiples of 16 (FP8 tensor cores); M may be anything."""
    x8, x_scale = quantize_rows(x)
    out: Tensor = torch._scaled_mm(x8, weight.t(), scale_a=x_scale, scale_b=weight_scale, out_dtype=x.dtype)
    return out


def fp8_linear_reference(x: Tensor, weight: Fp8Weight) -> Tensor:
    """What `fp8_linear(x, weight.data, weight.scale)` computes, in fp32: x and W quantized, dequantized, multiplied
    (only the order of the fp32 sums and the final rounding differ)."""
    x8, x_scale = quantize_rows(x)
    return (x8.float() * x_scale) @ weight.dequantized().t()
