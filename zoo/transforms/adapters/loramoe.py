"""LoRAMoE (Dou et al. 2024, "LoRAMoE: Alleviate World Knowledge Forgetting in Large Language Models
via MoE-Style Plugin", arXiv 2312.09979): E LoRA experts beside each chosen frozen FFN.

`y = FFN(x) + sum_k w_k (alpha / r) B[i_k] A[i_k] x`: the experts sit on the FFN's output side and
are mixed by a router. The paper routes softly (a softmax over all experts): the default router,
`loramoe`, which also owns the paper's localized balancing constraint (`zoo.moe.routers.loramoe`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from zoo.models.lm import MoECausalLM
from zoo.transforms.adapters.lora import init_lora_a
from zoo.transforms.adapters.lora_experts import LoRAExpertOptions, insert_lora_experts, merge_attention_lora
from zoo.transforms.adapters.registry import ADAPTERS


class LoRAMoEExperts(nn.Module):
    """E LoRA experts beside one frozen dense FFN, on its output side (LoRAMoE).

    `y = base(x) + sum_k w_k (alpha / r) B[i_k] A[i_k] x`; with a soft router (k = E, weights the
    full softmax) every expert contributes to every token.

    Args:
        base: the frozen dense MLP `[T, d] -> [T, d]` (any MLP; no gated structure is needed).
        hidden_size: d.
        num_experts: E.
        r: LoRA rank.
        alpha: LoRA scaling numerator.
        dropout: dropout on the LoRA input.

    Parameters:
        lora_A: `[E, r, d]`; lora_B: `[E, d, r]` (zeros).
    """

    def __init__(
        self, base: nn.Module, hidden_size: int, num_experts: int, r: int, alpha: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRAMoEExperts: rank r must be >= 1, got {r}")
        self.base = base
        self.num_experts = num_experts
        self.r = r
        self.scaling = alpha / r
        ref = next(base.parameters())
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, hidden_size, device=ref.device, dtype=ref.dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, hidden_size, r, device=ref.device, dtype=ref.dtype))
        init_lora_a(self.lora_A.data)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """`x [T, d]`, `weights [T, K]`, `indices [T, K]` (-1: empty slot) -> `[T, d]`."""
        gates = torch.zeros(x.shape[0], self.num_experts + 1, device=x.device, dtype=weights.dtype)
        slots = torch.where(indices < 0, self.num_experts, indices)  # empty slots -> a dropped column
        gates = gates.scatter_add(1, slots, weights)[:, : self.num_experts]  # [T, E]
        low = torch.einsum("td,erd->ter", self.dropout(x), self.lora_A)  # [T, E, r]
        delta = torch.einsum("ter,edr->ted", low, self.lora_B) * self.scaling  # [T, E, d]
        return self.base(x) + torch.einsum("ted,te->td", delta, gates.to(delta.dtype))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, r={self.r}, scaling={self.scaling}"


@dataclass
class LoRAMoEOptions(LoRAExpertOptions):
    """LoRAMoE's options (see `LoRAExpertOptions`).

    The default router is `loramoe`, the paper's soft router (every expert, softmax weights); give
    it `router_options: {groups: [n_knowledge, n_task], delta: 0.1}` for the localized balancing
    constraint (with the stage's `sample_types`). Attention LoRA is off by default (the paper
    adapts the FFNs only).
    """

    router: str = "loramoe"
    router_options: dict[str, Any] = field(default_factory=dict)
    attention_lora: bool = False


def apply_loramoe(model: nn.Module, **options) -> MoECausalLM:
    """LoRAMoE: E LoRA experts beside each chosen frozen FFN, softly routed by default.

    Args:
        model: a transformers causal LM (changed in place) or an `MoECausalLM`.
        **options: `LoRAMoEOptions` fields (`num_experts`, `r`, `alpha`, `layers`, `attention_lora`, ...).

    Returns:
        An `MoECausalLM`; equal to the input model at initialization (LoRA B is zero).
    """
    return LoRAMoE(**options).apply(model)


@ADAPTERS.register("loramoe", options=LoRAMoEOptions, example={"num_experts": 2, "r": 4, "alpha": 8})
class LoRAMoE:
    """The `loramoe` adapter: `apply` adds the experts; `merge` folds the attention LoRA, if any."""

    preserves_output = True  # LoRA B starts at zero

    def __init__(self, **options) -> None:
        self.options = LoRAMoEOptions(**options)

    def apply(self, language_model: nn.Module) -> MoECausalLM:
        o = self.options
        return insert_lora_experts(
            language_model, o, lambda mlp, d: LoRAMoEExperts(mlp, d, o.num_experts, o.r, o.alpha, o.dropout), "loramoe")

    def merge(self, language_model: nn.Module) -> tuple[nn.Module, dict]:
        return merge_attention_lora(language_model, self.options)


__all__ = ["LoRAMoE", "LoRAMoEExperts", "LoRAMoEOptions", "apply_loramoe"]
