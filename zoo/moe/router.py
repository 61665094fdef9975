"""Routers: map token states to expert choices. They keep no state between calls.

Every router returns a `RouterOutput`; losses and routing statistics are pure functions of it
(`zoo.moe.losses`), so nothing is stashed on the module for a later reader.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class RouterOutput(NamedTuple):
    """What a router decided for T tokens over E experts.

    Attributes:
        logits: raw router scores, `[T, E]`, in the input dtype.
        weights: combine weights of the chosen experts, `[T, k]`, float32.
        indices: chosen expert ids, `[T, k]`, int64.
    """

    logits: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor


class TopKRouter(nn.Module):
    """Softmax over all experts, then top-k (Mixtral and Qwen2-MoE conventions).

    Mixtral renormalizes the k chosen probabilities to sum to 1 (`norm_topk_prob=True`);
    Qwen2-MoE does so only if its config asks. The softmax runs in float32 as in transformers.

    Args:
        hidden_size: token state size d.
        num_experts: E.
        top_k: k, 1 <= k <= E.
        norm_topk_prob: renormalize the k chosen probabilities.
        jitter_noise: in training, multiply inputs by U(1 - eps, 1 + eps) noise (Mixtral).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        norm_topk_prob: bool = True,
        jitter_noise: float = 0.0,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"TopKRouter: top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.jitter_noise = jitter_noise
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Route tokens.

        Args:
            x: token states `[T, d]`.

        Returns:
            RouterOutput with logits `[T, E]`, weights `[T, k]` (float32), indices `[T, k]`.
        """
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        logits = F.linear(x, self.weight)  # [T, E]
        probs = torch.softmax(logits.float(), dim=-1)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return RouterOutput(logits, weights, indices)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"norm_topk_prob={self.norm_topk_prob}, jitter_noise={self.jitter_noise}"
        )


ROUTERS: dict[str, type[nn.Module]] = {"topk": TopKRouter}


def build_router(name: str, hidden_size: int, num_experts: int, top_k: int, **kwargs) -> nn.Module:
    """Build a registered router by name; an unknown name lists the registered ones."""
    try:
        cls = ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; registered routers: {sorted(ROUTERS)}") from None
    return cls(hidden_size, num_experts, top_k, **kwargs)
