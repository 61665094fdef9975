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

from zoo.models.loss import IGNORE_INDEX, causal_lm_loss
from zoo.moe.capture import LayerRoutingStats, capture_routing, routing_losses
from zoo.moe.config import MoEConfig
from zoo.moe.context import routing_context
from zoo.moe.layer import MoEBlock, SparseMoE  # noqa: F401  (MoEBlock lives in the MoE core)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list: the first `ModuleList` whose every layer has an `mlp`."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(hasattr(m, "mlp") for m in module):
            return module
    raise ValueError(
        f"{type(model).__name__} has no list of decoder layers with an `mlp` attribute "
        "(expected a transformers causal LM such as Llama, Qwen2 or Mistral)"
    )


@dataclass
class MoECausalLMOutput(ModelOutput):
    """Output of `MoECausalLM.forward`.

    Attributes:
        loss: `lm_loss + aux_loss` when labels are given.
        lm_loss: next-token cross-entropy.
        aux_loss: `sum_name coef[name] * aux_losses[name]`, the weighted router losses.
        aux_losses: loss name (`balance`, `z`, ...) -> its mean over the MoE layers whose router
            produced it (unweighted).
        logits: `[B, S, V]` (None when the loss was fused with the head: `loss_chunk`).
        past_key_values: the decoder's cache, when it returned one.
        routing: per MoE layer `LayerRoutingStats` (expert load, router entropy, experts per token).
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] | None = None
    logits: torch.Tensor | None = None
    past_key_values: object | None = None
    routing: list[LayerRoutingStats] | None = None


class MoECausalLM(nn.Module):
    """A transformers causal LM whose MoE layers' router losses join its training loss.

    Args:
        lm: a transformers `*ForCausalLM` (its MLPs possibly replaced by `MoEBlock`s).
        moe: the MoE settings the LM was upcycled with (None when its MoE layers came from an
            adapter, e.g. MixLoRA on a dense LM).
        loss_coefs: weight of each router loss by name; a loss not named keeps its router's
            default weight. Default: `moe.loss_coefs`.
    """

    def __init__(self, lm: nn.Module, moe: MoEConfig | None = None, *, loss_coefs: dict[str, float] | None = None) -> None:
        super().__init__()
        self.lm = lm
        self.moe_config = moe
        self.loss_coefs = dict(loss_coefs if loss_coefs is not None else (moe.loss_coefs if moe is not None else {}))

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
        token_context: dict[str, torch.Tensor] | None = None,
        loss_chunk: int | None = None,
        **kwargs,
    ) -> MoECausalLMOutput:
        """Run the LM; with `labels`, the loss includes the weighted router losses.

        Args:
            input_ids: `[B, S]` (or pass `inputs_embeds=[B, S, d]` in kwargs).
            attention_mask: `[B, S]`, 1 for real tokens; padding is left out of the aux losses and
                of what cross-token routers (expert choice) may pick.
            labels: `[B, S]`, `IGNORE_INDEX` where no loss is taken; shifted inside transformers.
            token_context: more per-token tensors `[B, S]` for the routers (`sample_type`, ...).
            loss_chunk: with `labels`, compute the LM loss with the fused head + cross-entropy over
                chunks of this many tokens (`zoo.models.loss`): the same loss, no `[B, S, V]` logits
                (`logits` is then None). None: transformers' loss over the full logits.
            **kwargs: passed to the transformers model (`inputs_embeds`, `past_key_values`, ...).
        """
        with routing_context(self.lm, mask=attention_mask, **(token_context or {})), capture_routing(self.lm) as records:
            if loss_chunk and labels is not None:
                out = causal_lm_loss(self.lm, labels, chunk_size=loss_chunk, input_ids=input_ids,
                                     attention_mask=attention_mask, **kwargs)
            else:
                out = self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        routed = routing_losses(records, attention_mask)
        aux = routed.weighted(self.loss_coefs)
        device = (out.logits if out.logits is not None else out.loss).device
        aux = torch.zeros((), dtype=torch.float32, device=device) if aux is None else aux.to(device)
        loss = out.loss + aux if labels is not None else None
        return MoECausalLMOutput(
            loss=loss,
            lm_loss=out.loss,
            aux_loss=aux,
            aux_losses={k: v.to(device) for k, v in routed.losses.items()},
            logits=out.logits,
            past_key_values=getattr(out, "past_key_values", None),
            routing=routed.stats,
        )

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """transformers' `generate` on the wrapped LM (routing needs no loss at inference).

        The prompt's forward (prefill) gets the padding mask as routing context, so cross-token
        routers (expert choice) never pick padding; each later step routes its B new tokens alone.
        """
        with routing_context(self.lm, mask=kwargs.get("attention_mask")):
            return self.lm.generate(*args, **kwargs)
