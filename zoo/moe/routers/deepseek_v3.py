"""DeepSeek-V3's gate: sigmoid scores, a selection-only expert bias (auxiliary-loss-free balancing),
group-limited top-k, weights normalized over the chosen experts and scaled.

References: DeepSeek-AI, "DeepSeek-V3 Technical Report" (2024, arXiv 2412.19437), sec. 2.1.2;
Wang et al., "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts" (2024, arXiv
2408.15664); DeepSeek-V2 (arXiv 2405.04434) for device-/group-limited routing. The rule matches
transformers' `DeepseekV3TopkRouter` (outputs, indices and gradients; tested):

    s = sigmoid(x W^T)                              # [T, E] affinities (float32)
    c = s + b                                       # selection scores; b = e_score_correction_bias
    group score = sum of the top-2 c in each of n_group groups of E / n_group experts
    keep the topk_group best groups; experts of the other groups are never chosen
    indices = top-k of c over the kept groups
    weights = s[indices] / sum(s[indices]) * routed_scaling_factor   (norm_topk_prob)

The bias `b` enters the choice only, never the weights or autograd. It is trainer-driven state
(`update`, called by the trainer once per optimizer step, `zoo.moe.trainer_hooks`): the step's
per-expert counts of filled slots over every micro-batch's real tokens, all-reduced over the
data- and expert-parallel ranks (the world, when torch.distributed is initialized: the router is
replicated on every rank), then `b_e += u * sign(mean_e(count) - count_e)`. It is a buffer:
checkpointed with the weights, so a resumed run continues exactly.

Chosen where the papers are vague: the paper's update "at the end of each step" runs here after
the optimizer step (torchtitan runs it just before; the bias is no parameter, so the two are the
same); the delta is not re-centered (the paper and Megatron-Core; torchtitan subtracts its mean,
which changes no choice: a constant added to every bias keeps every ranking); with fewer than 2
experts per group the group score sums the one there is (transformers requires 2); ties (between groups
and between experts) go to the lower id (transformers' `torch.topk` leaves them unspecified);
`score_function: softmax` gives DeepSeek-V2's softmax affinities with the same selection rule.
The complementary balance loss is the sequence-wise one (`balance`, DeepSeek-V3's
"extremely small" alpha: default weight 1e-4, at our normalization, see
`zoo.moe.losses.sequence_balancing_loss`), computed on the affinities normalized per token, at the
level `balance_level` chooses; capacity and dropping as in `zoo.moe.routers.capacity` (DeepSeek-V3
trains without dropping: off by default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from zoo.moe.losses import BALANCE_LEVELS, balancing_loss, router_z_loss
from zoo.moe.routers.base import ROUTERS, RouterOutput, check_range
from zoo.moe.routers.capacity import apply_capacity, check_capacity_options

SCORE_FUNCTIONS = ("sigmoid", "softmax")


@dataclass
class DeepSeekV3Options:
    """Options of the `deepseek_v3` router.

    Attributes:
        top_k: experts per token (DeepSeek-V3: 8).
        n_group: groups the E experts are split into, E divisible by it (DeepSeek-V3: 8).
        topk_group: groups a token may use, <= n_group (DeepSeek-V3: 4).
        routed_scaling_factor: weights are multiplied by it (DeepSeek-V3: 2.5).
        norm_topk_prob: normalize the chosen affinities to sum to 1 before scaling.
        score_function: `sigmoid` (V3) or `softmax` (V2).
        bias_update_rate: u of the aux-loss-free bias update, >= 0 (DeepSeek-V3: 0.001; 0 keeps it fixed).
        balance_level: where the `balance` loss counts load: one of `BALANCE_LEVELS`
            (DeepSeek-V3: `sequence`).
        capacity_factor, eval_capacity_factor, drop_policy: see `zoo.moe.routers.capacity`.
    """

    top_k: int = 2
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    score_function: str = "sigmoid"
    bias_update_rate: float = 0.001
    balance_level: str = "sequence"
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    drop_policy: str = "probs"

    def __post_init__(self) -> None:
        check_range("top_k", self.top_k, 1, float("inf"), integer=True)
        check_range("n_group", self.n_group, 1, float("inf"), integer=True)
        check_range("topk_group", self.topk_group, 1, float("inf"), integer=True)
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be <= n_group={self.n_group}")
        check_range("routed_scaling_factor", self.routed_scaling_factor, 0, float("inf"), low_open=True, high_open=True)
        check_range("bias_update_rate", self.bias_update_rate, 0, float("inf"), high_open=True)
        if self.score_function not in SCORE_FUNCTIONS:
            raise ValueError(f"score_function={self.score_function!r} must be one of {SCORE_FUNCTIONS}")
        if self.balance_level not in BALANCE_LEVELS:
            raise ValueError(f"balance_level={self.balance_level!r} must be one of {BALANCE_LEVELS}")
        check_capacity_options(self.capacity_factor, self.eval_capacity_factor, self.drop_policy)

    def validate_for(self, num_experts: int) -> None:
        if num_experts % self.n_group:
            raise ValueError(f"num_experts={num_experts} is not divisible by n_group={self.n_group}")
        allowed = self.topk_group * (num_experts // self.n_group)
        if self.top_k > allowed:
            raise ValueError(f"top_k={self.top_k} must be <= the {allowed} experts of topk_group={self.topk_group} "
                             f"groups of {num_experts // self.n_group}")


def group_limited_mask(selection: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """`[T, E]` bool: the experts in each token's `topk_group` best groups (group score: the sum of its
    top-2 selection scores, or its one score with 1 expert per group; ties: the lower group)."""
    T, E = selection.shape
    if n_group == 1:
        return torch.ones_like(selection, dtype=torch.bool)
    per = E // n_group
    group_scores = selection.view(T, n_group, per).topk(min(2, per), dim=-1).values.sum(dim=-1)  # [T, G]
    group_idx = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, :topk_group]  # [T, g]
    keep = torch.zeros(T, n_group, dtype=torch.bool, device=selection.device).scatter_(1, group_idx, True)
    return keep.repeat_interleave(per, dim=1)  # [T, E]


@ROUTERS.register("deepseek_v3", options=DeepSeekV3Options)
class DeepSeekV3Router(nn.Module):
    """DeepSeek-V3's gate (see the module docstring).

    Args:
        hidden_size: d.
        num_experts: E.
        **options: see `DeepSeekV3Options`.

    Buffers:
        e_score_correction_bias: `[E]` float32 selection bias (transformers' name; exported as is).

    Losses: `balance` (default weight 1e-4, at `balance_level`) and `z` (weight 0).
    """

    default_loss_coefs = {"balance": 1e-4, "z": 0.0}

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 2, *, n_group: int = 1, topk_group: int = 1,
                 routed_scaling_factor: float = 1.0, norm_topk_prob: bool = True, score_function: str = "sigmoid",
                 bias_update_rate: float = 0.001, balance_level: str = "sequence",
                 capacity_factor: float | None = None, eval_capacity_factor: float | None = None,
                 drop_policy: str = "probs") -> None:
        super().__init__()
        opts = DeepSeekV3Options(top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob, score_function,
                                 bias_update_rate, balance_level, capacity_factor, eval_capacity_factor, drop_policy)
        opts.validate_for(num_experts)
        self.hidden_size, self.num_experts = hidden_size, num_experts
        for name, value in vars(opts).items():
            setattr(self, name, value)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Weights ~ N(0, std^2); the bias back to 0."""
        nn.init.normal_(self.weight, std=std)
        self.e_score_correction_bias.zero_()

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """`[T, E]` float32 affinities from logits."""
        return torch.sigmoid(logits.float()) if self.score_function == "sigmoid" else torch.softmax(logits.float(), dim=-1)

    def choose(self, scores: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing rule on affinities `scores [T, E]`: `(weights [T, k] float32, indices [T, k])`."""
        selection = scores.detach() + self.e_score_correction_bias.float()  # [T, E], choice only
        allowed = group_limited_mask(selection, self.n_group, self.topk_group)
        ranked = torch.sort(selection.masked_fill(~allowed, float("-inf")), dim=-1, descending=True, stable=True)
        indices = ranked.indices[:, :self.top_k]  # [T, k], ties: the lower expert id
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        return apply_capacity(self, weights, indices, mask, self.top_k)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> RouterOutput:
        """Route tokens (`mask` matters only for capacity: padding takes none).

        Args:
            x: `[T, d]`.
            mask: `[T]` real tokens.

        Returns:
            RouterOutput with logits `[T, E]` (float32, as transformers computes them), weights and
            indices `[T, k]`.
        """
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        weights, indices = self.choose(self.scores(logits), mask)
        return RouterOutput(logits, weights, indices)

    def normalized_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """`[T, E]` affinities normalized to sum to 1 per token (what the balance loss averages)."""
        s = self.scores(logits)
        return s / s.sum(dim=-1, keepdim=True).clamp_min(1e-20)

    def aux_losses(self, output: RouterOutput, mask: torch.Tensor | None = None, context=None) -> dict[str, torch.Tensor]:
        """`balance` at `balance_level` (sequences from `context["sample_id"]`) and `z`."""
        sample_id = (context or {}).get("sample_id")
        balance = balancing_loss(self.normalized_scores(output.logits), output.indices, mask, level=self.balance_level,
                                 sample_id=sample_id, key=self)
        return {"balance": balance, "z": router_z_loss(output.logits, mask)}

    @torch.no_grad()
    def expert_counts(self, inputs: torch.Tensor, output: RouterOutput | None = None) -> torch.Tensor:
        """`[E]` float32 filled slots per expert: from `output` when given, else by routing `inputs`."""
        if output is None:
            x = inputs.reshape(-1, self.hidden_size)
            _, indices = self.choose(self.scores(F.linear(x.float(), self.weight.float())))
        else:
            indices = output.indices
        flat = indices.reshape(-1)
        return torch.bincount(flat[flat >= 0], minlength=self.num_experts).float()

    @torch.no_grad()
    def update(self, inputs: torch.Tensor, output: RouterOutput | None = None) -> None:
        """Trainer hook: one aux-loss-free bias step from this optimizer step's routed real tokens.

        Args:
            inputs: `[N, d]` the real tokens routed in the step's micro-batches.
            output: their routing (as the forward passes made it); None: route `inputs` now.

        Under torch.distributed every rank must call it: the counts are summed over all ranks, so
        the bias stays identical everywhere (and 2 processes equal 1 on the same tokens).
        """
        counts = self.expert_counts(inputs, output).to(self.e_score_correction_bias.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        if self.bias_update_rate == 0:
            return
        delta = self.bias_update_rate * torch.sign(counts.mean() - counts)
        self.e_score_correction_bias.add_(delta.to(self.e_score_correction_bias.dtype))

    def as_topk(self):
        """Not softmax top-k: sigmoid scores, a selection bias and groups (the `deepseek_v3` export holds it)."""
        if self.score_function == "softmax" and self.n_group == 1 and self.routed_scaling_factor == 1.0 \
                and self.eval_capacity_factor is None and not self.e_score_correction_bias.any():
            from zoo.moe.routers.topk import TopKRouter

            topk = TopKRouter(self.hidden_size, self.num_experts, self.top_k, norm_topk_prob=self.norm_topk_prob)
            topk.weight = self.weight
            return topk, ""
        return None, (f"{self.score_function} scores with a selection bias, {self.n_group} expert groups and a route scale "
                      f"{self.routed_scaling_factor} are not softmax top-k routing")

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, n_group={self.n_group}, "
                f"topk_group={self.topk_group}, routed_scaling_factor={self.routed_scaling_factor}, "
                f"score_function={self.score_function}, bias_update_rate={self.bias_update_rate}")
