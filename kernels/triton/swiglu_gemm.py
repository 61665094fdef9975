"""Grouped GEMMs with the SwiGLU fused in: gather -> gate_up -> SwiGLU (forward), and
gather dy -> down^T -> SwiGLU backward + d(router weight) (backward).

Hand-written because no library runs a dropless grouped GEMM over stacked expert weights with
the row gather and the SwiGLU epilogue in one pass; the unfused path materializes the gathered
`[N, d]` input and separate `[N, f]` temporaries for silu(gate), the product and their grads.
Plain pointer arithmetic, no block pointers (removed in triton 3.9), so the same source is meant
for triton 3.6 to 3.9 (so far exercised only by the triton 3.8 interpreter).

Notation: T tokens, k experts per token, N = T*k sorted rows, d hidden, f expert width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.kernels.triton._tuning import GROUP_M, block_e, configs, dot_precision, grid_rows, interpreting
from zoo.kernels.triton.routing import Routing, expert_tile, grouped_pid

_ROW_GEMM_CONFIGS = configs(
    gpu=[
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    ],
    interpret={"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32},
)

# The backward kernel writes one partial d(weight) per f-tile, so its BLOCK_N is fixed by the
# caller (it sizes the partials buffer) and only the other tile sizes are tuned.
_DOWN_BWD_BLOCK_N = 32 if interpreting() else 128
_DOWN_BWD_CONFIGS = configs(
    gpu=[
        {"BLOCK_M": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_K": 32, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    ],
    interpret={"BLOCK_M": 16, "BLOCK_K": 32},
)


@triton.autotune(configs=_ROW_GEMM_CONFIGS, key=["hidden", "inter"])
@triton.jit
def _gate_up_fwd_kernel(
    x_ptr, w_ptr, token_ptr, counts_ptr, h_ptr, a_ptr,
    hidden, inter, num_experts, num_rows,
    stride_xt, stride_xd, stride_we, stride_wn, stride_wd, stride_h, stride_a,
    PRECISION: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """h[r] = gate_up[e] @ x[token_of[r]] (gate and up halves of one f-tile), a[r] = silu(g) * u."""
    num_pid_m = tl.cdiv(num_rows, BLOCK_M) + num_experts  # grid_rows(): an upper bound
    pid_m, pid_n = grouped_pid(tl.program_id(0), num_pid_m, tl.cdiv(inter, BLOCK_N), GROUP_M)
    expert, row_start, row_end = expert_tile(counts_ptr, num_experts, pid_m, BLOCK_M, BLOCK_E)
    if expert >= num_experts:
        return
    rows = row_start + tl.arange(0, BLOCK_M)  # [BM] sorted rows
    row_mask = rows < row_end
    tok = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)  # [BM]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] in [0, f)
    col_mask = cols < inter
    ks = tl.arange(0, BLOCK_K)  # [BK]
    x_ptrs = x_ptr + tok[:, None] * stride_xt + ks[None, :] * stride_xd  # [BM, BK]
    wg_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wd  # [BK, BN]
    wu_ptrs = wg_ptrs + inter * stride_wn  # up rows follow the f gate rows
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_mask = (k0 + ks) < hidden  # [BK]
        xt = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        w_mask = k_mask[:, None] & col_mask[None, :]
        acc_g = tl.dot(xt, tl.load(wg_ptrs, mask=w_mask, other=0.0), acc_g, input_precision=PRECISION)
        acc_u = tl.dot(xt, tl.load(wu_ptrs, mask=w_mask, other=0.0), acc_u, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xd
        wg_ptrs += BLOCK_K * stride_wd
        wu_ptrs += BLOCK_K * stride_wd
    out_dtype = h_ptr.dtype.element_ty
    gate = acc_g.to(out_dtype)  # [BM, BN], rounded as stored, so backward recomputes the same a
    up = acc_u.to(out_dtype)
    act = (gate.to(tl.float32) * tl.sigmoid(gate.to(tl.float32)) * up.to(tl.float32)).to(out_dtype)
    mask = row_mask[:, None] & col_mask[None, :]
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_h + cols[None, :]  # [BM, BN]
    tl.store(h_ptrs, gate, mask=mask)
    tl.store(h_ptrs + inter, up, mask=mask)
    tl.store(a_ptr + rows[:, None].to(tl.int64) * stride_a + cols[None, :], act, mask=mask)


@triton.autotune(configs=_DOWN_BWD_CONFIGS, key=["hidden", "inter"])
@triton.jit
def _down_bwd_kernel(
    dy_ptr, w_ptr, token_ptr, order_ptr, weights_ptr, counts_ptr, h_ptr, dh_ptr, dw_part_ptr,
    hidden, inter, num_experts, num_rows,
    stride_dyt, stride_dyd, stride_we, stride_wd, stride_wf, stride_h, stride_dh,
    PRECISION: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """g_a[r] = down[e]^T @ dy[token_of[r]]; then the SwiGLU backward into dh[r] and the partial
    d(weight)[slot] = sum over this f-tile of g_a * a (a recomputed from the saved h)."""
    num_pid_m = tl.cdiv(num_rows, BLOCK_M) + num_experts  # grid_rows(): an upper bound
    pid_m, pid_n = grouped_pid(tl.program_id(0), num_pid_m, tl.cdiv(inter, BLOCK_N), GROUP_M)
    expert, row_start, row_end = expert_tile(counts_ptr, num_experts, pid_m, BLOCK_M, BLOCK_E)
    if expert >= num_experts:
        return
    rows = row_start + tl.arange(0, BLOCK_M)  # [BM]
    row_mask = rows < row_end
    tok = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)  # [BM]
    slot = tl.load(order_ptr + rows, mask=row_mask, other=0).to(tl.int64)  # [BM]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] in [0, f)
    col_mask = cols < inter
    ks = tl.arange(0, BLOCK_K)  # [BK] in [0, d)
    dy_ptrs = dy_ptr + tok[:, None] * stride_dyt + ks[None, :] * stride_dyd  # [BM, BK]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wd + cols[None, :] * stride_wf  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # g_a, unweighted
    for k0 in range(0, hidden, BLOCK_K):
        k_mask = (k0 + ks) < hidden
        dyt = tl.load(dy_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(dyt, wt, acc, input_precision=PRECISION)
        dy_ptrs += BLOCK_K * stride_dyd
        w_ptrs += BLOCK_K * stride_wd
    mask = row_mask[:, None] & col_mask[None, :]
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_h + cols[None, :]  # [BM, BN]
    gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    act = (silu * up).to(h_ptr.dtype.element_ty).to(tl.float32)  # a as the forward stored it
    tl.store(dw_part_ptr + pid_n * num_rows + slot, tl.sum(acc * act, 1), mask=row_mask)
    w = tl.load(weights_ptr + slot, mask=row_mask, other=0.0).to(tl.float32)  # [BM]
    d_act = acc * w[:, None]  # [BM, BN]
    d_gate = d_act * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = d_act * silu
    dh_ptrs = dh_ptr + rows[:, None].to(tl.int64) * stride_dh + cols[None, :]
    tl.store(dh_ptrs, d_gate.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_ptrs + inter, d_up.to(dh_ptr.dtype.element_ty), mask=mask)


def gate_up_forward(x: torch.Tensor, gate_up: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """Gathered grouped GEMM with the SwiGLU epilogue.

    Args:
        x: `[T, d]` token states (any strides).
        gate_up: `[E, 2f, d]` gate rows then up rows.
        routing: from `route(indices, E)`; N = len(routing.order).

    Returns:
        h: `[N, 2f]` pre-activations (gate then up) in sorted order, saved for backward.
        a: `[N, f]` `silu(gate) * up` in sorted order.
    """
    num_experts, two_f, hidden = gate_up.shape
    inter = two_f // 2
    num_rows = routing.order.numel()
    h = x.new_empty(num_rows, two_f)
    a = x.new_empty(num_rows, inter)
    grid = lambda meta: (grid_rows(num_rows, num_experts, meta["BLOCK_M"]) * triton.cdiv(inter, meta["BLOCK_N"]),)  # noqa: E731
    _gate_up_fwd_kernel[grid](
        x, gate_up, routing.token_of, routing.counts, h, a,
        hidden, inter, num_experts, num_rows,
        x.stride(0), x.stride(1), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2), h.stride(0), a.stride(0),
        PRECISION=dot_precision(x.dtype), BLOCK_E=block_e(num_experts), GROUP_M=GROUP_M,
    )  # fmt: skip
    return h, a


def down_backward(
    dy: torch.Tensor, down: torch.Tensor, weights: torch.Tensor, h: torch.Tensor, routing: Routing
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward through the weighted down projection and the SwiGLU, one pass.

    Args:
        dy: `[T, d]` gradient of the layer output (any strides, zero strides included).
        down: `[E, d, f]`.
        weights: `[T, k]` router combine weights.
        h: `[N, 2f]` pre-activations saved by `gate_up_forward`.
        routing: the forward's routing.

    Returns:
        dh: `[N, 2f]` gradient of the pre-activations, sorted order, dtype of h.
        d_weights: `[T, k]` float32 gradient of the combine weights.
    """
    num_experts, hidden, inter = down.shape
    num_rows = routing.order.numel()
    block_n = _DOWN_BWD_BLOCK_N
    dh = torch.empty_like(h)
    dw_part = h.new_zeros(triton.cdiv(inter, block_n), num_rows, dtype=torch.float32)  # [f-tiles, N]; empty slots stay 0
    flat_w = weights.reshape(-1)  # [N], slot order
    grid = lambda meta: (grid_rows(num_rows, num_experts, meta["BLOCK_M"]) * triton.cdiv(inter, block_n),)  # noqa: E731
    _down_bwd_kernel[grid](
        dy, down, routing.token_of, routing.order, flat_w, routing.counts, h, dh, dw_part,
        hidden, inter, num_experts, num_rows,
        dy.stride(0), dy.stride(1), down.stride(0), down.stride(1), down.stride(2), h.stride(0), dh.stride(0),
        PRECISION=dot_precision(h.dtype), BLOCK_E=block_e(num_experts), GROUP_M=GROUP_M, BLOCK_N=block_n,
    )  # fmt: skip
    return dh, dw_part.sum(0).view_as(weights)
