"""The calls a trainer makes for routers with trainer-driven state (the library side of them).

Routers keep no hidden state that forward changes. Some have state the trainer drives, in buffers
(saved and restored with the weights):

* `schedule(step, total_steps)`: before optimizer step `step` (SMoE-Dropout's growing k);
* `update(inputs [N, d], output)`: after the optimizer step, with the real tokens the router saw
  in that step's micro-batches and its `RouterOutput` for them, under no gradient (K-means
  centroids; DeepSeek-V3's aux-loss-free bias, from the step's expert counts).

`zoo.pipelines.train` calls `schedule_routers` and wraps its micro-batches in
`capture_router_inputs` and `zoo.moe.losses.balance_window` (the global balance loss's counts
summed over the step's micro-batches), then calls `update_routers`; any other training loop can
do the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from zoo.moe.routers.base import EMPTY, RouterOutput


def _routers(model: nn.Module) -> list[nn.Module]:
    from zoo.moe.layer import SparseMoE

    return [m.router for m in model.modules() if isinstance(m, SparseMoE)]


def schedule_routers(model: nn.Module, step: int, total_steps: int) -> None:
    """Call `schedule(step, total_steps)` on every router of `model` that has one."""
    for router in _routers(model):
        if callable(getattr(router, "schedule", None)):
            router.schedule(step, total_steps)


@contextmanager
def capture_router_inputs(model: nn.Module) -> Iterator[dict[nn.Module, list[torch.Tensor]]]:
    """Collect, per router that has `update`, the detached real tokens it routes inside the block
    (not again when activation checkpointing recomputes a forward in backward)."""
    from zoo.moe.context import recomputing

    seen = RoutedInputs()

    def hook(router, args, kwargs, output) -> None:
        if recomputing():
            return
        x = args[0] if args else kwargs["x"]
        mask = kwargs.get("mask")
        x = x.detach()
        real = mask.reshape(-1).bool() if mask is not None else None
        seen.setdefault(router, []).append(x[real] if real is not None else x)
        seen.outputs.setdefault(router, []).append(RouterOutput(*(t.detach()[real] if real is not None else t.detach()
                                                                  for t in output)))

    handles = [r.register_forward_hook(hook, with_kwargs=True) for r in _routers(model)
               if callable(getattr(r, "update", None))]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


class RoutedInputs(dict):
    """router -> the real tokens `[N_i, d]` it routed in each call; `.outputs`: router -> their
    `RouterOutput`s (real tokens only), as the forward passes decided them."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: dict[nn.Module, list[RouterOutput]] = {}


def _concat(outputs: list[RouterOutput]) -> RouterOutput | None:
    """One `RouterOutput` over several calls' tokens (slots padded with empty ones to the widest K)."""
    if not outputs:
        return None
    K = max(o.indices.shape[1] for o in outputs)
    pad = [RouterOutput(o.logits, F.pad(o.weights, (0, K - o.weights.shape[1])),
                        F.pad(o.indices, (0, K - o.indices.shape[1]), value=EMPTY)) for o in outputs]
    return RouterOutput(*(torch.cat(parts) for parts in zip(*pad)))


@torch.no_grad()
def update_routers(seen: dict[nn.Module, list[torch.Tensor]]) -> None:
    """Call `update(inputs, output)` on each router with everything `capture_router_inputs` collected
    for it (`output`: the step's routing of those tokens, None when `seen` has no record of it)."""
    outputs = getattr(seen, "outputs", {})
    for router, xs in seen.items():
        router.update(torch.cat(xs) if xs else torch.empty(0, router.hidden_size), _concat(outputs.get(router, [])))


__all__ = ["RoutedInputs", "capture_router_inputs", "schedule_routers", "update_routers"]
