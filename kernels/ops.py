"""Expert ops with device dispatch: the layer the MoE modules call.

Today every device runs the pure-PyTorch reference; GPU kernels plug in here, keyed by device,
and must match `zoo.kernels.reference` in outputs and gradients.
"""

from __future__ import annotations

import torch

from zoo.kernels import reference
from zoo.kernels.reference import sort_by_expert


def moe_swiglu(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """Routed SwiGLU experts; see `zoo.kernels.reference.moe_swiglu` for shapes and meaning."""
    return reference.moe_swiglu(x, weights, indices, gate_up, down)


__all__ = ["moe_swiglu", "sort_by_expert"]
