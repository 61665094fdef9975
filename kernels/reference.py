"""Pure-PyTorch expert computation: the reference every kernel is tested against.

Written by hand because no library offers a dropless grouped SwiGLU over stacked expert weights
with routing kept outside the experts: transformers' classic block loops with a boolean mask per
expert, MegaBlocks/ScatterMoE need a GPU. This path runs everywhere, is differentiable by autograd,
and is the CPU implementation users get.

Layout (transformers 5 / Mixtral): `gate_up [E, 2f, d]` holds gate rows then up rows,
`down [E, d, f]`; an expert computes `down @ (silu(gate @ x) * (up @ x))`.
"""

from __future__ import annotations

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


def moe_swiglu(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """Dropless routed SwiGLU experts: sort once, run contiguous per-expert slices, scatter once.

    Never materializes a `[T, E, d]` tensor; memory is O(N*(d + 2f)) for N filled slots.

    Args:
        x: token states `[T, d]`.
        weights: combine weights `[T, K]` (any float dtype; applied in x's dtype).
        indices: expert ids `[T, K]`, values in `[0, E)`, or -1 for an empty slot (skipped).
        gate_up: `[E, 2f, d]` gate rows then up rows of each expert.
        down: `[E, d, f]`.

    Returns:
        `[T, d]`: sum over the filled slots of weight * expert(x); 0 for a token with none. The
        output is connected to autograd even when no slot is filled (zero gradients).
    """
    num_tokens, hidden = x.shape
    top_k = indices.shape[1]
    order, counts = sort_by_expert(indices, gate_up.shape[0])
    if order.numel() == 0:
        return connected_zeros(x, gate_up, down, weights.to(x.dtype))
    token_of = order // top_k  # [N]
    # index_select and split (not fancy indexing and slices): their backward is one index_add
    # and one cat, where per-slice backward would add a full-size zero gradient per expert.
    xs = x.index_select(0, token_of)  # [N, d], grouped by expert
    outs = []
    for e, xe in enumerate(xs.split(counts.tolist())):
        if xe.shape[0] == 0:
            continue
        gate, up = F.linear(xe, gate_up[e]).chunk(2, dim=-1)  # [n, f] each
        outs.append(F.linear(F.silu(gate) * up, down[e]))  # [n, d]
    ys = torch.cat(outs) * weights.reshape(-1)[order].unsqueeze(-1).to(x.dtype)  # [N, d]
    return x.new_zeros(num_tokens, hidden).index_add(0, token_of, ys)
