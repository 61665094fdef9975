"""Expert capacity with token dropping for token-choice routers.

GShard (Lepikhin et al. 2020), Switch Transformer (Fedus et al. 2021) and DeepSpeed-MoE
(Rajbhandari et al. 2022) bound the tokens an expert takes in one batch:
`C = ceil(capacity_factor * T * k / E)` for T real tokens routed to k of E experts (Megatron-Core's
`--moe-expert-capacity-factor`). An assignment past an expert's capacity is dropped: its slot
becomes an empty slot (index -1, weight 0), so the experts, the Triton kernels, expert parallelism
and the reference op skip it, and a token whose every slot was dropped gets 0 from the routed
experts (the residual stream carries it).

Which assignments an expert keeps (`drop_policy`, Megatron-Core's `--moe-token-drop-policy`):
`probs`, the C with the largest combine weight (ties: earlier token, then earlier slot);
`position`, the first C in token order (then slot order), as Switch / GShard's cumulative-sum
positions. Padding tokens (`mask == 0`) do not count in T and rank after every real token.

Chosen where the papers differ: the weights of the kept slots are not renormalized after a drop
(Megatron-Core; DeepSpeed's top-2 gate renormalizes), so a dropped share is simply lost; padding
to capacity (a dense `[E, C, d]` layout) is not done, since the experts here run dropless
layouts; `eval_capacity_factor` None means no dropping in eval (dropless inference).
"""

from __future__ import annotations

import math

import torch

from zoo.moe.routers.base import EMPTY, check_range

DROP_POLICIES = ("probs", "position")


def check_capacity_options(capacity_factor: float | None, eval_capacity_factor: float | None, drop_policy: str) -> None:
    """Raise naming the option unless the factors are None or > 0 and the policy is known."""
    for name, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
        if value is not None:
            check_range(name, value, 0, math.inf, low_open=True, high_open=True)
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy={drop_policy!r} must be one of {DROP_POLICIES}")


def token_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """`ceil(capacity_factor * T * k / E)`: assignments each expert keeps (0 with no token)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts) if num_tokens else 0


def drop_over_capacity(
    weights: torch.Tensor,
    indices: torch.Tensor,
    capacity: int,
    num_experts: int,
    *,
    policy: str = "probs",
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty every assignment past its expert's first `capacity` (by `policy`).

    Args:
        weights: `[T, K]` combine weights.
        indices: `[T, K]` expert ids, -1 for empty slots.
        capacity: assignments each expert keeps.
        num_experts: E.
        policy: `probs` or `position` (see the module docstring).
        mask: optional `[T]` real tokens (padding ranks last).

    Returns:
        `(weights [T, K], indices [T, K])` with dropped slots set to 0 / -1; gradients flow to the
        kept weights.
    """
    if policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy={policy!r} must be one of {DROP_POLICIES}")
    T, K = indices.shape
    flat = indices.reshape(-1)  # [T*K] in (token, slot) order
    n = flat.numel()
    if n == 0:
        return weights, indices
    expert = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))  # empty slots sort last
    order = torch.arange(n, device=flat.device)
    if policy == "probs":
        order = torch.sort(weights.detach().reshape(-1).float(), descending=True, stable=True).indices
    if mask is not None:
        padding = ~mask.reshape(-1).bool().to(flat.device).repeat_interleave(K)  # [T*K]
        order = order[torch.sort(padding[order].to(torch.int8), stable=True).indices]
    order = order[torch.sort(expert[order], stable=True).indices]  # grouped by expert, priority kept inside
    sorted_expert = expert[order]
    starts = torch.searchsorted(sorted_expert, sorted_expert, right=False)  # first position of each run
    rank_in_expert = torch.arange(n, device=flat.device) - starts
    keep = torch.empty(n, dtype=torch.bool, device=flat.device)
    keep[order] = (rank_in_expert < capacity) & (sorted_expert < num_experts)
    keep = keep.view(T, K)
    return weights.masked_fill(~keep, 0.0), indices.masked_fill(~keep, EMPTY)


def apply_capacity(router, weights: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None,
                   top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A router's capacity step: its train or eval factor (None: no dropping) over its real tokens."""
    factor = router.capacity_factor if router.training else router.eval_capacity_factor
    if factor is None:
        return weights, indices
    real = indices.shape[0] if mask is None else int(mask.reshape(-1).bool().sum())
    capacity = token_capacity(real, top_k, router.num_experts, factor)
    return drop_over_capacity(weights, indices, capacity, router.num_experts, policy=router.drop_policy, mask=mask)


__all__ = ["DROP_POLICIES", "apply_capacity", "check_capacity_options", "drop_over_capacity", "token_capacity"]
