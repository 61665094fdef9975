"""The router contract every router in `ROUTERS` keeps.

A router maps token states `[T, d]` to a `RouterOutput` and keeps no state between calls:

* `logits [T, R]`: raw scores over R >= E choices (R > E when a router scores choices that are not
  experts, e.g. AdaMoE's null experts);
* `weights [T, K]` and `indices [T, K]`: K slots per token; slot j sends the token to expert
  `indices[t, j]` in `[0, E)` with combine weight `weights[t, j]`, or is empty (`indices == -1`,
  weight 0). K may exceed what any token uses: a token with fewer experts leaves slots empty, and a
  token with no expert at all contributes 0 (plus any shared expert).

`forward(x [T, d], mask=None)`: `mask [T]` marks real tokens (from `zoo.moe.routing_context`);
routers that look across tokens (expert choice) must leave padding out, the others ignore it.

A router owns its aux losses: `aux_losses(output, mask, context) -> {name: scalar}`, built from
the pure functions in `zoo.moe.losses`, with `default_loss_coefs` giving each loss's weight unless
`MoEConfig.loss_coefs` overrides it; `context` holds the per-token tensors of the call (a sample's
type, ...). The model sums `coef[name] * loss` over names; nothing is global and nothing is
stashed on a module.

Trainer-driven state is never a side effect of `forward`. A router that has some implements
`schedule(step, total_steps)` (called by the trainer before each optimizer step, e.g. SMoE-Dropout's
growing k) and/or `update(inputs [T, d], output)` (called after each optimizer step with that
step's routed real tokens, no gradient, e.g. K-means centroids); its state lives in buffers, so it
is saved and restored with the weights and a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

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

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> RouterOutput: ...

    def aux_losses(self, output: RouterOutput, mask: torch.Tensor | None = None,
                   context: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]: ...

    def reset_parameters(self, std: float = 0.02) -> None: ...

    def as_topk(self) -> tuple[nn.Module | None, str]:
        """An equivalent `TopKRouter` (softmax over E, top-k, optional renormalization) and "", or
        (None, why not): what exporters to the transformers MoE classes can hold."""
        ...


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




def first_n_slots(sorted_weights: torch.Tensor, sorted_indices: torch.Tensor, n: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each token's first `n[t]` choices (of a ranking) in K slots; the rest are empty.

    Args:
        sorted_weights: `[T, R]` weights in rank order.
        sorted_indices: `[T, R]` expert ids in rank order.
        n: `[T]` how many to keep per token (<= K).
        K: slots.

    Returns:
        `(weights [T, K], indices [T, K])` with -1 / 0 in the empty slots.
    """
    keep = torch.arange(K, device=n.device)[None, :] < n[:, None]  # [T, K]
    weights = torch.where(keep, sorted_weights[:, :K], torch.zeros((), dtype=sorted_weights.dtype, device=n.device))
    indices = torch.where(keep, sorted_indices[:, :K], torch.full((), EMPTY, dtype=sorted_indices.dtype, device=n.device))
    return weights, indices


def check_range(name: str, value, low, high, *, low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    """Raise naming the option, its value and the accepted range unless `low <(=) value <(=) high`."""
    ok_type = (isinstance(value, int) and not isinstance(value, bool)) if integer else (
        isinstance(value, (int, float)) and not isinstance(value, bool))
    if ok_type:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if above and below:
            return
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    kind = "an integer" if integer else "a number"
    raise ValueError(f"{name}={value!r} must be {kind} in {left}{low}, {high}{right}")


__all__ = ["EMPTY", "ROUTERS", "Router", "RouterOutput", "check_loss_coefs", "check_range", "empty_slots_to_zero", "first_n_slots"]
