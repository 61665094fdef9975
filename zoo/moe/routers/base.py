"""The router contract every router in `ROUTERS` keeps.

A router maps token states `[T, d]` to a `RouterOutput` and keeps no state between calls:

* `logits [T, R]`: raw scores over R >= E choices (R > E when a router scores choices that are not
  experts, e.g. AdaMoE's null experts);
* `weights [T, K]` and `indices [T, K]`: K slots per token; slot j sends the token to expert
  `indices[t, j]` in `[0, E)` with combine weight `weights[t, j]`, or is empty (`indices == -1`,
  weight 0). K may exceed what any token uses: a token with fewer experts leaves slots empty, and a
  token with no expert at all contributes 0 (plus any shared expert).

A router owns its aux losses: `aux_losses(output, mask) -> {name: scalar}`, built from the pure
functions in `zoo.moe.losses`, with `default_loss_coefs` giving each loss's weight unless
`MoEConfig.loss_coefs` overrides it. The model sums `coef[name] * loss` over names; nothing is
global and nothing is stashed on a module.

Trainer-driven state (a growing k, K-means centroids) is never a side effect of `forward`: it is an
explicit call the trainer makes and checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, NamedTuple, Protocol, runtime_checkable

import torch

from zoo.registry import Registry

EMPTY = -1  # `indices` value of an empty slot


class RouterOutput(NamedTuple):
    """What a router decided for T tokens.

    Attributes:
        logits: raw router scores `[T, R]` (R >= E), in the input dtype.
        weights: combine weights `[T, K]`, float32; 0 in empty slots.
        indices: expert ids `[T, K]`, int64, in `[0, E)` or `EMPTY` (-1).
    """

    logits: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor


@runtime_checkable
class Router(Protocol):
    """What `SparseMoE`, the losses and the trainer need from a router module."""

    hidden_size: int
    num_experts: int
    default_loss_coefs: ClassVar[Mapping[str, float]]

    def __call__(self, x: torch.Tensor) -> RouterOutput: ...

    def aux_losses(self, output: RouterOutput, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]: ...

    def reset_parameters(self, std: float = 0.02) -> None: ...


ROUTERS: Registry = Registry("router", context=("hidden_size", "num_experts"))


def check_loss_coefs(router: str, coefs: Mapping[str, float]) -> None:
    """Raise naming the cause if `coefs` names a loss router `router` does not produce, or is not a number."""
    defaults = ROUTERS.get(router).default_loss_coefs
    unknown = sorted(set(coefs) - set(defaults))
    if unknown:
        raise ValueError(f"loss_coefs: router {router!r} has no loss(es) {unknown}; its losses are {sorted(defaults)}")
    for name, value in coefs.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"loss_coefs[{name!r}] must be a number >= 0, got {value!r}")


def empty_slots_to_zero(weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Weights with empty slots (indices == -1) set to exactly 0."""
    return weights.masked_fill(indices < 0, 0.0)


__all__ = ["EMPTY", "ROUTERS", "Router", "RouterOutput", "check_loss_coefs", "empty_slots_to_zero"]
