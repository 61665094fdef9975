"""Activation checkpointing through decoder layers that hold MoE blocks.

`with activation_checkpointing(model):` makes every decoder layer of the model's causal LM keep
only its input in forward and recompute the rest in backward (torch's non-reentrant checkpoint,
switched on through transformers' own per-layer `gradient_checkpointing` flag, and switched back
off when the block ends).

MoE layers hand their routing out of a forward through hooks (`capture_routing`,
`capture_router_inputs`) and get their per-token context in through a hook (`routing_context`).
By the time backward recomputes a layer those hooks may be gone (the context's) or still there
(the trainer's router-input capture), so a plain checkpoint would route the recomputation without
the padding mask (an expert-choice router would pick padding and the gradients would belong to
another computation) and record some routing twice. Each checkpointed layer therefore:

- records, in its first pass, the `context` each `SparseMoE` inside it was called with;
- in its recomputation, hands the same contexts back in call order, and marks the thread as
  recomputing (`zoo.moe.context.recomputation`), which the recording hooks check to skip.

torch restores the RNG state for the recomputation, so routers that draw random numbers (jitter,
SMoE-Dropout's random partition) draw the same ones; forward and recomputation route alike.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from zoo.models.lm import MoECausalLM, decoder_layers
from zoo.moe.context import recomputation
from zoo.moe.layer import SparseMoE


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside `model` (a `MultimodalMoE`, a `MoECausalLM`, or the LM itself)."""
    lm = getattr(model, "language_model", model)
    return lm.lm if isinstance(lm, MoECausalLM) else lm


@contextmanager
def _record(moes: list[SparseMoE], seen: list) -> Iterator[None]:
    """First pass of a checkpointed layer: note the `context` of each `SparseMoE` call, in call order."""
    def hook(module, args, kwargs):
        seen.append(kwargs.get("context"))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in moes]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _replay(moes: list[SparseMoE], seen: list) -> Iterator[None]:
    """Recomputation: give each `SparseMoE` call the context its first-pass call had; mark the thread."""
    calls = iter(seen)

    def hook(module, args, kwargs):
        return args, {**kwargs, "context": next(calls)}

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in moes]
    try:
        with recomputation():
            yield
    finally:
        for h in handles:
            h.remove()


def _contexts(moes: list[SparseMoE]):
    """`checkpoint`'s `context_fn` for one call of a layer: (first-pass context, recomputation context)."""
    seen: list = []
    return _record(moes, seen), _replay(moes, seen)


@contextmanager
def activation_checkpointing(model: nn.Module) -> Iterator[int]:
    """Recompute each decoder layer's activations in backward instead of storing them, inside the block.

    Applies to layers in training mode (a frozen LM in eval mode stores its activations as before).
    The LM's KV cache is switched off inside the block (a cache would be written twice).

    Args:
        model: a `MultimodalMoE`, a `MoECausalLM`, or a transformers causal LM.

    Yields:
        The number of checkpointed layers.

    Raises:
        ValueError: the LM's decoder layers are not transformers `GradientCheckpointingLayer`s.
    """
    lm = causal_lm_of(model)
    layers = list(decoder_layers(lm))
    unsupported = sorted({type(layer).__name__ for layer in layers if not isinstance(layer, GradientCheckpointingLayer)})
    if unsupported:
        raise ValueError(f"activation checkpointing needs transformers decoder layers with a gradient_checkpointing switch; "
                         f"{unsupported} have none")
    keys = ("gradient_checkpointing", "_gradient_checkpointing_func")
    saved = [{k: layer.__dict__[k] for k in keys if k in layer.__dict__} for layer in layers]
    config = getattr(lm, "config", None)
    use_cache = getattr(config, "use_cache", None)
    for layer in layers:
        moes = [m for m in layer.modules() if isinstance(m, SparseMoE)]
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = functools.partial(
            checkpoint, use_reentrant=False, context_fn=functools.partial(_contexts, moes))
    if use_cache is not None:
        config.use_cache = False
    try:
        yield len(layers)
    finally:
        for layer, before in zip(layers, saved):
            for key in keys:
                layer.__dict__.pop(key, None)
            layer.__dict__.update(before)
        if use_cache is not None:
            config.use_cache = use_cache


__all__ = ["activation_checkpointing", "causal_lm_of"]
