"""Shared machinery of the LoRA-expert adapters (MixLoRA, LoRAMoE): put routed LoRA experts in FFNs.

Hand-written rather than through PEFT because PEFT has no LoRA *experts with routing*: it adapts
each linear with one (or a fixed set of) adapters but cannot pick an adapter per token with a
router, add a balance loss, or share one frozen FFN among E LoRA experts.

The routed FFN is a `zoo.moe.SparseMoE` (any `ROUTERS` entry and an experts module with the usual
`(x, weights, indices)` call) in a `zoo.models.MoEBlock`, so `capture_routing` records it like any
MoE layer and `MoECausalLM` adds its router's losses to the training loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from zoo.models.lm import MoEBlock, MoECausalLM, decoder_layers
from zoo.models.mlp import gated_mlp
from zoo.moe.config import layer_indices
from zoo.moe.layer import SparseMoE
from zoo.moe.routers import ROUTERS, check_loss_coefs
from zoo.transforms.adapters.lora import ATTENTION_TARGETS, add_attention_lora, merge_lora


@dataclass
class LoRAExpertOptions:
    """Options every LoRA-expert adapter has.

    Attributes:
        num_experts: E LoRA experts per FFN.
        r: LoRA rank (experts and attention).
        alpha: LoRA scaling numerator (`alpha / r`).
        dropout: LoRA dropout.
        router: the `ROUTERS` entry that picks the experts.
        router_options: its options.
        loss_coefs: weights of the router's losses (when the adapter wraps a dense LM; an
            `MoECausalLM` keeps its own).
        layers: decoder layers that get LoRA experts: "dense" (every layer whose mlp is still a
            dense FFN), one of `zoo.moe.LAYER_PATTERNS`, or explicit indices.
        attention_lora: also add plain LoRA to the attention projections of every decoder layer.
        target_modules: attribute names of the attention projections to adapt.
    """

    num_experts: int = 4
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    router: str = "topk"
    router_options: dict[str, Any] = field(default_factory=lambda: {"top_k": 2})
    loss_coefs: dict[str, float] = field(default_factory=dict)
    layers: str | list[int] = "dense"
    attention_lora: bool = True
    target_modules: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.r < 1:
            raise ValueError(f"rank r must be >= 1, got {self.r}")
        opts = ROUTERS.options(self.router, self.router_options)
        if hasattr(opts, "validate_for"):
            opts.validate_for(self.num_experts)
        check_loss_coefs(self.router, self.loss_coefs)
        if not isinstance(self.layers, str):
            self.layers = [int(i) for i in self.layers]
        self.target_modules = list(self.target_modules)


def insert_lora_experts(
    model: nn.Module, opts: LoRAExpertOptions, make_experts: Callable[[nn.Module, int], nn.Module], who: str
) -> MoECausalLM:
    """Freeze `model`, optionally add attention LoRA, and route LoRA experts inside the chosen FFNs.

    Args:
        model: a transformers causal LM (changed in place) or an `MoECausalLM`.
        opts: the adapter's options.
        make_experts: `(dense mlp, hidden size) -> experts module` taking `(x, weights, indices)`.
        who: the adapter's name for errors.

    Returns:
        The model as an `MoECausalLM` (the same object if one was given).
    """
    wrapped = isinstance(model, MoECausalLM)
    lm = model.lm if wrapped else model
    decoder = decoder_layers(lm)
    if opts.layers == "dense":
        indices = [i for i, layer in enumerate(decoder) if not isinstance(layer.mlp, MoEBlock)]
    else:
        indices = layer_indices(opts.layers, len(decoder), who)
    if not indices and not opts.attention_lora:
        raise ValueError(f"{who}: layers={opts.layers!r} selects no decoder layer and attention_lora is off: nothing to adapt")
    for i in indices:
        gated_mlp(decoder[i].mlp, f"{who}: layer {i}'s mlp")
    for p in lm.parameters():  # everything that exists now is base weight
        p.requires_grad_(False)
    if opts.attention_lora:
        add_attention_lora(decoder, opts.target_modules, opts.r, opts.alpha, opts.dropout, who)
    std = getattr(getattr(lm, "config", None), "initializer_range", 0.02)
    for i in indices:
        mlp = decoder[i].mlp
        ref = mlp.gate_proj.weight
        d = mlp.down_proj.out_features
        router = ROUTERS.build(opts.router, opts.router_options, hidden_size=d, num_experts=opts.num_experts)
        router.reset_parameters(std)
        moe = SparseMoE(router=router.to(device=ref.device, dtype=ref.dtype), experts=make_experts(mlp, d))
        decoder[i].mlp = MoEBlock(moe)
    if wrapped:
        return model
    return MoECausalLM(lm, None, loss_coefs=opts.loss_coefs)


def merge_attention_lora(language_model: nn.Module, opts: LoRAExpertOptions) -> tuple[nn.Module, dict]:
    """After training: merge the attention LoRA into its linears; the LoRA experts stay modules.

    Returns:
        `(language_model, remaining options)`: the options with `attention_lora` off, which is what
        `apply` must add to a fresh base model to rebuild the merged one.
    """
    from zoo.config import to_plain

    if opts.attention_lora:
        merge_lora(language_model, unload=True)
    remaining = to_plain(opts)
    remaining["attention_lora"] = False
    return language_model, remaining



__all__ = ["LoRAExpertOptions", "insert_lora_experts", "merge_attention_lora"]
