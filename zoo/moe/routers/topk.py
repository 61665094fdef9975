"""Top-k softmax routing (Mixtral and Qwen2-MoE conventions).

Shazeer et al. 2017 ("Outrageously Large Neural Networks"), as used by Mixtral (Jiang et al. 2024)
and Qwen2-MoE: softmax over all experts in float32, keep the k largest, and (Mixtral) renormalize
them to sum to 1. Matches transformers' `MixtralSparseMoeBlock` / `Qwen2MoeSparseMoeBlock` router
exactly (outputs, logits, gradients; tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.moe.losses import BALANCE_LEVELS, balancing_loss, load_balancing_loss, router_z_loss
from zoo.moe.routers.base import ROUTERS, RouterOutput
from zoo.moe.routers.capacity import apply_capacity, check_capacity_options


@dataclass
class TopKOptions:
    """Options of the `topk` router.

    Attributes:
        top_k: k, experts per token (1 <= k <= E).
        norm_topk_prob: renormalize the k chosen probabilities (Mixtral: True; Qwen2-MoE: optional).
            Upcycling reproduces the dense model at init only when True.
        jitter_noise: in training, multiply router inputs by U(1 - eps, 1 + eps) (Mixtral).
        balance_level: where the `balance` loss counts load: `micro_batch` (Switch/Mixtral, over the
            softmax top-k), `sequence` (per sequence, DeepSeek-V3) or `global` (over data-parallel
            ranks); the last two count the experts actually chosen (after any drop).
        capacity_factor, eval_capacity_factor, drop_policy: expert capacity with token dropping in
            training / eval (None: dropless), see `zoo.moe.routers.capacity`.
    """

    top_k: int = 2
    norm_topk_prob: bool = True
    jitter_noise: float = 0.0
    balance_level: str = "micro_batch"
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    drop_policy: str = "probs"

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 1")
        if not self.jitter_noise >= 0:
            raise ValueError(f"jitter_noise={self.jitter_noise!r} must be >= 0")
        if self.balance_level not in BALANCE_LEVELS:
            raise ValueError(f"balance_level={self.balance_level!r} must be one of {BALANCE_LEVELS}")
        check_capacity_options(self.capacity_factor, self.eval_capacity_factor, self.drop_policy)

    def validate_for(self, num_experts: int) -> None:
        if self.top_k > num_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and num_experts={num_experts}")


@ROUTERS.register("topk", options=TopKOptions)
class TopKRouter(nn.Module):
    """Softmax over all experts, then top-k.

    Args:
        hidden_size: token state size d.
        num_experts: E.
        top_k: k, 1 <= k <= E.
        norm_topk_prob: renormalize the k chosen probabilities.
        jitter_noise: in training, multiply inputs by U(1 - eps, 1 + eps) noise (Mixtral).

    Losses: `balance` (Switch/Mixtral load balancing over the top-k choices, default weight 0.01) and
    `z` (ST-MoE router z-loss, default weight 0).
    """

    default_loss_coefs = {"balance": 0.01, "z": 0.0}

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        *,
        norm_topk_prob: bool = True,
        jitter_noise: float = 0.0,
        balance_level: str = "micro_batch",
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        drop_policy: str = "probs",
    ) -> None:
        super().__init__()
        TopKOptions(top_k, norm_topk_prob, jitter_noise, balance_level, capacity_factor, eval_capacity_factor,
                    drop_policy).validate_for(num_experts)
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.jitter_noise = jitter_noise
        self.balance_level = balance_level
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.drop_policy = drop_policy
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Router weights ~ N(0, std^2) (upcycling passes the LM's `initializer_range`)."""
        nn.init.normal_(self.weight, std=std)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> RouterOutput:
        """Route tokens (each on its own: `mask` changes nothing).

        Args:
            x: token states `[T, d]`.
            mask: `[T]` real tokens (unused).

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
        weights, indices = apply_capacity(self, weights, indices, mask, self.top_k)  # dropped: empty slots
        return RouterOutput(logits, weights, indices)

    def aux_losses(self, output: RouterOutput, mask: torch.Tensor | None = None, context=None) -> dict[str, torch.Tensor]:
        """`balance` (over this router's k, at `balance_level`) and `z`, pure functions of `output`."""
        if self.balance_level == "micro_batch":
            balance = load_balancing_loss(output.logits, self.top_k, mask)
        else:
            balance = balancing_loss(torch.softmax(output.logits.float(), dim=-1), output.indices, mask,
                                     level=self.balance_level, sample_id=(context or {}).get("sample_id"),
                                     key=self)
        return {"balance": balance, "z": router_z_loss(output.logits, mask)}

    def as_topk(self) -> tuple[TopKRouter | None, str]:
        """This router is top-k routing (for exporters that hold only top-k softmax routers), unless
        it drops tokens at inference (`eval_capacity_factor`), which no HF MoE class does."""
        if self.eval_capacity_factor is not None:
            return None, f"it drops tokens over capacity at inference (eval_capacity_factor={self.eval_capacity_factor})"
        return self, ""

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"norm_topk_prob={self.norm_topk_prob}, jitter_noise={self.jitter_noise}"
            + (f", balance_level={self.balance_level}" if self.balance_level != "micro_batch" else "")
            + (f", capacity_factor={self.capacity_factor}, eval_capacity_factor={self.eval_capacity_factor}, "
               f"drop_policy={self.drop_policy}" if self.capacity_factor or self.eval_capacity_factor else "")
        )
