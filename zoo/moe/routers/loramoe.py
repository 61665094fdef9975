"""LoRAMoE's router: "LoRAMoE: Alleviate World Knowledge Forgetting in Large Language Models via
MoE-Style Plugin" (Dou et al., ACL 2024, arXiv 2312.09979).

Soft routing: every token goes to every expert with its softmax weight (K = E). With `groups`
the experts form typed groups (e.g. `[2, 2]`: experts 0-1 keep world knowledge, 2-3 learn the
downstream tasks) and the router adds the paper's localized balancing constraint (`lbc`,
`zoo.moe.losses.localized_balancing_loss`): per sample m and expert n the importance Q[n, m] (the
expert's summed weight over the sample's tokens), scaled by 1 + delta where the expert's group is
the sample's type and 1 - delta elsewhere, and the loss `sigma^2(Z) / mu(Z)` of the scaled
matrix Z. The sample types come from the batch (`sample_type` / `sample_id` routing context, set
by `MultimodalMoE(sample_types=)`; a stage sets them from each sample's task family). Without
them, or without `groups`, there is no loss.

Choice: `sigma^2 / mu` as the paper writes it (the authors' code divides by `mu^2`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.moe.losses import localized_balancing_loss
from zoo.moe.routers.base import ROUTERS, RouterOutput, check_range


@dataclass
class LoRAMoEOptions:
    """Options of the `loramoe` router.

    Attributes:
        groups: experts per group, in expert order (their sum must be E); None: no constraint.
        delta: the imbalance allowed between groups, in [0, 1).
    """

    groups: list[int] | None = None
    delta: float = 0.1

    def __post_init__(self) -> None:
        check_range("delta", self.delta, 0, 1, high_open=True)
        if self.groups is not None:
            self.groups = [int(g) for g in self.groups]
            if not self.groups or min(self.groups) < 1:
                raise ValueError(f"groups={self.groups!r} must list at least one group of >= 1 experts")

    def validate_for(self, num_experts: int) -> None:
        if self.groups is not None and sum(self.groups) != num_experts:
            raise ValueError(f"groups={self.groups} must add up to num_experts={num_experts}")


@ROUTERS.register("loramoe", options=LoRAMoEOptions)
class LoRAMoERouter(nn.Module):
    """Softmax over all experts; optional localized balancing over typed expert groups.

    Args:
        hidden_size: d.
        num_experts: E.
        groups, delta: see `LoRAMoEOptions`.
    """

    default_loss_coefs = {"lbc": 0.1}

    def __init__(self, hidden_size: int, num_experts: int, groups: list[int] | None = None, delta: float = 0.1) -> None:
        super().__init__()
        LoRAMoEOptions(groups, delta).validate_for(num_experts)
        self.hidden_size, self.num_experts = hidden_size, num_experts
        self.groups, self.delta = (list(groups) if groups else None), delta
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        if self.groups:
            self.register_buffer("expert_group", torch.repeat_interleave(
                torch.arange(len(self.groups)), torch.tensor(self.groups)), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, std=std)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> RouterOutput:
        """`x [T, d]` -> logits `[T, E]`, weights `[T, E]` (the softmax), indices `[T, E]` (all experts)."""
        logits = F.linear(x, self.weight)
        weights = torch.softmax(logits.float(), dim=-1)
        indices = torch.arange(self.num_experts, device=x.device).expand(x.shape[0], -1)
        return RouterOutput(logits, weights, indices)

    def aux_losses(self, output: RouterOutput, mask: torch.Tensor | None = None, context=None) -> dict[str, torch.Tensor]:
        context = context or {}
        if not self.groups or "sample_type" not in context or "sample_id" not in context:
            return {}
        return {"lbc": localized_balancing_loss(output.weights, context["sample_type"], context["sample_id"],
                                                self.expert_group, self.delta, mask)}

    def as_topk(self):
        """Soft routing is top-k with k = E and unnormalized weights (Qwen2-MoE can hold it)."""
        from zoo.moe.routers.topk import TopKRouter

        topk = TopKRouter(self.hidden_size, self.num_experts, self.num_experts, norm_topk_prob=False)
        with torch.no_grad():
            topk.weight.copy_(self.weight)
        return topk.to(self.weight.device), ""

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, groups={self.groups}, delta={self.delta}"
