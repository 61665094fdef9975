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
