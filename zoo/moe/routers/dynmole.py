"""DynMoLE hybrid routing: "DynMoLE: Boosting Mixture of LoRA Experts Fine-Tuning with a Hybrid
Routing Mechanism" (Li et al., 2025, arXiv 2504.00661).

The router's uncertainty about a token, the Tsallis entropy `S_q(P) = (1 - sum_i P_i^q)/(q - 1)` of
its distribution P = softmax(W x), switches its routing: a token with `S_q(P) > tau` (uncertain)
goes to every expert (soft routing); the others get top-p routing (the smallest prefix of experts
by P whose cumulative probability reaches p, as in Huang et al. 2024) with at least `keep_top_k`
experts. The chosen experts are weighted by their P, not renormalized (as in the authors'
MoE-PEFT release). Losses: the balance loss with each expert's load taken as its mean routing
weight, as in that release (`balance`), and the Tsallis-entropy loss, the mean `S_q(P)`
(`tsallis`), which lowers uncertainty and so the number of tokens routed to all experts.

Choices: the top-p prefix reaches p (`>=`), where MoE-PEFT keeps the experts strictly below p
before applying `keep_top_k`; defaults p = 0.75, keep_top_k = 1, tau = 0.9, q = 1.1 are ours (the
paper tunes them per task).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.moe.losses import _masked_mean, tsallis_entropy, tsallis_entropy_per_token
from zoo.moe.routers.base import ROUTERS, RouterOutput, check_range, first_n_slots
from zoo.moe.routers.topp import top_p_count


@dataclass
class DynMoLEOptions:
    """Options of the `dynmole` router.

    Attributes:
        p: top-p threshold for confident tokens, in (0, 1].
        keep_top_k: at least this many experts per token, >= 1.
        entropy_threshold: tau; tokens whose Tsallis entropy exceeds it use every expert, > 0.
        q: Tsallis entropic index, > 0 (1: Shannon).
    """

    p: float = 0.75
    keep_top_k: int = 1
    entropy_threshold: float = 0.9
    q: float = 1.1

    def __post_init__(self) -> None:
        check_range("p", self.p, 0, 1, low_open=True)
        check_range("keep_top_k", self.keep_top_k, 1, float("inf"), integer=True)
        check_range("entropy_threshold", self.entropy_threshold, 0, float("inf"), low_open=True, high_open=True)
        check_range("q", self.q, 0, float("inf"), low_open=True, high_open=True)

    def validate_for(self, num_experts: int) -> None:
        if self.keep_top_k > num_experts:
            raise ValueError(f"keep_top_k={self.keep_top_k} must be between 1 and num_experts={num_experts}")


@ROUTERS.register("dynmole", options=DynMoLEOptions)
class DynMoLERouter(nn.Module):
    """Tsallis-entropy switched hybrid of soft and top-p routing; K = E slots.

    Args:
        hidden_size: d.
        num_experts: E.
        p, keep_top_k, entropy_threshold, q: see `DynMoLEOptions`.
    """

    default_loss_coefs = {"balance": 0.01, "tsallis": 1e-4}

    def __init__(self, hidden_size: int, num_experts: int, p: float = 0.75, keep_top_k: int = 1,
                 entropy_threshold: float = 0.9, q: float = 1.1) -> None:
        super().__init__()
        DynMoLEOptions(p, keep_top_k, entropy_threshold, q).validate_for(num_experts)
        self.hidden_size, self.num_experts = hidden_size, num_experts
        self.p, self.keep_top_k, self.entropy_threshold, self.q = p, keep_top_k, entropy_threshold, q
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, std=std)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> RouterOutput:
        """`x [T, d]` -> logits `[T, E]`, weights / indices `[T, E]` (uncertain tokens fill all E)."""
        logits = F.linear(x, self.weight)  # [T, E]
        probs = torch.softmax(logits.float(), dim=-1)
        sorted_probs, sorted_idx = torch.sort(probs, dim=-1, descending=True, stable=True)
        n = top_p_count(sorted_probs, self.p).clamp(min=self.keep_top_k)  # [T]
        uncertain = tsallis_entropy_per_token(probs, self.q) > self.entropy_threshold
        n = torch.where(uncertain, torch.full_like(n, self.num_experts), n)
        weights, indices = first_n_slots(sorted_probs, sorted_idx, n, self.num_experts)
        return RouterOutput(logits, weights, indices)

    def aux_losses(self, output: RouterOutput, mask: torch.Tensor | None = None, context=None) -> dict[str, torch.Tensor]:
        probs = torch.softmax(output.logits.float(), dim=-1)
        load = torch.zeros_like(probs).scatter_add(1, output.indices.clamp_min(0), output.weights.float())  # [T, E]
        balance = self.num_experts * torch.sum(_masked_mean(load, mask) * _masked_mean(probs, mask))
        return {"balance": balance, "tsallis": tsallis_entropy(probs, self.q, mask)}

    def as_topk(self):
        """Not top-k: the number of experts varies per token."""
        return None, "DynMoLE routes uncertain tokens to every expert and the others top-p (no fixed top-k)"

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, p={self.p}, keep_top_k={self.keep_top_k}, "
                f"entropy_threshold={self.entropy_threshold}, q={self.q}")
