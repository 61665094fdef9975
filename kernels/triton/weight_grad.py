"""Grouped weight gradient: `dW[e] = sum over expert e's rows r of L[r]^T R[r]`.

Used for `d down[e] = sum_r (w_r dy[token_r]) a_r^T` (L gathered by token and router-weighted, R
the SwiGLU activation recomputed from the saved pre-activations) and for
`d gate_up[e] = sum_r dh_r x[token_r]^T` (R gathered by token). Hand-written because the gather,
the weight multiply and the recompute of `a` happen while loading the tiles, so no `[N, d]` or
`[N, f]` operand is materialized; each program reduces over one expert's rows, in a fixed order
(deterministic, no atomics). An expert with no rows gets an exact zero gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.kernels.triton._tuning import block_e, configs, dot_precision
from zoo.kernels.triton.routing import Routing, expert_rows

_CONFIGS = configs(
    gpu=[
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    ],
    interpret={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16},
)


@triton.autotune(configs=_CONFIGS, key=["M", "N_OUT"])
@triton.jit
def _weight_grad_kernel(
    l_ptr, r_ptr, token_ptr, order_ptr, weights_ptr, counts_ptr, out_ptr,
    M, N_OUT, num_experts, r_up_offset,
    stride_l, stride_lc, stride_r, stride_rc, stride_oe, stride_om, stride_on,
    GATHER_L: tl.constexpr, SCALE_L: tl.constexpr, GATHER_R: tl.constexpr, SWIGLU_R: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[e, m, n] = sum_{r in expert e} L[r, m] * R[r, n]; BLOCK_K runs over rows."""
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    num_n = tl.cdiv(N_OUT, BLOCK_N)
    ms = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    ns = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_mask = ms < M
    n_mask = ns < N_OUT
    start, count = expert_rows(counts_ptr, num_experts, expert, BLOCK_E)
    rs = tl.arange(0, BLOCK_K)  # [BK]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, count, BLOCK_K):
        rows = start + r0 + rs  # [BK] sorted rows
        r_mask = (r0 + rs) < count
        tok = tl.load(token_ptr + rows, mask=r_mask, other=0).to(tl.int64)  # [BK]
        l_rows = tok if GATHER_L else rows.to(tl.int64)
        lt = tl.load(l_ptr + l_rows[:, None] * stride_l + ms[None, :] * stride_lc,
                     mask=r_mask[:, None] & m_mask[None, :], other=0.0)  # [BK, BM]
        if SCALE_L:
            slot = tl.load(order_ptr + rows, mask=r_mask, other=0)
            w = tl.load(weights_ptr + slot, mask=r_mask, other=0.0).to(tl.float32)  # [BK]
            lt = (lt.to(tl.float32) * w[:, None]).to(l_ptr.dtype.element_ty)
        r_rows = tok if GATHER_R else rows.to(tl.int64)
        r_ptrs = r_ptr + r_rows[:, None] * stride_r + ns[None, :] * stride_rc  # [BK, BN]
        rt_mask = r_mask[:, None] & n_mask[None, :]
        if SWIGLU_R:
            gate = tl.load(r_ptrs, mask=rt_mask, other=0.0).to(tl.float32)
            up = tl.load(r_ptrs + r_up_offset, mask=rt_mask, other=0.0).to(tl.float32)
            rt = (gate * tl.sigmoid(gate) * up).to(r_ptr.dtype.element_ty)
        else:
            rt = tl.load(r_ptrs, mask=rt_mask, other=0.0)
        acc = tl.dot(tl.trans(lt), rt, acc, input_precision=PRECISION)
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + ms[:, None] * stride_om + ns[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _launch(l, r, routing, weights, out, gather_l, gather_r, swiglu_r, r_cols):
    num_experts, m, n_out = out.shape
    flat_w = weights.reshape(-1) if weights is not None else routing.counts  # unused pointer if None
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]), num_experts)  # noqa: E731
    _weight_grad_kernel[grid](
        l, r, routing.token_of, routing.order, flat_w, routing.counts, out,
        m, n_out, num_experts, r_cols * r.stride(1),
        l.stride(0), l.stride(1), r.stride(0), r.stride(1), out.stride(0), out.stride(1), out.stride(2),
        GATHER_L=gather_l, SCALE_L=weights is not None, GATHER_R=gather_r, SWIGLU_R=swiglu_r,
        PRECISION=dot_precision(l.dtype), BLOCK_E=block_e(num_experts),
    )  # fmt: skip
    return out


def down_weight_grad(
    dy: torch.Tensor, h: torch.Tensor, weights: torch.Tensor, routing: Routing, num_experts: int, dtype: torch.dtype
) -> torch.Tensor:
    """`[E, d, f]` gradient of `down`.

    Args:
        dy: `[T, d]` output gradient (any strides).
        h: `[N, 2f]` saved pre-activations (a = silu(gate) * up is recomputed while loading).
        weights: `[T, k]` combine weights.
        routing: the forward's routing.
        num_experts: E.
        dtype: dtype of `down`.
    """
    inter = h.shape[1] // 2
    out = h.new_empty(num_experts, dy.shape[1], inter, dtype=dtype)
    return _launch(dy, h, routing, weights, out, gather_l=True, gather_r=False, swiglu_r=True, r_cols=inter)


def gate_up_weight_grad(
    dh: torch.Tensor, x: torch.Tensor, routing: Routing, num_experts: int, dtype: torch.dtype
) -> torch.Tensor:
    """`[E, 2f, d]` gradient of `gate_up` from `dh [N, 2f]` (sorted) and `x [T, d]` (gathered)."""
    out = dh.new_empty(num_experts, dh.shape[1], x.shape[1], dtype=dtype)
    return _launch(dh, x, routing, None, out, gather_l=False, gather_r=True, swiglu_r=False, r_cols=0)
