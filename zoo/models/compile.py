"""Regional `torch.compile` of a causal LM's decoder layers, for the duration of a `with` block.

On CPU a decoder layer's time outside its GEMMs goes to small elementwise kernels: RMSNorm in fp32
(cast, square, mean, rsqrt, scale, cast back), rotary embeddings (neg, cat, two multiplies, add),
SiLU·up, each a pass over memory, forward and backward. Inductor fuses them into a few C++ loops.

`compiled_layers(model)` compiles each decoder layer's attention, norms and dense MLP as separate
regions (identical layers share one compiled graph: compile time is one layer's, not thirty);
`MoEBlock`s stay eager (data-dependent routing; their capture hooks), and activation checkpointing
wraps the layer outside the compiled regions. The first step pays the compile (a C++ compiler must
be installed; inductor caches the result on disk for the next process).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from zoo.models.checkpointing import causal_lm_of
from zoo.models.lm import MoEBlock, decoder_layers


@contextmanager
def compiled_layers(model: nn.Module, **compile_options) -> Iterator[list[nn.Module]]:
    """Inside the block, each decoder layer's non-MoE children run compiled (`nn.Module.compile`).

    Args:
        model: a `MultimodalMoE`, a `MoECausalLM`, or a transformers causal LM.
        **compile_options: passed to `torch.compile` (`mode`, `dynamic`, ...).

    Yields:
        The compiled modules.
    """
    regions = [module for layer in decoder_layers(causal_lm_of(model)) for module in layer.children()
               if not isinstance(module, MoEBlock) and any(True for _ in module.parameters())]
    before = [module.__dict__.get("_compiled_call_impl") for module in regions]
    for module in regions:
        module.compile(**compile_options)
    try:
        yield regions
    finally:
        for module, impl in zip(regions, before):
            module._compiled_call_impl = impl  # nn.Module.compile's slot: back to eager


__all__ = ["compiled_layers"]
