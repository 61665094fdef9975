"""Auxiliary losses and routing statistics: pure functions of router outputs.

Each takes one layer's router output (tokens flattened to T) and an optional token mask, so
padding never counts; the model combines layers. Nothing here reads or writes module state; the
one state, `balance_window()`'s running counts for the global balance over a step's micro-batches,
is the trainer's, opened and closed around each optimizer step.
On zero tokens (a rank or micro-batch with none) every loss is 0, connected to the autograd
graph of its inputs (never NaN from a mean over nothing).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

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


# --- balance counted over more than one micro-batch ------------------------------------------------

BALANCE_LEVELS = ("micro_batch", "sequence", "global")
"""Where the balance loss counts expert load: the micro-batch (Switch/Mixtral), each sequence
(DeepSeek-V3's complementary sequence-wise loss) or the global batch over data-parallel ranks
(Qiu et al. 2025, "Demons in the Detail"; Megatron-Core `global_aux_loss`)."""


def _slot_counts(indices: torch.Tensor, num_experts: int, mask: torch.Tensor | None) -> torch.Tensor:
    """`[T, E]` how many of token t's filled slots chose expert e (0 for padding tokens)."""
    filled = (indices >= 0).unsqueeze(-1)  # [T, K, 1]
    counts = (torch.nn.functional.one_hot(indices.clamp_min(0), num_experts).float() * filled).sum(dim=1)  # [T, E]
    if mask is not None:
        counts = counts * mask.reshape(-1, 1).to(counts.dtype)
    return counts


def sequence_balancing_loss(probs: torch.Tensor, indices: torch.Tensor, sample_id: torch.Tensor | None,
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (DeepSeek-AI 2024, eq. 17-20).

    For each sequence s: `E * sum_e f_{s,e} * P_{s,e}`, with `f_{s,e}` the mean over s's real tokens
    of how many of a token's filled slots chose e and `P_{s,e}` the mean over s's real tokens of the
    (normalized) affinity of e; the loss is the mean over the sequences with a real token.

    Normalization chosen: the same as `load_balancing_loss` (transformers'; minimum k at uniform
    routing), so a `balance` coefficient means the same at every level. The paper's
    `alpha * sum f_i P_i` has f scaled by E / (k T) instead: its alpha is our coefficient times k.
    The paper counts f over the selected experts (`indices` here: what the router chose, the
    selection bias included) and P over the affinities normalized to sum to 1 per token (a sigmoid
    router passes `s / s.sum(-1)`; a softmax router its probabilities).

    Args:
        probs: `[T, E]` per-token affinities summing to 1.
        indices: `[T, K]` chosen experts, -1 for empty slots.
        sample_id: `[T]` the sequence of each token (None: the whole batch is one sequence).
        mask: optional `[T]` real tokens.

    Returns:
        scalar float32 (0, in the graph of `probs`, when no token is real).
    """
    num_experts = probs.shape[-1]
    p = probs.float()
    T = p.shape[0]
    m = torch.ones(T, device=p.device) if mask is None else mask.reshape(-1).to(device=p.device, dtype=p.dtype)
    if sample_id is None:
        inverse = torch.zeros(T, dtype=torch.long, device=p.device)
        S = 1
    else:
        ids, inverse = torch.unique(sample_id.reshape(-1).to(p.device), return_inverse=True)
        S = len(ids)
    n = m.new_zeros(S).index_add(0, inverse, m)  # [S] real tokens per sequence
    P = p.new_zeros(S, num_experts).index_add(0, inverse, p * m[:, None]) / n.clamp_min(1)[:, None]  # [S, E]
    f = p.new_zeros(S, num_experts).index_add(0, inverse, _slot_counts(indices, num_experts, m)) / n.clamp_min(1)[:, None]
    per_sequence = num_experts * (f * P).sum(dim=-1)  # [S]
    has = (n > 0).to(p.dtype)
    return (per_sequence * has).sum() / has.sum().clamp_min(1)


def _world(group) -> int:
    """World size of `group` when torch.distributed is initialized, else 1 (refusing a launch of
    several processes that never initialized it)."""
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        raise ValueError(f"global balance (balance_level='global') needs a torch.distributed process group, but "
                         f"WORLD_SIZE={world} and none is initialized")
    return 1


def global_balancing_loss(probs: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None,
                          group=None, key: object | None = None) -> torch.Tensor:
    """Global-batch balance loss (Qiu et al. 2025, "Demons in the Detail"; Megatron `global_aux_loss`).

    The expert frequencies `f_e` are counted over the global batch: the real tokens of every
    data-parallel rank (an all-reduce of the `[E]` counts and the token count over `group`, default
    the world, when torch.distributed is initialized), and each rank returns
    `E * W * sum_e f_e * (sum_{t on this rank} p_{t,e}) / N` (W ranks, N real tokens in all), so the
    mean of the ranks' losses (and of their gradients: what data parallelism averages) is exactly
    the micro-batch loss of one process on the concatenated batch, `E * sum_e f_e * P_e`.

    Over the micro-batches of an optimizer step: inside `balance_window()` (which the trainer opens
    around a step's micro-batches) the counts are summed over the step so far, per `key` (one per
    router), so f at micro-batch j is the load of micro-batches 1..j of every rank and at the
    step's last micro-batch it is the whole global batch's. Chosen where the paper leaves room
    (Megatron-Core's `global_aux_loss` does the same with `global_tokens_per_expert`): the exact
    global-batch gradient needs f of micro-batches whose forward has not run yet, i.e. every
    micro-batch's graph kept alive until the last one, which is what accumulation avoids. The
    running counts live in the trainer's window, never on a router (routers keep no state that
    forward changes). f is not differentiated (the counts come from the top-k choice); P keeps
    its gradient.

    Args:
        probs: `[T, E]` per-token affinities summing to 1.
        indices: `[T, K]` chosen experts, -1 for empty slots.
        mask: optional `[T]` real tokens.
        group: process group of the data-parallel ranks (None: the world).
        key: what the counts of an open `balance_window()` are summed under (the router); None
            counts this micro-batch alone even inside a window.

    Returns:
        scalar float32.

    Raises:
        ValueError: WORLD_SIZE > 1 but no process group is initialized.
    """
    import torch.distributed as dist

    num_experts = probs.shape[-1]
    p = probs.float()
    m = None if mask is None else mask.reshape(-1).to(device=p.device, dtype=p.dtype)
    counts = _slot_counts(indices, num_experts, m).sum(dim=0)  # [E]
    n = torch.tensor([float(p.shape[0]) if m is None else float(m.sum())], device=p.device)
    world = _world(group)
    if world > 1:
        stats = torch.cat([counts, n]).detach()
        dist.all_reduce(stats, group=group)
        counts, n = stats[:num_experts], stats[num_experts:]
    p_sum = (p if m is None else p * m[:, None]).sum(dim=0)  # [E], this rank's
    total = n.clamp_min(1)[0]  # this micro-batch's real tokens, all ranks: P's denominator
    window = _WINDOW.current
    if window is not None and key is not None:
        counts, n = window.add(key, counts.detach(), n.detach())
    f = counts.detach() / n.clamp_min(1)[0]
    return num_experts * world * torch.sum(f * p_sum) / total


class BalanceWindow:
    """The expert counts of the micro-batches of one optimizer step so far, per router: the state
    `global_balancing_loss` sums into while `balance_window()` is open, and that dies with it."""

    def __init__(self) -> None:
        self.counts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, key: object, counts: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one micro-batch's `[E]` counts and `[1]` token count under `key`; returns the sums so far."""
        if id(key) in self.counts:
            before, seen = self.counts[id(key)]
            if before.shape != counts.shape:
                raise ValueError(f"balance window: {type(key).__name__} counted {before.shape[0]} experts earlier in "
                                 f"this step and {counts.shape[0]} now")
            counts, n = before + counts, seen + n
        self.counts[id(key)] = (counts, n)
        return counts, n


class _WindowSlot(threading.local):
    current: BalanceWindow | None = None


_WINDOW = _WindowSlot()


@contextmanager
def balance_window() -> Iterator[BalanceWindow]:
    """Sum global balance counts (`balance_level='global'`) over the micro-batches run inside the
    block: a trainer opens one per optimizer step (`zoo.pipelines.train` does). Nested windows
    are refused: a step is one window."""
    if _WINDOW.current is not None:
        raise RuntimeError("balance_window() is already open in this thread; one optimizer step is one window")
    _WINDOW.current = window = BalanceWindow()
    try:
        yield window
    finally:
        _WINDOW.current = None


def balancing_loss(probs: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None, *,
                   level: str = "micro_batch", sample_id: torch.Tensor | None = None, group=None,
                   key: object | None = None) -> torch.Tensor:
    """The balance loss `E * sum_e f_e * P_e` counted at `level` (one of `BALANCE_LEVELS`).

    `micro_batch`: `assignment_balancing_loss`; `sequence`: `sequence_balancing_loss` over
    `sample_id`; `global`: `global_balancing_loss` over the ranks of `group` (and over the
    micro-batches of an open `balance_window()`, under `key`).
    """
    if level == "micro_batch":
        return assignment_balancing_loss(probs, indices, mask)
    if level == "sequence":
        return sequence_balancing_loss(probs, indices, sample_id, mask)
    if level == "global":
        return global_balancing_loss(probs, indices, mask, group, key)
    raise ValueError(f"balance level {level!r} is not one of {BALANCE_LEVELS}")


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio, DeepSeek's load-imbalance measure (Wang et al. 2024, "Auxiliary-Loss-Free Load
    Balancing Strategy for Mixture-of-Experts"): `max_e load_e / mean_e load_e - 1`; 0 is perfect
    balance, E - 1 everything on one expert. 0 when nothing was routed.

    Args:
        load: `[E]` per-expert load (counts or fractions).
    """
    load = load.float()
    mean = load.mean()
    return torch.where(mean > 0, load.max() / mean.clamp_min(1e-30) - 1.0, torch.zeros_like(mean))
