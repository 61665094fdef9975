"""Per-token routing context (the padding mask, a sample's type) handed to every MoE layer of a model.

A decoder layer calls its `mlp` with the hidden states alone, so what a router may need besides
them travels here: `routing_context(model, mask=attention_mask, sample_type=types)` registers
forward pre-hooks on every `SparseMoE` in `model` for the duration of a `with` block, and each call
whose hidden states `[B, S, d]` match a context tensor `[B, S]` receives the flattened `[T]`
tensors as `SparseMoE.forward(x, context=...)`. Nothing stays on a module after the block.

Routers read `context["mask"]` (real tokens): expert-choice routing never picks padding and the
K-means router leaves it out of its updates. `routing_losses` hands the same context to
`Router.aux_losses` (LoRAMoE's localized balancing reads `context["sample_type"]`). A call whose
shapes do not match (a KV-cached decode step of one token per sequence) gets no context.

`recomputing()` says whether this thread is re-running a checkpointed forward inside backward
(`zoo.models.checkpointing`): hooks that record what a forward did (`capture_routing`,
`capture_router_inputs`) skip such calls, which would otherwise be recorded twice.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def routing_context(model: nn.Module, **tensors: torch.Tensor | None) -> Iterator[None]:
    """Hand `tensors` (each `[B, S]`, None ones skipped) to every `SparseMoE` call in `model` inside the block."""
    from zoo.moe.layer import SparseMoE

    given = {k: v for k, v in tensors.items() if v is not None}
    if not given:
        yield
        return

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        if x is None or kwargs.get("context") is not None:
            return None
        lead = tuple(x.shape[:-1])
        ctx = {k: v.reshape(-1).to(x.device) for k, v in given.items() if tuple(v.shape) == lead}
        if not ctx:
            return None
        return args, {**kwargs, "context": ctx}

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules() if isinstance(m, SparseMoE)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


_RECOMPUTE = threading.local()


def recomputing() -> bool:
    """Whether this thread is recomputing a checkpointed forward (activation checkpointing in backward)."""
    return getattr(_RECOMPUTE, "depth", 0) > 0


@contextmanager
def recomputation() -> Iterator[None]:
    """Mark this thread as recomputing a checkpointed forward for the duration of the block."""
    _RECOMPUTE.depth = getattr(_RECOMPUTE, "depth", 0) + 1
    try:
        yield
    finally:
        _RECOMPUTE.depth -= 1


__all__ = ["recomputation", "recomputing", "routing_context"]
