"""`MoEBlock`: a `SparseMoE` in a decoder layer's `mlp` slot (a module of its own, importing nothing
of the zoo, so the dense-FFN inspector can recognize it without an import cycle)."""

from __future__ import annotations

import torch
from torch import nn


class MoEBlock(nn.Module):
    """Fits a `SparseMoE` into a decoder layer's `mlp` slot, which must return a plain tensor.

    The router output is not lost: `capture_routing` reads it from the inner `SparseMoE` call.
    """

    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, S, d] -> [B, S, d]`."""
        return self.moe(x)[0]


__all__ = ["MoEBlock"]
