"""A transformers causal LM whose MLPs may be sparse MoE layers, trained with aux losses.

The decoder stays the unmodified transformers model (so `generate()`, KV caches, attention
backends and PEFT keep working); MoE layers sit in the decoder layers' `mlp` slot through
`MoEBlock`, and `MoECausalLM.forward` adds the aux losses to the LM loss and returns per-layer
routing stats with the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from zoo.config import MoEConfig
from zoo.moe.capture import LayerRoutingStats, capture_routing, routing_losses
from zoo.moe.layer import SparseMoE


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list: the first `ModuleList` whose every layer has an `mlp`."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(hasattr(m, "mlp") for m in module):
            return module
    raise ValueError(
        f"{type(model).__name__} has no list of decoder layers with an `mlp` attribute "
        "(expected a transformers causal LM such as Llama, Qwen2 or Mistral)"
    )


class MoEBlock(nn.Module):
    """Fits a `SparseMoE` into a decoder layer's `mlp` slot, which must return a plain tensor.

    The router output is not lost: `capture_routing` reads it from the inner `SparseMoE` call.
    """

    def __init__(self, moe: SparseMoE) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, S, d] -> [B, S, d]`."""
        return self.moe(x)[0]


@dataclass
class MoECausalLMOutput(ModelOutput):
    """Output of `MoECausalLM.forward`.

    Attributes:
        loss: `lm_loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss` when labels are given.
        lm_loss: next-token cross-entropy.
        aux_loss: load-balancing loss, mean over MoE layers.
        z_loss: router z-loss, mean over MoE layers.
        logits: `[B, S, V]`.
        past_key_values: the decoder's cache, when it returned one.
        routing: per MoE layer `LayerRoutingStats` (expert load fractions, router entropy).
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: object | None = None
    routing: list[LayerRoutingStats] | None = None


class MoECausalLM(nn.Module):
    """A transformers causal LM plus the MoE settings its loss needs.

    Args:
        lm: a transformers `*ForCausalLM` (its MLPs possibly replaced by `MoEBlock`s).
        moe: the MoE settings (k for the balance loss, loss coefficients).
    """

    def __init__(self, lm: nn.Module, moe: MoEConfig) -> None:
        super().__init__()
        self.lm = lm
        self.moe_config = moe

    @property
    def config(self):
        """The wrapped transformers model's config."""
        return self.lm.config

    def moe_layers(self) -> dict[int, SparseMoE]:
        """Decoder layer index -> its `SparseMoE`."""
        return {i: layer.mlp.moe for i, layer in enumerate(decoder_layers(self.lm)) if isinstance(layer.mlp, MoEBlock)}

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> MoECausalLMOutput:
        """Run the LM; with `labels`, the loss includes the weighted aux losses.

        Args:
            input_ids: `[B, S]` (or pass `inputs_embeds=[B, S, d]` in kwargs).
            attention_mask: `[B, S]`, 1 for real tokens; padding is left out of the aux losses.
            labels: `[B, S]`, -100 where no loss is taken; shifted inside transformers.
            **kwargs: passed to the transformers model (`inputs_embeds`, `past_key_values`, ...).
        """
        with capture_routing(self.lm) as records:
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        aux, z, stats = routing_losses(records, self.moe_config.top_k, attention_mask)
        aux, z = aux.to(out.logits.device), z.to(out.logits.device)
        loss = None
        if labels is not None:
            loss = out.loss + self.moe_config.aux_loss_coef * aux + self.moe_config.z_loss_coef * z
        return MoECausalLMOutput(
            loss=loss,
            lm_loss=out.loss,
            aux_loss=aux,
            z_loss=z,
            logits=out.logits,
            past_key_values=getattr(out, "past_key_values", None),
            routing=stats,
        )

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """transformers' `generate` on the wrapped LM (routing needs no loss at inference)."""
        return self.lm.generate(*args, **kwargs)
