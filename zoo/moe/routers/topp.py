"""Top-p (dynamic) routing: "Harder Tasks Need More Experts: Dynamic Routing in MoE Models"
(Huang et al., ACL 2024, arXiv 2403.07652).

Per token: P = softmax(W x); sort the experts by P (descending; ties by lower expert id); keep the
smallest prefix whose cumulative probability reaches the threshold p, at most `max_k` experts;
the output is `sum_{i in S} P_i E_i(x)` with the raw probabilities (the paper does not
renormalize). Losses: the balance loss over the chosen sets (`balance`, paper weight 1e-2) and the
paper's dynamic loss, the entropy `-sum_i P_i log P_i` of the routing distribution (`dynamic`,
paper weight 1e-4), which keeps the router from spreading its mass to buy more experts.

Choices: "reaches" is `>=` (the official code's `>` never selects every expert at p = 1 in
floating point); `max_k` (default E) caps the slots and the compute per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.moe.losses import assignment_balancing_loss, router_entropy
from zoo.moe.routers.base import ROUTERS, RouterOutput, check_range, first_n_slots


@dataclass
class TopPOptions:
    """Options of the `topp` router.

    Attributes:
        p: cumulative probability threshold, in (0, 1].
        max_k: at most this many experts per token (None: E).
    """

    p: float = 0.4
    max_k: int | None = None

    def __post_init__(self) -> None:
        check_range("p", self.p, 0, 1, low_open=True)
        if self.max_k is not None:
            check_range("max_k", self.max_k, 1, float("inf"), integer=True)

    def validate_for(self, num_experts: int) -> None:
        if self.max_k is not None and self.max_k > num_experts:
            raise ValueError(f"max_k={self.max_k} must be between 1 and num_experts={num_experts}")


def top_p_count(probs_sorted: torch.Tensor, p: float) -> torch.Tensor:
    """`[T]` size of the smallest prefix of each row of `probs_sorted [T, E]` whose sum reaches p (E if none)."""
    cum = probs_sorted.cumsum(dim=-1)
    return ((cum < p).sum(dim=-1) + 1).clamp(max=probs_sorted.shape[-1])


@ROUTERS.register("topp", options=TopPOptions)
class TopPRouter(nn.Module):
    """Top-p routing over E experts; K = `max_k` slots, a token fills 1..K of them.

    Args:
        hidden_size: d.
        num_experts: E.
        p: cumulative probability threshold in (0, 1].
        max_k: cap on experts per token (None: E).
    """

    default_loss_coefs = {"balance": 0.01, "dynamic": 1e-4}

    def __init__(self, hidden_size: int, num_experts: int, p: float = 0.4, max_k: int | None = None) -> None:
        super().__init__()
        TopPOptions(p, max_k).validate_for(num_experts)
        self.hidden_size, self.num_experts = hidden_size, num_experts
        self.p = p
        self.max_k = max_k or num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, std=std)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> RouterOutput:
        """`x [T, d]` -> logits `[T, E]`, weights / indices `[T, max_k]` (empty slots -1)."""
        logits = F.linear(x, self.weight)  # [T, E]
        probs = torch.softmax(logits.float(), dim=-1)
        sorted_probs, sorted_idx = torch.sort(probs, dim=-1, descending=True, stable=True)
        n = top_p_count(sorted_probs, self.p).clamp(max=self.max_k)  # [T]
        weights, indices = first_n_slots(sorted_probs, sorted_idx, n, self.max_k)
        return RouterOutput(logits, weights, indices)

    def aux_losses(self, output: RouterOutput, mask: torch.Tensor | None = None, context=None) -> dict[str, torch.Tensor]:
        probs = torch.softmax(output.logits.float(), dim=-1)
        return {"balance": assignment_balancing_loss(probs, output.indices, mask),
                "dynamic": router_entropy(output.logits, mask)}

    def as_topk(self):
        """Not top-k: see `zoo.moe.routers.base.Router.as_topk`."""
        return None, "top-p routing chooses a variable number of experts per token (not a fixed top-k)"

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, p={self.p}, max_k={self.max_k}"
