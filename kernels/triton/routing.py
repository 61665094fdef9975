"""Routing for the grouped expert kernels: sort (token, slot) pairs by expert, per-expert tiles.

Hand-written pieces only where a library does not fit: the sort itself is torch's stable sort
(a radix sort on GPU that a hand-written kernel would not beat), and the counts use
`scatter_add_` instead of `torch.bincount` because bincount copies its maximum to the host.
What no library offers is `expert_tile`: inside a kernel, map a program id to (expert, row range)
from the counts alone, so the tile size can be autotuned and the launch never waits on the host.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Routing(NamedTuple):
    """Assignments grouped by expert (N = T*k).

    Attributes:
        order: `[N]` int64 flat slot ids (row-major in `[T, k]`) sorted by expert, stable; the
            same as `zoo.kernels.reference.sort_by_expert(...)[0]`.
        token_of: `[N]` int32, the token of each sorted row (`order // k`).
        counts: `[E]` int32 rows per expert; expert e owns sorted rows
            `[offsets[e], offsets[e] + counts[e])` with `offsets = cumsum(counts) - counts`.
    """

    order: torch.Tensor
    token_of: torch.Tensor
    counts: torch.Tensor


def route(indices: torch.Tensor, num_experts: int) -> Routing:
    """Group the T*k assignments by expert without a device-to-host sync.

    Empty slots (`indices == -1`) sort after every expert's rows, into a bucket E that no kernel
    tile reaches (tiles come from `counts[:E]`), so they are never computed; the kernels' callers
    zero the buffers those rows would have written.

    Args:
        indices: expert ids `[T, k]`, values in `[0, E)` or -1.
        num_experts: E.

    Returns:
        `Routing` (order, token_of, counts); `order` and `token_of` hold all T*k slots.
    """
    flat = indices.reshape(-1).long()  # [N]
    flat = torch.where(flat < 0, num_experts, flat)  # empty slots -> bucket E, sorted last
    order = torch.argsort(flat, stable=True)  # [N]
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))  # [E + 1]
    token_of = torch.div(order, indices.shape[1], rounding_mode="floor").to(torch.int32)  # [N]
    return Routing(order, token_of, counts[:num_experts])


@triton.jit
def expert_tile(counts_ptr, num_experts, pid_m, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Map row-tile `pid_m` of a grouped GEMM to its expert and sorted-row range.

    Each expert e gets `ceil(counts[e] / BLOCK_M)` tiles, experts in order; a tile never spans two
    experts, so it multiplies with one weight matrix. Tiles past the last return
    `expert >= num_experts` and the caller exits.

    Returns:
        expert: scalar expert id.
        row_start: first sorted row of the tile.
        row_end: one past the expert's last sorted row (mask rows `>= row_end`).
    """
    ie = tl.arange(0, BLOCK_E)
    c = tl.load(counts_ptr + ie, mask=ie < num_experts, other=0)  # [BE]
    tiles = (c + BLOCK_M - 1) // BLOCK_M  # [BE]
    expert = tl.sum((tl.cumsum(tiles, 0) <= pid_m).to(tl.int32), 0)
    first_tile = tl.sum(tl.where(ie < expert, tiles, 0), 0)
    expert_start = tl.sum(tl.where(ie < expert, c, 0), 0)
    count = tl.sum(tl.where(ie == expert, c, 0), 0)
    row_start = expert_start + (pid_m - first_tile) * BLOCK_M
    return expert, row_start, expert_start + count


@triton.jit
def expert_rows(counts_ptr, num_experts, expert, BLOCK_E: tl.constexpr):
    """First sorted row and row count of `expert` (for kernels that loop over an expert's rows)."""
    ie = tl.arange(0, BLOCK_E)
    c = tl.load(counts_ptr + ie, mask=ie < num_experts, other=0)  # [BE]
    return tl.sum(tl.where(ie < expert, c, 0), 0), tl.sum(tl.where(ie == expert, c, 0), 0)


@triton.jit
def grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Flat program id -> (row tile, column tile), GROUP_M row tiles at a time.

    The usual L2 swizzle: programs running together share GROUP_M row tiles (gathered input rows)
    and a band of column tiles (weight tiles), instead of every program in a wave re-reading all
    rows for one column tile.
    """
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n
