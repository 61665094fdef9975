"""Expert ops with device dispatch: the layer the MoE modules call.

CUDA tensors run the Triton kernels (`zoo.kernels.triton`) when triton is installed; everything
else runs the pure-PyTorch reference (`zoo.kernels.reference`). Both have the same signature and
must agree in outputs and gradients (tests/test_kernels_triton.py). The kernels exist for SwiGLU
experts; gated experts of other activations and plain (fc1 -> act -> fc2) experts run the
reference on every device.

Weight-only quantized experts (`moe_quantized`) run `zoo.kernels.quantized`, an eager path
faster than the reference on our CPU, on every device (no Triton kernel for them yet).

`ZOO_KERNELS=auto|reference|triton` overrides the choice (read on every call): `reference`
forces the reference everywhere; `triton` forces the kernels, which on CPU tensors needs
`TRITON_INTERPRET=1` set before the first call (that is how the CPU tests run them).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from zoo.kernels import reference
from zoo.kernels.reference import sort_by_expert

BACKENDS = ("auto", "reference", "triton")


@functools.cache
def triton_available() -> bool:
    """Whether the `triton` package can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def backend_for(x: torch.Tensor) -> str:
    """`"triton"` or `"reference"`: which implementation runs an op on `x`'s device.

    Raises:
        ValueError: `ZOO_KERNELS` names no backend.
        RuntimeError: `ZOO_KERNELS=triton` but triton is missing, or a CPU tensor without
            `TRITON_INTERPRET=1`.
    """
    choice = os.environ.get("ZOO_KERNELS", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"ZOO_KERNELS={choice!r}; expected one of {', '.join(BACKENDS)}")
    if choice == "auto":
        return "triton" if x.is_cuda and triton_available() else "reference"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("ZOO_KERNELS=triton but the triton package is not installed")
        interpret = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
        if not x.is_cuda and not interpret:
            raise RuntimeError(f"ZOO_KERNELS=triton on a {x.device.type} tensor needs TRITON_INTERPRET=1 (set before the first call)")
    return choice


def moe_swiglu(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """Routed SwiGLU experts; see `zoo.kernels.reference.moe_swiglu` for shapes and meaning."""
    if backend_for(x) == "triton":
        # Imported on first use: importing decorates the kernels (TRITON_INTERPRET is read then),
        # and CPU-only users never pay for importing triton.
        return importlib.import_module("zoo.kernels.triton").moe_swiglu(x, weights, indices, gate_up, down)
    return reference.moe_swiglu(x, weights, indices, gate_up, down)


def moe_glu(x, weights, indices, gate_up, down, activation: str, gate_up_bias=None, down_bias=None) -> torch.Tensor:
    """Routed gated experts of any activation (`reference.moe_glu`); bias-free SiLU ones run `moe_swiglu`
    (the Triton kernels on CUDA), every other kind the pure-PyTorch reference on any device."""
    if activation == "silu" and gate_up_bias is None and down_bias is None:
        return moe_swiglu(x, weights, indices, gate_up, down)
    from zoo.moe.activations import activation_fn

    return reference.moe_glu(x, weights, indices, gate_up, down, activation_fn(activation), gate_up_bias, down_bias)


def moe_mlp(x, weights, indices, fc1, fc2, activation: str, fc1_bias=None, fc2_bias=None) -> torch.Tensor:
    """Routed plain experts (`reference.moe_mlp`): the pure-PyTorch reference on every device (no kernel yet)."""
    from zoo.moe.activations import activation_fn

    return reference.moe_mlp(x, weights, indices, fc1, fc2, activation_fn(activation), fc1_bias, fc2_bias)


def moe_quantized(x, weights, indices, in_codes, in_scales, out_codes, out_scales, *, bits: int, gated: bool,
                  activation: str, in_bias=None, out_bias=None) -> torch.Tensor:
    """Routed weight-only quantized experts (`reference.moe_quantized` for shapes and meaning):
    `zoo.kernels.quantized` on every device, the reference under `ZOO_KERNELS=reference`."""
    from zoo.kernels import quantized
    from zoo.moe.activations import activation_fn

    choice = os.environ.get("ZOO_KERNELS", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"ZOO_KERNELS={choice!r}; expected one of {', '.join(BACKENDS)}")
    impl = reference.moe_quantized if choice == "reference" else quantized.moe_quantized
    return impl(x, weights, indices, in_codes, in_scales, out_codes, out_scales, bits=bits, gated=gated,
                activation=activation_fn(activation), in_bias=in_bias, out_bias=out_bias)


__all__ = ["BACKENDS", "backend_for", "moe_glu", "moe_mlp", "moe_quantized", "moe_swiglu", "sort_by_expert"]
