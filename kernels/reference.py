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
    """Group the T*k (token, slot) assignments by expert.

    Args:
        indices: expert ids `[T, k]`.
        num_experts: E.

    Returns:
        order: `[T*k]` flat slot ids (row-major in `[T, k]`) sorted by expert, stable, so tokens
            keep their order inside each expert; the token of slot s is `s // k`.
        counts: `[E]` assignments per expert (int64); expert e owns
            `order[offsets[e]:offsets[e] + counts[e]]` with `offsets = cumsum(counts) - counts`.
    """
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


def moe_swiglu(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """Dropless routed SwiGLU experts: sort once, run contiguous per-expert slices, scatter once.

    Never materializes a `[T, E, d]` tensor; memory is O(T*k*(d + 2f)).

    Args:
        x: token states `[T, d]`.
        weights: combine weights `[T, k]` (any float dtype; applied in x's dtype).
        indices: expert ids `[T, k]`, values in `[0, E)`.
        gate_up: `[E, 2f, d]` gate rows then up rows of each expert.
        down: `[E, d, f]`.

    Returns:
        `[T, d]`: sum over the k chosen experts of weight * expert(x).
    """
    num_tokens, hidden = x.shape
    top_k = indices.shape[1]
    if num_tokens == 0:
        return torch.zeros_like(x)
    order, counts = sort_by_expert(indices, gate_up.shape[0])
    token_of = order // top_k  # [N], N = T*k
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
