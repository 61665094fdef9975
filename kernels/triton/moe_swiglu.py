"""The Triton routed-SwiGLU op: `torch.library.custom_op`s for forward and backward.

Same signature and meaning as `zoo.kernels.reference.moe_swiglu`. Forward: route (sort by expert),
gathered gate_up GEMM with the SwiGLU epilogue, down GEMM with the router-weighted scatter, sum of
the k slots. Backward: one pass for the down projection and the SwiGLU backward (plus
d(weights)), one for dx, and two grouped weight-gradient GEMMs. Custom ops (not a bare
autograd.Function) so `torch.compile` treats the kernels as opaque calls with known output shapes.

Saved for backward: the `[N, 2f]` pre-activations (N = T*k) and the routing; the activation
`[N, f]` is recomputed from them where needed.
"""

from __future__ import annotations

import torch

from zoo.kernels.reference import connected_zeros
from zoo.kernels.triton.routing import Routing, route
from zoo.kernels.triton.scatter_gemm import scatter_gemm
from zoo.kernels.triton.swiglu_gemm import down_backward, gate_up_forward
from zoo.kernels.triton.weight_grad import down_weight_grad, gate_up_weight_grad


def _check(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    if x.dim() != 2 or weights.dim() != 2 or weights.shape != indices.shape or weights.shape[0] != x.shape[0]:
        raise ValueError(f"expected x [T, d], weights and indices [T, k]; got {tuple(x.shape)}, {tuple(weights.shape)}, {tuple(indices.shape)}")
    num_experts, two_f, hidden = gate_up.shape
    if hidden != x.shape[1] or two_f % 2 or down.shape != (num_experts, hidden, two_f // 2):
        raise ValueError(f"expected gate_up [E, 2f, d] and down [E, d, f] with d={x.shape[1]}; got {tuple(gate_up.shape)}, {tuple(down.shape)}")
    if not (x.dtype == gate_up.dtype == down.dtype):
        raise ValueError(f"x, gate_up and down must share a dtype; got {x.dtype}, {gate_up.dtype}, {down.dtype}")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor; got {indices.dtype}")


@torch.library.custom_op("zoo::moe_swiglu_triton", mutates_args=())
def _forward(
    x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns y `[T, d]` and, for backward, h `[N, 2f]`, order `[N]`, token_of `[N]`, counts `[E]`."""
    routing = route(indices, gate_up.shape[0])
    h, a = gate_up_forward(x, gate_up, routing)  # [N, 2f], [N, f]
    y = scatter_gemm(a, down, routing, indices.shape[1], weights=weights, transpose_w=True)  # [T, d]
    return y, h, routing.order, routing.token_of, routing.counts


@_forward.register_fake
def _(x, weights, indices, gate_up, down):
    num_rows = indices.numel()
    return (
        x.new_empty(x.shape),
        x.new_empty(num_rows, gate_up.shape[1]),
        indices.new_empty(num_rows, dtype=torch.int64),
        indices.new_empty(num_rows, dtype=torch.int32),
        indices.new_empty(gate_up.shape[0], dtype=torch.int32),
    )


@torch.library.custom_op("zoo::moe_swiglu_triton_backward", mutates_args=())
def _backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    h: torch.Tensor,
    order: torch.Tensor,
    token_of: torch.Tensor,
    counts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dx `[T, d]`, d_weights `[T, k]`, d_gate_up `[E, 2f, d]`, d_down `[E, d, f]`."""
    routing = Routing(order, token_of, counts)
    num_experts = gate_up.shape[0]
    dy = dy.to(x.dtype)
    dh, d_weights = down_backward(dy, down, weights, h, routing)  # [N, 2f], [T, k] fp32
    dx = scatter_gemm(dh, gate_up, routing, weights.shape[1])  # [T, d]
    d_down = down_weight_grad(dy, h, weights, routing, num_experts, down.dtype)  # [E, d, f]
    d_gate_up = gate_up_weight_grad(dh, x, routing, num_experts, gate_up.dtype)  # [E, 2f, d]
    return dx, d_weights.to(weights.dtype), d_gate_up, d_down


@_backward.register_fake
def _(dy, x, weights, gate_up, down, h, order, token_of, counts):
    return x.new_empty(x.shape), weights.new_empty(weights.shape), gate_up.new_empty(gate_up.shape), down.new_empty(down.shape)


def _setup_context(ctx, inputs, output):
    x, weights, _indices, gate_up, down = inputs
    _y, h, order, token_of, counts = output
    ctx.save_for_backward(x, weights, gate_up, down, h, order, token_of, counts)


def _autograd_backward(ctx, dy, _dh, _order, _token_of, _counts):
    dx, d_weights, d_gate_up, d_down = _backward(dy, *ctx.saved_tensors)
    return dx, d_weights, None, d_gate_up, d_down


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def moe_swiglu(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """Dropless routed SwiGLU experts on Triton kernels (differentiable in all float inputs).

    Args:
        x: token states `[T, d]`.
        weights: combine weights `[T, k]`.
        indices: expert ids `[T, k]`, values in `[0, E)` or -1 for an empty slot (skipped: it costs
            no compute and contributes 0). Not checked on device: other out-of-range ids are
            undefined behaviour, as in an index kernel.
        gate_up: `[E, 2f, d]` gate rows then up rows of each expert.
        down: `[E, d, f]`.

    Returns:
        `[T, d]`: sum over the k chosen experts of weight * expert(x).
    """
    _check(x, weights, indices, gate_up, down)
    if x.shape[0] == 0 or indices.shape[1] == 0:
        return connected_zeros(x, gate_up, down, weights.to(x.dtype))  # nothing routed, as in the reference
    return torch.ops.zoo.moe_swiglu_triton(x, weights, indices, gate_up, down)[0]
