"""SMoE-Dropout: "Sparse MoE as the New Dropout: Scaling Dense and Self-Slimmable Transformers"
(Chen et al., ICLR 2023, arXiv 2303.01610).

The router is a randomly initialized projection that never trains (a buffer, so it is saved and
bit-identical after training), and the number of activated experts k grows during training, from
`k_min` to `k_max` (default E: at the end every expert is active). Each token takes the top-k of
the fixed projection's logits, weighted by the softmax over those k (the renormalized top-k).
After training any k can be used ("self-slimmable"): fewer experts, less compute.

k is trainer-driven state, never a side effect of forward: the trainer calls `schedule(step,
total_steps)` before each optimizer step (k = k_min + floor((k_max - k_min + 1) * step / total),
linear in the step, k_max for the last steps), and `set_active_k(k)` picks k at inference. k lives
in a buffer, so checkpoints carry it and a resumed run continues with the same k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.moe.routers.base import ROUTERS, RouterOutput, check_range

SCHEDULES = ("linear",)


@dataclass
class SMoEDropoutOptions:
    """Options of the `smoe_dropout` router.

    Attributes:
        k_min: experts per token at the first step, >= 1.
        k_max: experts per token at the end (None: E), >= k_min.
        schedule: how k grows with the step ("linear").
    """

    k_min: int = 1
    k_max: int | None = None
    schedule: str = "linear"

    def __post_init__(self) -> None:
        check_range("k_min", self.k_min, 1, float("inf"), integer=True)
        if self.k_max is not None:
            check_range("k_max", self.k_max, 1, float("inf"), integer=True)
            if self.k_min > self.k_max:
                raise ValueError(f"k_min={self.k_min} must be <= k_max={self.k_max}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not one of {SCHEDULES}")

    def validate_for(self, num_experts: int) -> None:
        k_max = self.k_max if self.k_max is not None else num_experts
        if k_max > num_experts or self.k_min > k_max:
            raise ValueError(f"k_min={self.k_min} <= k_max={k_max} must hold with k_max <= num_experts={num_experts}")


@ROUTERS.register("smoe_dropout", options=SMoEDropoutOptions)
class SMoEDropoutRouter(nn.Module):
    """A fixed random router with a trainer-scheduled k; K = the active k.

    Args:
        hidden_size: d.
        num_experts: E.
        k_min, k_max, schedule: see `SMoEDropoutOptions`.

    Buffers:
        projection: `[E, d]` the fixed random router (never trained).
        active_k: the k in use (starts at k_max, the inference default; the trainer schedules it).
    """

    default_loss_coefs: dict[str, float] = {}  # a fixed router has nothing to balance

    def __init__(self, hidden_size: int, num_experts: int, k_min: int = 1, k_max: int | None = None,
                 schedule: str = "linear") -> None:
        super().__init__()
        SMoEDropoutOptions(k_min, k_max, schedule).validate_for(num_experts)
        self.hidden_size, self.num_experts = hidden_size, num_experts
        self.k_min, self.k_max, self.schedule_name = k_min, k_max or num_experts, schedule
        self.register_buffer("projection", torch.empty(num_experts, hidden_size))
        self.register_buffer("active_k", torch.tensor(self.k_max, dtype=torch.long))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.projection, std=std)

    def k_at(self, step: int, total_steps: int) -> int:
        """The scheduled k at optimizer step `step` of `total_steps`."""
        span = self.k_max - self.k_min + 1
        return min(self.k_max, self.k_min + (span * step) // max(total_steps, 1))

    @torch.no_grad()
    def schedule(self, step: int, total_steps: int) -> None:
        """Trainer hook: set k for optimizer step `step` (0-based) of `total_steps`."""
        self.active_k.fill_(self.k_at(step, total_steps))

    @torch.no_grad()
    def set_active_k(self, k: int) -> None:
        """Use k experts per token from now on (inference: self-slimming), 1 <= k <= E."""
        check_range("k", k, 1, self.num_experts, integer=True)
        self.active_k.fill_(k)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> RouterOutput:
        """`x [T, d]` -> logits `[T, E]`, weights / indices `[T, k]`."""
        logits = F.linear(x, self.projection.to(x.dtype))  # [T, E], no gradient to the router
        top, indices = torch.topk(logits.float(), int(self.active_k), dim=-1)
        return RouterOutput(logits, torch.softmax(top, dim=-1), indices)

    def aux_losses(self, output: RouterOutput, mask: torch.Tensor | None = None, context=None) -> dict[str, torch.Tensor]:
        return {}

    def as_topk(self):
        """At its current k this is top-k of the fixed projection with renormalized softmax weights."""
        from zoo.moe.routers.topk import TopKRouter

        topk = TopKRouter(self.hidden_size, self.num_experts, int(self.active_k), norm_topk_prob=True)
        with torch.no_grad():
            topk.weight.copy_(self.projection)
        return topk.to(self.projection.device), ""

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, k_min={self.k_min}, k_max={self.k_max}, "
                f"active_k={int(self.active_k)}")
