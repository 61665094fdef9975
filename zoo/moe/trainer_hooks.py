"""The calls a trainer makes for routers with trainer-driven state (the library side of them).

Routers keep no hidden state that forward changes. Some have state the trainer drives, in buffers
(saved and restored with the weights):

* `schedule(step, total_steps)`: before optimizer step `step` (SMoE-Dropout's growing k);
* `update(inputs [N, d], output)`: after the optimizer step, with the real tokens the router saw
  in that step's micro-batches, under no gradient (K-means centroids).

`zoo.pipelines.train` calls `schedule_routers` and wraps its micro-batches in
`capture_router_inputs`, then calls `update_routers`; any other training loop can do the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


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
    """Collect, per router that has `update`, the detached real tokens it routes inside the block."""
    seen: dict[nn.Module, list[torch.Tensor]] = {}

    def hook(router, args, kwargs, output) -> None:
        x = args[0] if args else kwargs["x"]
        mask = kwargs.get("mask")
        x = x.detach()
        seen.setdefault(router, []).append(x[mask.reshape(-1).bool()] if mask is not None else x)

    handles = [r.register_forward_hook(hook, with_kwargs=True) for r in _routers(model)
               if callable(getattr(r, "update", None))]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def update_routers(seen: dict[nn.Module, list[torch.Tensor]]) -> None:
    """Call `update(inputs)` on each router with everything `capture_router_inputs` collected for it."""
    for router, xs in seen.items():
        router.update(torch.cat(xs) if xs else torch.empty(0, router.hidden_size))


__all__ = ["capture_router_inputs", "schedule_routers", "update_routers"]
