"""Weight-only quantized experts, the fast eager path (what `ops.moe_quantized` runs by default).

Same signature and result as `zoo.kernels.reference.moe_quantized` (tested against it and
against float64), with fewer passes over each chosen expert's weights:

- int8 per channel: `F.linear(x, codes) * scale` (the scale applied to the `[n, N]` output, not
  to the `[N, K]` weight): one conversion pass instead of conversion + multiply;
- int4: the two nibbles of each byte are written into a preallocated float `[N, 2, K/2]` (the
  packing's halves layout makes that two strided writes) and scaled in place.

Measured on our 2-core CPU (AMD EPYC with AVX-512 VNNI, torch 2.14.1, one thread, 1 token, one
expert matrix `[2048, 512]` and `[512, 128]`; `bench/quantize.py`, figures in bench/RESULTS.md):
this path is the fastest correct one we found for each format, ahead of the dequantizing
reference, of `torch.ops.aten._weight_int8pack_mm` (2-3x slower than this int8 path) and of
`torch.ops.aten._weight_int4pack_mm_for_cpu` (torchao's CPU int4 layout, 2-3x slower than this
int4 path); `torch.compile` of dequantize + linear compiled for 73 s and ran no faster. Against
fp32 `F.linear`: at `[2048, 512]` (weights larger than the caches) this int8 path ran 0.6-0.9x
fp32's time and int4 1.3-1.6x; at `[512, 128]` per-op overhead dominates (int8 1.7-2.3x, int4
4-6x per matrix, about 1.0x / 1.6x for a whole MoE layer). There is no Triton kernel for
quantized experts; CUDA runs this path too (not measured: no GPU here).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from zoo.kernels.reference import grouped_experts


def dequantize_fast(codes: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """One expert's float weight `[N, K]` from codes `[N, K]` (int8) / `[N, K/2]` (uint8, int4) and scales `[N, G]`."""
    n = codes.shape[0]
    if bits == 4:
        half = codes.shape[-1]
        w = torch.empty(n, 2, half, dtype=dtype, device=codes.device)
        w[:, 0] = codes & 15
        w[:, 1] = codes >> 4
        w = w.view(n, 2 * half).sub_(8)
    else:
        w = codes.to(dtype)
    k = w.shape[-1]
    g = scales.shape[-1]
    w.view(n, g, k // g).mul_(scales.to(dtype).unsqueeze(-1))
    return w


def quantized_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bits: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x [n, K] @ dequantize(codes, scales).T + bias` -> `[n, N]`."""
    if bits == 8 and scales.shape[-1] == 1:  # per channel: scale the output, not the weight
        y = F.linear(x, codes.to(x.dtype)) * scales[:, 0].to(x.dtype)
        return y if bias is None else y + bias
    return F.linear(x, dequantize_fast(codes, scales, bits, x.dtype), bias)


def moe_quantized(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    in_codes: torch.Tensor,
    in_scales: torch.Tensor,
    out_codes: torch.Tensor,
    out_scales: torch.Tensor,
    *,
    bits: int,
    gated: bool,
    activation: Callable[[torch.Tensor], torch.Tensor],
    in_bias: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed quantized experts; see `zoo.kernels.reference.moe_quantized` for shapes and meaning."""

    def expert(e: int, xe: torch.Tensor) -> torch.Tensor:
        h = quantized_linear(xe, in_codes[e], in_scales[e], bits, None if in_bias is None else in_bias[e])
        if gated:
            gate, up = h.chunk(2, dim=-1)
            h = activation(gate) * up
        else:
            h = activation(h)
        return quantized_linear(h, out_codes[e], out_scales[e], bits, None if out_bias is None else out_bias[e])

    params = tuple(p for p in (in_bias, out_bias) if p is not None)
    return grouped_experts(x, weights, indices, in_codes.shape[0], expert, params)


__all__ = ["dequantize_fast", "moe_quantized", "quantized_linear"]
