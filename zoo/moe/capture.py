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
from dataclasses import dataclass, field

import torch
from torch import nn

from zoo.moe.context import recomputing
from zoo.moe.layer import SparseMoE
from zoo.moe.losses import experts_per_token, load_fraction, max_violation, router_entropy
from zoo.moe.routers import RouterOutput

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|blocks|resblocks|h)\.(\d+)(?:\.|$)")  # decoders, ViTs, GPT-2


@dataclass
class RoutingRecord:
    """One MoE layer's routing in one forward call.

    Attributes:
        name: module path, e.g. "model.layers.3.mlp.moe".
        layer: block index parsed from the path (`layers.3`, timm `blocks.3`, open_clip `resblocks.3`,
            GPT-2 `h.3`), or call order if there is none.
        output: the router's decision.
        router: the router module that made it (its `aux_losses` turns `output` into losses).
        context: the call's per-token tensors `[T]` (`mask`, ...), from `zoo.moe.routing_context`;
            `sample_id` (the sequence of each token, row-major in `[B, S, d]`) is added when the
            call's input is `[..., S, d]` and the context has none (the sequence-level balance loss).
    """

    name: str
    layer: int
    output: RouterOutput
    router: nn.Module
    context: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return self.router.num_experts


@dataclass
class LayerRoutingStats:
    """Per-layer routing statistics returned with a model output (detached).

    Attributes:
        layer: decoder layer index.
        load: `[E]` fraction of filled assignments per expert over real tokens; sums to 1.
        entropy: scalar, mean router entropy in nats (`log R` = uniform over the R choices).
        experts_per_token: scalar, mean number of experts computed per real token.
        flops_saved: scalar, the fraction of the router's K slots left empty, i.e. the expert FLOPs
            saved against filling every slot (for null experts: against plain top-k).
        max_vio: scalar, MaxVio = max load / mean load - 1 (DeepSeek's imbalance measure;
            `zoo.moe.losses.max_violation`), 0 when balanced.
    """

    layer: int
    load: torch.Tensor
    entropy: torch.Tensor
    experts_per_token: torch.Tensor
    flops_saved: torch.Tensor
    max_vio: torch.Tensor | None = None


@contextmanager
def capture_routing(model: nn.Module) -> Iterator[list[RoutingRecord]]:
    """Yield a list that fills with a `RoutingRecord` per `SparseMoE` call inside the block.

    A call that recomputes a checkpointed forward in backward (`zoo.moe.context.recomputing`) is
    not recorded: the first pass was.
    """
    records: list[RoutingRecord] = []

    def hook_for(name: str):
        match = _LAYER_RE.search(name)

        def hook(module: nn.Module, args, kwargs, output) -> None:
            if recomputing():
                return
            layer = int(match.group(1)) if match else len(records)
            context = dict(kwargs.get("context") or {})
            x = args[0] if args else kwargs.get("x")
            if "sample_id" not in context and x is not None and x.dim() >= 3:  # [B, S, d]: token t's sequence
                context["sample_id"] = torch.arange(x.shape[:-2].numel(), device=x.device).repeat_interleave(x.shape[-2])
            records.append(RoutingRecord(name, layer, output[1], module.router, context))

        return hook

    handles = [m.register_forward_hook(hook_for(n), with_kwargs=True) for n, m in model.named_modules()
               if isinstance(m, SparseMoE)]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


@dataclass
class RoutingLosses:
    """What `routing_losses` computed over one forward call's MoE layers.

    Attributes:
        losses: loss name -> mean over the layers whose router produced it (unweighted).
        default_coefs: loss name -> the producing routers' default weight.
        stats: per-layer statistics, in call order.
    """

    losses: dict[str, torch.Tensor]
    default_coefs: dict[str, float]
    stats: list[LayerRoutingStats]

    def weighted(self, coefs: dict[str, float] | None = None) -> torch.Tensor | None:
        """`sum_name coef[name] * losses[name]` (coefs override the defaults); None if no layer routed."""
        if not self.losses:
            return None
        coefs = {**self.default_coefs, **(coefs or {})}
        return sum(coefs[name] * value for name, value in self.losses.items())


def routing_losses(records: list[RoutingRecord], mask: torch.Tensor | None = None) -> RoutingLosses:
    """Each router's aux losses averaged over MoE layers, and per-layer stats.

    Args:
        records: from `capture_routing`, one per MoE layer call.
        mask: optional token mask `[B, S]` (1 = real token) for records that carry no
            `context["mask"]`, used where it matches a layer's T = B*S rows.

    Returns:
        `RoutingLosses`.
    """
    per_name: dict[str, list[torch.Tensor]] = {}
    defaults: dict[str, float] = {}
    stats = []
    for r in records:
        logits = r.output.logits
        m = r.context.get("mask")
        if m is None and mask is not None and mask.numel() == logits.shape[0]:
            m = mask
        for name, value in r.router.aux_losses(r.output, m, r.context).items():
            per_name.setdefault(name, []).append(value)
            defaults.setdefault(name, r.router.default_loss_coefs[name])
        with torch.no_grad():
            per_token = experts_per_token(r.output.indices, m)
            slots = max(r.output.indices.shape[1], 1)
            load = load_fraction(r.output.indices, r.num_experts, m)
            stats.append(LayerRoutingStats(
                r.layer, load, router_entropy(logits, m), per_token, 1.0 - per_token / slots, max_violation(load),
            ))
    losses = {name: torch.stack(values).mean() for name, values in per_name.items()}
    return RoutingLosses(losses, defaults, stats)
