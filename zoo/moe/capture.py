"""Collect the router outputs of one forward call, without state on any module.

`capture_routing(model)` registers forward hooks on every `SparseMoE` inside `model` for the
duration of a `with` block and removes them on exit; the records live in a list the caller owns.
This is how a model built from unmodified transformers decoder layers (whose MLP must return a
plain tensor) still hands its routing back with its output.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from zoo.moe.layer import SparseMoE
from zoo.moe.losses import load_balancing_loss, load_fraction, router_entropy, router_z_loss
from zoo.moe.router import RouterOutput

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


@dataclass
class RoutingRecord:
    """One MoE layer's routing in one forward call."""

    name: str  # module path, e.g. "model.layers.3.mlp.moe"
    layer: int  # decoder layer index parsed from the path, or call order if there is none
    output: RouterOutput


@dataclass
class LayerRoutingStats:
    """Per-layer routing statistics returned with a model output (detached).

    Attributes:
        layer: decoder layer index.
        load: `[E]` fraction of assignments per expert over real tokens; sums to 1.
        entropy: scalar, mean router entropy in nats (`log E` = uniform).
    """

    layer: int
    load: torch.Tensor
    entropy: torch.Tensor


@contextmanager
def capture_routing(model: nn.Module) -> Iterator[list[RoutingRecord]]:
    """Yield a list that fills with a `RoutingRecord` per `SparseMoE` call inside the block."""
    records: list[RoutingRecord] = []

    def hook_for(name: str):
        match = _LAYER_RE.search(name)

        def hook(module: nn.Module, args, output) -> None:
            layer = int(match.group(1)) if match else len(records)
            records.append(RoutingRecord(name, layer, output[1]))

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules() if isinstance(m, SparseMoE)]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def routing_losses(
    records: list[RoutingRecord], top_k: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[LayerRoutingStats]]:
    """Aux losses averaged over MoE layers, and per-layer stats.

    Args:
        records: from `capture_routing`, one per MoE layer call.
        top_k: k used for the balance loss.
        mask: optional token mask `[B, S]` (1 = real token) matching each layer's T = B*S rows;
            ignored for a layer whose row count differs.

    Returns:
        balance loss (scalar), z-loss (scalar), stats per record in call order.
    """
    if not records:
        zero = torch.zeros(())
        return zero, zero, []
    balance, z, stats = [], [], []
    for r in records:
        logits = r.output.logits
        m = mask if mask is not None and mask.numel() == logits.shape[0] else None
        balance.append(load_balancing_loss(logits, top_k, m))
        z.append(router_z_loss(logits, m))
        with torch.no_grad():
            stats.append(
                LayerRoutingStats(r.layer, load_fraction(r.output.indices, logits.shape[-1], m), router_entropy(logits, m))
            )
    return torch.stack(balance).mean(), torch.stack(z).mean(), stats
