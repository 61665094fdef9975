"""Auxiliary losses and routing statistics: pure functions of router outputs.

Each takes one layer's router output (tokens flattened to T) and an optional token mask, so
padding never counts; the model combines layers. Nothing here reads or writes module state.
On zero tokens (a rank or micro-batch with none) every loss is 0, connected to the autograd
graph of its inputs (never NaN from a mean over nothing).
"""

from __future__ import annotations

import torch


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 0 of `values [T, ...]`, counting only rows where `mask [T]` is true.

    With no row counted (T = 0, or an all-false mask) it is 0, still in the autograd graph of
    `values`: a rank or micro-batch with no token adds nothing to a loss and its backward runs.
    """
    if mask is None:
        return values.mean(dim=0) if values.shape[0] else values.sum(dim=0)
    m = mask.reshape(-1).to(values.dtype)
    shape = (-1,) + (1,) * (values.dim() - 1)
    return (values * m.view(shape)).sum(dim=0) / m.sum().clamp_min(1)


def load_fraction(indices: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of the filled (token, slot) assignments that went to each expert.

    Args:
        indices: `[T, K]` expert ids; `-1` marks an empty slot, which is not counted.
        num_experts: E.
        mask: optional `[T]` (or any shape with T elements) true for real tokens.

    Returns:
        `[E]` float32, sums to 1 over real tokens (all zeros if no slot is filled).
    """
    counts = _assignment_counts(indices, num_experts, mask)  # [E], sums to the mean experts per token
    return counts / counts.sum().clamp_min(1e-12)


def _assignment_counts(indices: torch.Tensor, num_experts: int, mask: torch.Tensor | None) -> torch.Tensor:
    """`[E]` mean over real tokens of how many of a token's filled slots chose each expert."""
    filled = (indices >= 0).unsqueeze(-1)  # [T, K, 1]
    one_hot = torch.nn.functional.one_hot(indices.clamp_min(0), num_experts).float() * filled  # [T, K, E]
    return _masked_mean(one_hot.sum(dim=1), mask)


def experts_per_token(indices: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean number of filled slots (experts computed) per real token; scalar float32.

    Args:
        indices: `[T, K]` expert ids, `-1` for empty slots.
        mask: optional token mask with T elements.
    """
    return _masked_mean((indices >= 0).float().sum(dim=1), mask)


def load_balancing_loss(
    logits: torch.Tensor, top_k: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss: `E * sum_e f_e * P_e`.

    `f_e` is the fraction of top-k assignments sent to expert e (summing to k, as transformers'
    `load_balancing_loss_func` counts it) and `P_e` the mean router probability of e. Its minimum,
    `k`, is reached by uniform routing. Top-k is taken on the softmax, so this matches every router
    that ranks experts by logits.

    Args:
        logits: router logits `[T, E]`.
        top_k: k.
        mask: optional token mask with T elements.

    Returns:
        scalar float32.
    """
    num_experts = logits.shape[-1]
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    chosen = torch.topk(probs, top_k, dim=-1).indices
    f = _assignment_counts(chosen, num_experts, mask)  # [E], sums to k
    p = _masked_mean(probs, mask)  # [E]
    return num_experts * torch.sum(f * p)


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of `logsumexp(logits)^2`.

    Args:
        logits: `[T, E]`.
        mask: optional token mask with T elements.

    Returns:
        scalar float32.
    """
    z = torch.logsumexp(logits.float(), dim=-1) ** 2  # [T]
    return _masked_mean(z, mask)


def router_entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean entropy (nats) of the router's softmax over experts; `log E` is uniform, 0 is one-hot.

    Args:
        logits: `[T, E]`.
        mask: optional token mask with T elements.

    Returns:
        scalar float32.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    ent = -(logp.exp() * logp).sum(dim=-1)  # [T]
    return _masked_mean(ent, mask)


def assignment_balancing_loss(probs: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch balance loss over the experts a router actually chose: `E * sum_e f_e * P_e`.

    `f_e` is the mean over real tokens of how many of a token's filled slots chose expert e (so
    `sum_e f_e` is the mean experts per token) and `P_e` the mean router probability of e. For a
    fixed top-k router it equals `load_balancing_loss`; for variable-k routers (top-p, ...) it is
    the same loss over the variable sets.

    Args:
        probs: `[T, E]` router probabilities (softmax over the E experts).
        indices: `[T, K]` chosen experts, -1 for empty slots.
        mask: optional token mask with T elements.

    Returns:
        scalar float32.
    """
    num_experts = probs.shape[-1]
    f = _assignment_counts(indices, num_experts, mask)  # [E]
    return num_experts * torch.sum(f * _masked_mean(probs.float(), mask))


def tsallis_entropy(probs: torch.Tensor, q: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Tsallis entropy `S_q(p) = (1 - sum_i p_i^q) / (q - 1)` of each token's distribution.

    `q -> 1` is the Shannon entropy (nats), used when |q - 1| < 1e-6. Tsallis 1988; DynMoLE uses it
    to measure router uncertainty.

    Args:
        probs: `[T, R]` probabilities.
        q: entropic index, > 0.
        mask: optional token mask with T elements.

    Returns:
        scalar float32.
    """
    return _masked_mean(tsallis_entropy_per_token(probs, q), mask)


def tsallis_entropy_per_token(probs: torch.Tensor, q: float) -> torch.Tensor:
    """`[T]` Tsallis entropy of each row of `probs [T, R]` (Shannon for q = 1)."""
    p = probs.float()
    if abs(q - 1.0) < 1e-6:
        return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)
    return (1.0 - p.pow(q).sum(dim=-1)) / (q - 1.0)


def localized_balancing_loss(
    weights: torch.Tensor,
    sample_type: torch.Tensor,
    sample_id: torch.Tensor,
    expert_group: torch.Tensor,
    delta: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """LoRAMoE's localized balancing constraint (Dou et al. 2024, eq. 8-10): `sigma^2(Z) / mu(Z)`.

    `Q[n, m]` is the importance of expert n for sample m (the sum of n's router weights over the
    sample's real tokens), `I[n, m] = 1 + delta` where expert n's group is sample m's type and
    `1 - delta` elsewhere, and `Z = I * Q`. The variance is the unbiased one over all entries.

    Args:
        weights: `[T, E]` soft router weights of every token for every expert.
        sample_type: `[T]` the type (group index) of each token's sample.
        sample_id: `[T]` which sample each token belongs to.
        expert_group: `[E]` the group index of each expert.
        delta: the imbalance allowed between groups, in [0, 1).
        mask: optional `[T]` real tokens.

    Returns:
        scalar float32 (0 when fewer than two entries).
    """
    w = weights.float()
    if mask is not None:
        w = w * mask.reshape(-1, 1).to(w.dtype)
    ids, inverse = torch.unique(sample_id.reshape(-1), return_inverse=True)  # M samples
    q = w.new_zeros(len(ids), w.shape[1]).index_add(0, inverse, w)  # [M, E]
    types = torch.zeros(len(ids), dtype=torch.long, device=w.device).scatter(
        0, inverse, sample_type.reshape(-1).long().to(w.device))  # [M]: every token of a sample has its type
    matches = types[:, None] == expert_group.reshape(1, -1).to(types.device)  # [M, E]
    z = q * torch.where(matches, 1.0 + delta, 1.0 - delta)
    if z.numel() < 2:
        return z.sum() * 0
    return z.reshape(-1).var() / z.mean().clamp_min(1e-12)
