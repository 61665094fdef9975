"""Pure-PyTorch expert computation: the reference every kernel is tested against.

Written by hand because no library offers dropless grouped experts over stacked expert weights
with routing kept outside the experts: transformers' classic block loops with a boolean mask per
expert, MegaBlocks/ScatterMoE need a GPU. This path runs everywhere, is differentiable by autograd,
and is the CPU implementation users get.

Layout (transformers 5 / Mixtral): `gate_up [E, 2f, d]` holds gate rows then up rows,
`down [E, d, f]`; an expert computes `down @ (silu(gate @ x) * (up @ x))`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def sort_by_expert(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the filled (token, slot) assignments by expert; empty slots (`-1`) are left out.

    Args:
        indices: expert ids `[T, K]`, in `[0, E)` or -1 (empty slot).
        num_experts: E.

    Returns:
        order: `[N]` flat slot ids (row-major in `[T, K]`) of the N filled slots, sorted by
            expert, stable, so tokens keep their order inside each expert; the token of slot s is
            `s // K`.
        counts: `[E]` assignments per expert (int64); expert e owns
            `order[offsets[e]:offsets[e] + counts[e]]` with `offsets = cumsum(counts) - counts`.
    """
    flat = indices.reshape(-1)
    flat = torch.where(flat < 0, num_experts, flat)  # empty slots sort last, into bucket E
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts + 1)
    filled = flat.numel() - int(counts[num_experts])
    return order[:filled], counts[:num_experts]


def connected_zeros(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like x that stay in the autograd graph of x and params (gradients 0, not None).

    A layer that routed no token (0 tokens, or every slot empty) must still give every input a
    gradient: expert parallelism and data parallelism run collectives over those gradients.
    """
    out = x * 0
    for p in params:
        out = out + 0.0 * p.sum()
    return out


def grouped_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    num_experts: int,
    expert: Callable[[int, torch.Tensor], torch.Tensor],
    params: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """Dropless routed experts of any kind: sort once, run contiguous per-expert slices, scatter once.

    Never materializes a `[T, E, d]` tensor; memory is O(N*(d + f)) for N filled slots.

    Args:
        x: token states `[T, d]`.
        weights: combine weights `[T, K]` (any float dtype; applied in x's dtype).
        indices: expert ids `[T, K]`, values in `[0, E)`, or -1 for an empty slot (skipped).
        num_experts: E.
        expert: `(e, rows [n, d]) -> [n, d_out]`, expert e applied to the rows routed to it.
        params: the experts' parameters (kept in the graph when no slot is filled).

    Returns:
        `[T, d_out]`: sum over the filled slots of weight * expert(x); 0 for a token with none. The
        output is connected to autograd even when no slot is filled (zero gradients).
    """
    num_tokens = x.shape[0]
    top_k = indices.shape[1]
    order, counts = sort_by_expert(indices, num_experts)
    if order.numel() == 0:
        return connected_zeros(x, *params, weights.to(x.dtype))
    token_of = order // top_k  # [N]
    # index_select and split (not fancy indexing and slices): their backward is one index_add
    # and one cat, where per-slice backward would add a full-size zero gradient per expert.
    xs = x.index_select(0, token_of)  # [N, d], grouped by expert
    outs = []
    for e, xe in enumerate(xs.split(counts.tolist())):
        if xe.shape[0] == 0:
            continue
        outs.append(expert(e, xe))  # [n, d]
    ys = torch.cat(outs) * weights.reshape(-1)[order].unsqueeze(-1).to(x.dtype)  # [N, d]
    return ys.new_zeros(num_tokens, ys.shape[1]).index_add(0, token_of, ys)


def moe_swiglu(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """Dropless routed SwiGLU experts (`grouped_experts` with `down(silu(gate x) * up x)`).

    Args:
        x: token states `[T, d]`.
        weights: combine weights `[T, k]` (any float dtype; applied in x's dtype).
        indices: expert ids `[T, k]`, values in `[0, E)`, or -1 for an empty slot (skipped).
        gate_up: `[E, 2f, d]` gate rows then up rows of each expert.
        down: `[E, d, f]`.

    Returns:
        `[T, d]`: sum over the filled slots of weight * expert(x); 0 for a token with none.
    """

    def expert(e: int, xe: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(xe, gate_up[e]).chunk(2, dim=-1)  # [n, f] each
        return F.linear(F.silu(gate) * up, down[e])  # [n, d]

    return grouped_experts(x, weights, indices, gate_up.shape[0], expert, (gate_up, down))


def moe_glu(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor],
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed gated experts of any activation: `down(act(gate x + bg) * (up x + bu)) + bd`.

    Args:
        x, weights, indices: as in `moe_swiglu`.
        gate_up: `[E, 2f, d]`; down: `[E, d, f]`.
        activation: the gate's activation.
        gate_up_bias: `[E, 2f]` or None; down_bias: `[E, d]` or None.
    """

    def expert(e: int, xe: torch.Tensor) -> torch.Tensor:
        h = F.linear(xe, gate_up[e], None if gate_up_bias is None else gate_up_bias[e])
        gate, up = h.chunk(2, dim=-1)
        return F.linear(activation(gate) * up, down[e], None if down_bias is None else down_bias[e])

    params = tuple(p for p in (gate_up, down, gate_up_bias, down_bias) if p is not None)
    return grouped_experts(x, weights, indices, gate_up.shape[0], expert, params)


def moe_mlp(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    fc1: torch.Tensor,
    fc2: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor],
    fc1_bias: torch.Tensor | None = None,
    fc2_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed plain experts: `fc2(act(fc1 x + b1)) + b2`.

    Args:
        x, weights, indices: as in `moe_swiglu`.
        fc1: `[E, f, d]`; fc2: `[E, d, f]`.
        activation: the hidden activation.
        fc1_bias: `[E, f]` or None; fc2_bias: `[E, d]` or None.
    """

    def expert(e: int, xe: torch.Tensor) -> torch.Tensor:
        h = activation(F.linear(xe, fc1[e], None if fc1_bias is None else fc1_bias[e]))
        return F.linear(h, fc2[e], None if fc2_bias is None else fc2_bias[e])

    params = tuple(p for p in (fc1, fc2, fc1_bias, fc2_bias) if p is not None)
    return grouped_experts(x, weights, indices, fc1.shape[0], expert, params)


# --- Weight-only quantized experts (FineQuant; Kim et al. 2023) -------------------------------------
#
# The format: symmetric absmax quantization of each weight matrix `[N, K]` (N outputs, K inputs) in
# groups of `g` consecutive inputs of one output row (g = K: one scale per output channel). A group
# with absmax a has scale `s = a / qmax` (qmax = 127 for int8, 7 for int4) and codes
# `round(w / s)`, so `|w - s * code| <= s / 2`. Symmetric, with no zero point (our choice: one
# scale per group is all the format stores); int4 codes use the 15 levels -7..7. int8 codes are
# stored as int8 `[N, K]`; int4 codes two per byte as uint8 `[N, K/2]`: byte j of a row holds
# column j in its low nibble and column j + K/2 in its high nibble, both offset by 8 (0..15). That
# layout (halves, not neighbours) is chosen because it unpacks into a preallocated float row with
# two strided writes, measured 4.6x faster on our CPU than interleaving neighbours (0.16 vs 0.75 ms
# for a 2048 x 512 matrix). Scales are computed in float32 `[N, K/g]` (`QuantizedExperts` stores
# them in the float weights' dtype).

QUANT_BITS = (4, 8)


def check_quantization(bits: int, group_size: int | None, in_features: int, where: str = "quantize") -> int:
    """The group size to use for a matrix with `in_features` inputs (`None`: per channel, = K).

    Raises:
        ValueError: naming the cause: bits not in {4, 8}; a group size that is not a positive
            integer or does not divide K; an odd K or an odd group size for int4.
    """
    if isinstance(bits, bool) or bits not in QUANT_BITS:
        raise ValueError(f"{where}: bits={bits!r} is not supported; accepted: {list(QUANT_BITS)}")
    g = in_features if group_size is None else group_size
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ValueError(f"{where}: group_size={group_size!r} must be a positive integer or None (per channel)")
    if in_features % g:
        raise ValueError(f"{where}: group_size={g} does not divide the matrix's input dimension {in_features}; "
                         f"use a divisor of {in_features} or None (per channel)")
    if bits == 4 and (in_features % 2 or g % 2):
        raise ValueError(f"{where}: int4 packs two codes per byte, so the input dimension ({in_features}) and "
                         f"group_size ({g}) must be even")
    return g


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize weight matrices group-wise (symmetric absmax; the format above).

    Args:
        w: `[..., N, K]` float weights (any leading dims, e.g. `[E, N, K]` stacked experts).
        bits: 8 or 4.
        group_size: inputs per scale, dividing K; None: one scale per output channel.

    Returns:
        codes: int8 `[..., N, K]` (bits 8) or uint8 `[..., N, K/2]` (bits 4, packed).
        scales: float32 `[..., N, K/g]`.
    """
    k = w.shape[-1]
    g = check_quantization(bits, group_size, k)
    qmax = 2 ** (bits - 1) - 1
    groups = w.detach().to(torch.float32).reshape(*w.shape[:-1], k // g, g)  # [..., N, G, g]
    scales = groups.abs().amax(dim=-1) / qmax  # [..., N, G]
    safe = torch.where(scales > 0, scales, torch.ones((), dtype=scales.dtype, device=scales.device))
    codes = torch.round(groups / safe.unsqueeze(-1)).clamp_(-qmax, qmax).to(torch.int8).reshape(w.shape)
    return (pack_int4(codes) if bits == 4 else codes), scales


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] `[..., K]` -> uint8 `[..., K/2]`: column j low nibble, j + K/2 high nibble."""
    half = codes.shape[-1] // 2
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    return u[..., :half] | (u[..., half:] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 `[..., K/2]` -> int8 codes `[..., K]` (the inverse of `pack_int4`)."""
    lo = (packed & 15).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.cat([lo, hi], dim=-1)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float weights `[..., N, K]` from codes and scales (`quantize_weight`'s output), in `dtype`.

    The group size is implied: `g = K / scales.shape[-1]`.
    """
    q = unpack_int4(codes) if bits == 4 else codes
    k = q.shape[-1]
    groups = scales.shape[-1]
    w = q.to(dtype).reshape(*q.shape[:-1], groups, k // groups) * scales.to(dtype).unsqueeze(-1)
    return w.reshape(q.shape)


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
    """Routed experts with weight-only quantized matrices: each chosen expert's weights are
    dequantized (`dequantize`, in x's dtype) and applied as `moe_glu` / `moe_mlp` apply float ones.

    Args:
        x, weights, indices: as in `moe_swiglu` (`[T, d]`, `[T, K]`, `[T, K]`; -1 an empty slot).
        in_codes, in_scales: the stacked input projection (`gate_up [E, 2f, d]` gated, `fc1 [E, f, d]`
            plain) as codes `[E, N, d]` (int8) or `[E, N, d/2]` (uint8, int4) and scales `[E, N, d/g]`.
        out_codes, out_scales: the output projection `[E, d, f]` likewise.
        bits: 8 or 4.
        gated: `down(act(gate x) * up x)` (gate rows then up rows) or `fc2(act(fc1 x))`.
        activation: the hidden (gate) activation.
        in_bias: `[E, N]` or None; out_bias: `[E, d]` or None.

    Returns:
        `[T, d]`. No gradient flows to the codes or scales (they are not trained).
    """

    def expert(e: int, xe: torch.Tensor) -> torch.Tensor:
        w_in = dequantize(in_codes[e], in_scales[e], bits, xe.dtype)
        h = F.linear(xe, w_in, None if in_bias is None else in_bias[e])
        if gated:
            gate, up = h.chunk(2, dim=-1)
            h = activation(gate) * up
        else:
            h = activation(h)
        w_out = dequantize(out_codes[e], out_scales[e], bits, xe.dtype)
        return F.linear(h, w_out, None if out_bias is None else out_bias[e])

    params = tuple(p for p in (in_bias, out_bias) if p is not None)
    return grouped_experts(x, weights, indices, in_codes.shape[0], expert, params)
