"""Grouped GEMM over expert-sorted rows with the router-weighted scatter fused into the store.

Used twice: the forward down projection (`ys[slot] = w[slot] * down[e] @ a[r]`) and the input
gradient (`dx_slot[slot] = gate_up[e]^T @ dh[r]`). Hand-written because the scatter back to
(token, slot) order and the weight multiply would otherwise be two extra passes over `[N, d]`.
Rows are written to their own slot (`order[r]` is a permutation), so there are no atomics and the
result is deterministic; the caller sums the k slots of a token (`[T, k, d] -> [T, d]`), which
reads the `[N, d]` buffer once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.kernels.triton._tuning import GROUP_M, block_e, configs, dot_precision, grid_rows
from zoo.kernels.triton.routing import Routing, expert_tile, grouped_pid

_CONFIGS = configs(
    gpu=[
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    ],
    interpret={"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32},
)


@triton.autotune(configs=_CONFIGS, key=["K", "N_OUT"])
@triton.jit
def _scatter_gemm_kernel(
    a_ptr, w_ptr, order_ptr, weights_ptr, counts_ptr, out_ptr,
    K, N_OUT, num_experts, num_rows,
    stride_a, stride_we, stride_wk, stride_wn, stride_out,
    HAS_SCALE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[order[r], n] = (w[order[r]] if HAS_SCALE else 1) * sum_k a[r, k] * W[e, k, n]."""
    num_pid_m = tl.cdiv(num_rows, BLOCK_M) + num_experts  # grid_rows(): an upper bound
    pid_m, pid_n = grouped_pid(tl.program_id(0), num_pid_m, tl.cdiv(N_OUT, BLOCK_N), GROUP_M)
    expert, row_start, row_end = expert_tile(counts_ptr, num_experts, pid_m, BLOCK_M, BLOCK_E)
    if expert >= num_experts:
        return
    rows = row_start + tl.arange(0, BLOCK_M)  # [BM] sorted rows
    row_mask = rows < row_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    col_mask = cols < N_OUT
    ks = tl.arange(0, BLOCK_K)  # [BK]
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_a + ks[None, :]  # [BM, BK]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + ks) < K
        at = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(at, wt, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    slot = tl.load(order_ptr + rows, mask=row_mask, other=0).to(tl.int64)  # [BM]
    if HAS_SCALE:
        acc = acc * tl.load(weights_ptr + slot, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + slot[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def scatter_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    routing: Routing,
    top_k: int,
    weights: torch.Tensor | None = None,
    transpose_w: bool = False,
) -> torch.Tensor:
    """Per-expert `a @ W[e]` on sorted rows, optionally router-weighted, summed per token.

    Args:
        a: `[N, K]` contiguous rows in expert-sorted order.
        w: `[E, K, n]` (or `[E, n, K]` with `transpose_w=True`), any strides.
        routing: from `route(indices, E)`.
        top_k: k.
        weights: `[T, k]` combine weights applied per row, or None.
        transpose_w: use `W[e]^T`.

    Returns:
        `[T, n]` in a's dtype: for each token, the sum over its k slots.
    """
    num_rows, inner = a.shape
    num_experts = w.shape[0]
    stride_we, stride_wk, stride_wn = w.stride()
    n_out = w.shape[2]
    if transpose_w:
        stride_wk, stride_wn = stride_wn, stride_wk
        n_out = w.shape[1]
    out = a.new_zeros(num_rows, n_out)  # [N, n], slot order; empty slots (never written) stay 0
    flat_w = weights.reshape(-1) if weights is not None else routing.counts  # unused pointer if None
    grid = lambda meta: (grid_rows(num_rows, num_experts, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)  # noqa: E731
    _scatter_gemm_kernel[grid](
        a, w, routing.order, flat_w, routing.counts, out,
        inner, n_out, num_experts, num_rows,
        a.stride(0), stride_we, stride_wk, stride_wn, out.stride(0),
        HAS_SCALE=weights is not None, PRECISION=dot_precision(a.dtype), BLOCK_E=block_e(num_experts), GROUP_M=GROUP_M,
    )  # fmt: skip
    return out.view(num_rows // top_k, top_k, n_out).sum(1)  # [T, n]
