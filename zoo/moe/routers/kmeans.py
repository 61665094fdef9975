"""K-means gating, after MixER ("Mixture of Expert Reconstructors") in "Towards Foundational Models
for Dynamical System Reconstruction: Hierarchical Meta-Learning via Mixture of Experts" (2025).

A sparse top-1 gate whose routing is not learned by gradient: each token goes to the expert whose
centroid is nearest (squared Euclidean distance; logits are the negated distances), with weight
1. The centroids follow the routed inputs by K-means steps the trainer takes after each optimizer
step (`update(inputs, output)`, no gradient): assign each real token to its nearest centroid, then
move every centroid towards the least-squares fit of its tokens, their mean. MixER alternates
K-means assignment and least-squares fitting of its gate; for a nearest-centroid gate the
least-squares fit of a centroid is exactly that mean.

Choices: an exponential moving average of the batch means (`decay`, default 0.9) so centroids keep
up with representations that change while the model trains (`decay: null` gives the running mean
of every token seen, Sculley 2010's mini-batch K-means); the first update places the centroids on
E tokens spread evenly over the batch (deterministic); a centroid that gets no token keeps its
place. Centroids are buffers: saved in checkpoints, restored on resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from zoo.moe.routers.base import ROUTERS, RouterOutput, check_range


@dataclass
class KMeansOptions:
    """Options of the `kmeans` router.

    Attributes:
        decay: EMA factor of the centroid update in [0, 1) (0: jump to the batch mean); None: the
            running mean over every token seen.
    """

    decay: float | None = 0.9

    def __post_init__(self) -> None:
        if self.decay is not None:
            check_range("decay", self.decay, 0, 1, high_open=True)


def squared_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """`[T, E]` squared Euclidean distances between `x [T, d]` and `centroids [E, d]`.

    As `|x|^2 - 2 x.c + |c|^2` (one GEMM, no `[T, E, d]` tensor), clamped at 0 against rounding.
    """
    return (x.pow(2).sum(-1, keepdim=True) - 2 * x @ centroids.t() + centroids.pow(2).sum(-1)).clamp_min(0)


@ROUTERS.register("kmeans", options=KMeansOptions)
class KMeansRouter(nn.Module):
    """Nearest-centroid top-1 routing; centroids moved by the trainer's K-means steps.

    Args:
        hidden_size: d.
        num_experts: E.
        decay: see `KMeansOptions`.

    Buffers:
        centroids: `[E, d]`.
        counts: `[E]` tokens assigned so far (the running mean's weights).
        initialized: whether the first update has placed the centroids.
    """

    default_loss_coefs: dict[str, float] = {}

    def __init__(self, hidden_size: int, num_experts: int, decay: float | None = 0.9) -> None:
        super().__init__()
        KMeansOptions(decay)
        self.hidden_size, self.num_experts, self.decay = hidden_size, num_experts, decay
        self.register_buffer("centroids", torch.empty(num_experts, hidden_size))
        self.register_buffer("counts", torch.zeros(num_experts))
        self.register_buffer("initialized", torch.tensor(False))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.centroids, std=std)
        self.counts.zero_()
        self.initialized.fill_(False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> RouterOutput:
        """`x [T, d]` -> logits `[T, E]` (= -distance), weights `[T, 1]` (1.0), indices `[T, 1]`."""
        logits = -squared_distances(x.float(), self.centroids.float()).to(x.dtype)  # [T, E]
        indices = logits.float().argmax(dim=-1, keepdim=True)  # nearest; ties: lower id
        return RouterOutput(logits, torch.ones(indices.shape, dtype=torch.float32, device=x.device), indices)

    @torch.no_grad()
    def update(self, inputs: torch.Tensor, output: RouterOutput | None = None) -> None:
        """Trainer hook: one K-means step on the real tokens `inputs [N, d]` routed in this step.

        Under torch.distributed (data or expert parallel: the router is replicated) every rank must
        call it; the statistics are summed over all ranks and rank 0's first placement is used, so
        the centroids stay identical everywhere.
        """
        x = inputs.detach().float().reshape(-1, self.hidden_size)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not bool(self.initialized):
            if x.shape[0] > 0:
                pick = torch.linspace(0, x.shape[0] - 1, self.num_experts, device=x.device).round().long()
                self.centroids.copy_(x[pick].to(self.centroids.dtype))
            if distributed:
                dist.broadcast(self.centroids, src=0)
            self.initialized.fill_(bool(x.shape[0] > 0) or distributed)
        assign = squared_distances(x, self.centroids.float()).argmin(dim=-1)  # [N]
        n = torch.bincount(assign, minlength=self.num_experts).float()  # [E]
        sums = torch.zeros(self.num_experts, self.hidden_size, device=x.device).index_add_(0, assign, x)
        if distributed:
            dist.all_reduce(n)
            dist.all_reduce(sums)
        hit = n > 0
        mean = sums[hit] / n[hit, None]
        old = self.centroids[hit].float()
        if self.decay is None:
            total = self.counts[hit] + n[hit]
            new = old + (sums[hit] - n[hit, None] * old) / total[:, None]
        else:
            new = self.decay * old + (1.0 - self.decay) * mean
        self.centroids[hit] = new.to(self.centroids.dtype)
        self.counts += n

    def aux_losses(self, output: RouterOutput, mask: torch.Tensor | None = None, context=None) -> dict[str, torch.Tensor]:
        return {}

    def as_topk(self):
        """Not a linear gate: nearest-centroid distances need a per-expert bias the HF gates lack."""
        return None, "nearest-centroid (K-means) routing needs a per-expert bias -|c_e|^2 that a bias-free linear gate lacks"

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, decay={self.decay}"
