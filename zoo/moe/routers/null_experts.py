"""Null experts: "AdaMoE: Token-Adaptive Routing with Null Experts for Mixture-of-Experts Language
Models" (Zeng et al., EMNLP Findings 2024, arXiv 2406.13233).

N null experts that compute nothing join the E true experts as routing choices: the router scores
R = E + N choices, each token takes its top-k of them, and a null choice is an empty slot (no
compute), so a token uses 0..k true experts. As in the paper's release, the weights of the chosen
true experts are renormalized to sum to 1 among themselves (a token whose k choices are all null
gets 0 from the routed experts). The balance loss runs over all E + N choices with the null
experts treated as one group: each null expert's load is the mean load of the null experts, so
the loss balances the true experts and the total share of null choices, not the null experts
among themselves (identical zero functions). With N = 0 this is the `topk` router.

The per-layer stats report experts per token; the expert FLOPs saved against top-k are
`1 - experts_per_token / k` (`LayerRoutingStats.flops_saved`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.moe.losses import _masked_mean, router_z_loss
from zoo.moe.routers.base import EMPTY, ROUTERS, RouterOutput, check_range


@dataclass
class NullExpertsOptions:
    """Options of the `null_experts` router.

    Attributes:
        top_k: choices per token among the E + N (true or null).
        num_null: N null experts, >= 0.
    """

    top_k: int = 2
    num_null: int = 2

    def __post_init__(self) -> None:
        check_range("top_k", self.top_k, 1, float("inf"), integer=True)
        check_range("num_null", self.num_null, 0, float("inf"), integer=True)

    def validate_for(self, num_experts: int) -> None:
        if self.top_k > num_experts + self.num_null:
            raise ValueError(f"top_k={self.top_k} must be between 1 and num_experts + num_null={num_experts + self.num_null}")


def null_aware_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor, num_experts: int,
                              mask: torch.Tensor | None = None) -> torch.Tensor:
    """AdaMoE balance loss: `(E + N) * sum_j f_j P_j` over the R = E + N choices, null loads averaged.

    Args:
        probs: `[T, R]` probabilities over true then null experts.
        chosen: `[T, k]` chosen choice ids in `[0, R)` (null ones included).
        num_experts: E (choices >= E are null).
        mask: optional token mask with T elements.
    """
    num_choices = probs.shape[-1]
    one_hot = F.one_hot(chosen, num_choices).float().sum(dim=1)  # [T, R]
    f = _masked_mean(one_hot, mask)  # [R], sums to k
    if num_choices > num_experts:
        f = torch.cat([f[:num_experts], f[num_experts:].mean().expand(num_choices - num_experts)])
    return num_choices * torch.sum(f * _masked_mean(probs.float(), mask))


@ROUTERS.register("null_experts", options=NullExpertsOptions)
class NullExpertsRouter(nn.Module):
    """Top-k over E true + N null experts; null choices are empty slots.

    Args:
        hidden_size: d.
        num_experts: E true experts.
        top_k: choices per token.
        num_null: N null experts.
    """

    default_loss_coefs = {"balance": 0.01, "z": 0.0}

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 2, num_null: int = 2) -> None:
        super().__init__()
        NullExpertsOptions(top_k, num_null).validate_for(num_experts)
        self.hidden_size, self.num_experts = hidden_size, num_experts
        self.top_k, self.num_null = top_k, num_null
        self.weight = nn.Parameter(torch.empty(num_experts + num_null, hidden_size))  # true rows, then null rows
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, std=std)

    def _choose(self, logits: torch.Tensor):
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E + N]
        top, chosen = torch.sort(probs, dim=-1, descending=True, stable=True)
        return probs, top[:, : self.top_k], chosen[:, : self.top_k]  # [T, k] each

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> RouterOutput:
        """`x [T, d]` -> logits `[T, E + N]`, weights / indices `[T, k]` (null choices: -1, weight 0)."""
        logits = F.linear(x, self.weight)  # [T, E + N]
        _, top, chosen = self._choose(logits)
        true = chosen < self.num_experts
        w = top * true
        total = w.sum(dim=-1, keepdim=True)
        weights = w / torch.where(total > 0, total, torch.ones_like(total))
        indices = torch.where(true, chosen, torch.full_like(chosen, EMPTY))
        return RouterOutput(logits, weights, indices)

    def aux_losses(self, output: RouterOutput, mask: torch.Tensor | None = None, context=None) -> dict[str, torch.Tensor]:
        probs, _, chosen = self._choose(output.logits)
        return {"balance": null_aware_balancing_loss(probs, chosen, self.num_experts, mask),
                "z": router_z_loss(output.logits, mask)}

    def as_topk(self):
        """With no null expert this is top-k with renormalized weights; otherwise it is not."""
        if self.num_null:
            return None, (f"{self.num_null} null experts let a token use fewer than top_k={self.top_k} experts "
                          "(no fixed top-k)")
        from zoo.moe.routers.topk import TopKRouter

        topk = TopKRouter(self.hidden_size, self.num_experts, self.top_k, norm_topk_prob=True)
        with torch.no_grad():
            topk.weight.copy_(self.weight)
        return topk.to(self.weight.device), ""

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, num_null={self.num_null}"
