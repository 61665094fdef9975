"""Expert-choice routing: "Mixture-of-Experts with Expert Choice Routing" (Zhou et al., NeurIPS 2022,
arXiv 2202.09368).

Tokens do not choose experts; each expert chooses its top-C tokens. S = softmax(X W) over the
experts of each token (`[T, E]`); expert e takes the C tokens with the largest S[:, e] (ties: the
earlier token), with `C = ceil(capacity_factor * T / E)` over the T real tokens (the paper's
k = n c / e), so every expert gets exactly C tokens and the load is balanced by construction; a
token gets 0..E experts, weighted by its S (not renormalized). Padding tokens (`mask == 0`) are
never chosen and do not count in T. Slot j of a token is expert j (K = E), empty when e did not
choose it. The paper uses no balance loss; the router offers the z-loss (weight 0 by default).

Not causal: a token's experts depend on the other tokens routed with it. In training and in the
prompt's forward those are the batch's real tokens; in KV-cached generation each step routes the
B new tokens among themselves, so one sequence generated alone gets every expert for every new
token (C = ceil(c / E) >= 1 of 1 token), and a token's output can change with the batch it is
generated in. `tests/test_routers.py` shows both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.moe.losses import router_z_loss
from zoo.moe.routers.base import EMPTY, ROUTERS, RouterOutput, check_range


@dataclass
class ExpertChoiceOptions:
    """Options of the `expert_choice` router.

    Attributes:
        capacity_factor: c; each expert takes `ceil(c * T / E)` of the T real tokens (c = k gives
            the compute of top-k), > 0.
    """

    capacity_factor: float = 2.0

    def __post_init__(self) -> None:
        check_range("capacity_factor", self.capacity_factor, 0, float("inf"), low_open=True, high_open=True)


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens each expert takes: `ceil(c * T / E)`, at most T (0 when there is no token)."""
    if num_tokens == 0:
        return 0
    return min(num_tokens, max(1, math.ceil(capacity_factor * num_tokens / num_experts)))


@ROUTERS.register("expert_choice", options=ExpertChoiceOptions)
class ExpertChoiceRouter(nn.Module):
    """Each expert takes its top-C tokens; K = E slots (slot j = expert j).

    Args:
        hidden_size: d.
        num_experts: E.
        capacity_factor: c (> 0).
    """

    default_loss_coefs = {"z": 0.0}

    def __init__(self, hidden_size: int, num_experts: int, capacity_factor: float = 2.0) -> None:
        super().__init__()
        ExpertChoiceOptions(capacity_factor)
        self.hidden_size, self.num_experts = hidden_size, num_experts
        self.capacity_factor = capacity_factor
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, std=std)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> RouterOutput:
        """`x [T, d]`, `mask [T]` -> logits `[T, E]`, weights / indices `[T, E]`."""
        logits = F.linear(x, self.weight)  # [T, E]
        scores = torch.softmax(logits.float(), dim=-1)  # [T, E]
        real = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if mask is None else mask.reshape(-1).bool()
        capacity = expert_capacity(int(real.sum()), self.num_experts, self.capacity_factor)
        ranked = scores.masked_fill(~real[:, None], -1.0)  # padding ranks below every real token
        order = torch.sort(ranked, dim=0, descending=True, stable=True).indices[:capacity]  # [C, E] token ids
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        chosen.scatter_(0, order, True)  # [T, E]
        weights = scores * chosen
        indices = torch.where(chosen, torch.arange(self.num_experts, device=x.device).expand_as(chosen),
                              torch.full((), EMPTY, device=x.device, dtype=torch.long))
        return RouterOutput(logits, weights, indices)

    def aux_losses(self, output: RouterOutput, mask: torch.Tensor | None = None, context=None) -> dict[str, torch.Tensor]:
        return {"z": router_z_loss(output.logits, mask)}

    def as_topk(self):
        """Not top-k: experts choose tokens."""
        return None, "expert-choice routing lets each expert choose tokens across the batch (not causal, no fixed top-k)"

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, capacity_factor={self.capacity_factor}"
