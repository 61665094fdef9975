"""Expert parallelism for `SparseMoE`: shard the experts over a process group, route with all-to-all.

A transform over a built model, like upcycling and LoRA: `shard_experts(model, group)` replaces
the `SwiGLUExperts` of every `SparseMoE` by `ExpertParallelSwiGLUExperts`, which keeps only this
rank's contiguous slice of experts and exchanges tokens with the other ranks of the group. Routers
and shared experts are untouched (they stay replicated), so every router that returns a
`RouterOutput` works unchanged: the experts module receives `(x, weights, indices)` exactly as
before and returns the same `[T, d]`.

Dispatch is dropless (no capacity factor): counts are exchanged first, then tokens move with
`all_to_all_single` using variable split sizes; the local shard runs `zoo.kernels.ops.moe_swiglu`
(Triton on CUDA, the reference elsewhere); results travel back by the reverse all-to-all and are
combined in the original token order with the router's weights.

Expert parameters are flagged the way DeepSpeed's own MoE flags them (`param.allreduce = False`,
`param.group_name = "ep_size_<P>"`), so DeepSpeed reduces their gradients over the expert-data-
parallel group of their shard only and puts them in MoE optimizer groups. This module depends on
`torch.distributed` only; it never imports deepspeed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from zoo.kernels import ops
from zoo.moe.experts import SwiGLUExperts
from zoo.moe.layer import SparseMoE


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert groups of size `ep_size` (`deepspeed.moe.layer.MoE` uses it)."""
    return f"ep_size_{ep_size}"


def is_expert_param(param: torch.Tensor) -> bool:
    """Whether `param` is flagged as an expert parameter (DeepSpeed's `is_moe_param` rule)."""
    return getattr(param, "allreduce", True) is False


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` with variable splits; its backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv, group=ctx.group)
        return out, None, None, None


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    # gloo has no bfloat16/float16 all-to-all: move those as float32 (exact), keep the dtype.
    if dist.get_backend(group) == "gloo" and x.dtype in (torch.bfloat16, torch.float16):
        return _AllToAll.apply(x.float(), send, recv, group).to(x.dtype)
    return _AllToAll.apply(x, send, recv, group)


GRAD_ROWS = "zoo_grad_rows"  # a stacked parameter's per-row gradient multiplier [E, 1, ...] (ESFT, MoExtend)


def _carry_marks(full: nn.Parameter, shard: nn.Parameter, rows: slice) -> None:
    """Give a shard what row-level training set on the full parameter: requires_grad, the no-decay
    flag, and its rows of a gradient row mask (`GRAD_ROWS`), re-applied as a hook on the shard."""
    shard.requires_grad_(full.requires_grad)
    if getattr(full, "zoo_no_decay", False):
        shard.zoo_no_decay = True
    mask = getattr(full, GRAD_ROWS, None)
    if mask is not None:
        local = mask[rows].to(device=shard.device, dtype=shard.dtype)
        setattr(shard, GRAD_ROWS, local)
        shard.register_hook(lambda g, local=local: g * local)


class ExpertParallelSwiGLUExperts(nn.Module):
    """This rank's shard of E SwiGLU experts; tokens for other shards travel by all-to-all.

    Rank r of a group of size P holds experts `[r * E / P, (r + 1) * E / P)`. Every rank of the
    group must call `forward` the same number of times in the same order (each call is a
    collective), with any number of tokens, zero included.

    Args:
        num_experts: E, the global expert count.
        hidden_size: d.
        intermediate_size: f.
        group: the expert-parallel process group (P ranks); P must divide E.
        group_name: the DeepSpeed group name written on the parameters (default `ep_size_<P>`).

    Parameters:
        gate_up_proj: `[E / P, 2f, d]`, this rank's experts only.
        down_proj: `[E / P, d, f]`.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        group: dist.ProcessGroup | None,
        group_name: str | None = None,
    ) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("ExpertParallelSwiGLUExperts: torch.distributed is not initialized (call init_process_group first)")
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if num_experts % self.ep_size:
            raise ValueError(
                f"ExpertParallelSwiGLUExperts: {num_experts} experts cannot be split evenly over an expert-parallel "
                f"group of {self.ep_size} ranks; choose an ep_size that divides the expert count"
            )
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        self.expert_offset = self.ep_rank * self.num_local_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.group_name = group_name or expert_group_name(self.ep_size)
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_local_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_local_experts, hidden_size, intermediate_size))
        for p in (self.gate_up_proj, self.down_proj):
            p.allreduce = False
            p.group_name = self.group_name

    @classmethod
    def from_experts(
        cls, experts: SwiGLUExperts, group: dist.ProcessGroup | None, group_name: str | None = None
    ) -> ExpertParallelSwiGLUExperts:
        """This rank's shard of `experts` (weights copied; same device, dtype and requires_grad)."""
        ref = experts.gate_up_proj
        shard = cls(experts.num_experts, experts.hidden_size, experts.intermediate_size, group, group_name)
        shard = shard.to(device=ref.device, dtype=ref.dtype)
        local = slice(shard.expert_offset, shard.expert_offset + shard.num_local_experts)
        with torch.no_grad():
            shard.gate_up_proj.copy_(experts.gate_up_proj[local])
            shard.down_proj.copy_(experts.down_proj[local])
        for name in ("gate_up_proj", "down_proj"):
            _carry_marks(getattr(experts, name), getattr(shard, name), local)
        return shard

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Combine the chosen experts' outputs, wherever those experts live.

        Args:
            x: `[T, d]` this rank's tokens.
            weights: `[T, k]` combine weights.
            indices: `[T, k]` global expert ids in `[0, E)`.

        Returns:
            `[T, d]`: sum over the k chosen experts of weight * expert(x), as `SwiGLUExperts` would.
        """
        if self.ep_size == 1:
            return ops.moe_swiglu(x, weights, indices, self.gate_up_proj, self.down_proj)
        num_tokens, top_k = indices.shape
        order, counts = ops.sort_by_expert(indices, self.num_experts)  # [T*k], [E]
        token_of = order // top_k  # [N]
        xs = x.index_select(0, token_of)  # [N, d], grouped by expert, hence by owning rank
        # Counts first: rank p learns how many tokens each source sends to each of its local experts.
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv_counts = recv_counts.view(self.ep_size, self.num_local_experts)  # [P, E/P] by source rank
        send = counts.view(self.ep_size, self.num_local_experts).sum(1).tolist()
        recv = recv_counts.sum(1).tolist()
        received = _exchange(xs, send, recv, self.group)  # [M, d], by source rank then local expert
        local_ids = torch.arange(self.num_local_experts, device=x.device).repeat(self.ep_size)  # [P * E/P]
        local_idx = local_ids.repeat_interleave(recv_counts.reshape(-1)).unsqueeze(1)  # [M, 1]
        ones = torch.ones(local_idx.shape, dtype=torch.float32, device=x.device)  # [M, 1]
        out = ops.moe_swiglu(received, ones, local_idx, self.gate_up_proj, self.down_proj)  # [M, d]
        if received.shape[0] == 0:
            # No token reached this shard. Keep `received` and the parameters in the graph anyway:
            # every rank must run the backward all-to-all of both exchanges (a collective), and
            # every rank's experts must get a (zero) gradient for the gradient reduction.
            out = received * 0 + 0.0 * (self.gate_up_proj.sum() + self.down_proj.sum())
        back = _exchange(out, recv, send, self.group)  # [N, d], in xs's order
        ys = back * weights.reshape(-1)[order].unsqueeze(-1).to(x.dtype)  # [N, d]
        return x.new_zeros(num_tokens, self.hidden_size).index_add(0, token_of, ys)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, local_experts=[{self.expert_offset}, "
            f"{self.expert_offset + self.num_local_experts}), ep_size={self.ep_size}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}"
        )


def _sparse_moes(model: nn.Module) -> list[tuple[str, SparseMoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SparseMoE)]


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None, *, group_name: str | None = None,
                  only: list[SparseMoE] | None = None) -> nn.Module:
    """Shard the experts of every `SparseMoE` in `model` over `group` (in place).

    The model must be built identically on every rank of the group (same seed or same checkpoint):
    each rank keeps its own slice of the experts it holds.

    Args:
        model: a built model containing `SparseMoE` layers with `SwiGLUExperts`.
        group: the expert-parallel group; None means the whole world.
        group_name: name written on the expert parameters (`param.group_name`), default
            `ep_size_<group size>` (DeepSpeed's name for that group).

    Returns:
        `model`, with `ExpertParallelSwiGLUExperts` in place of each `SwiGLUExperts`.

    Raises:
        ValueError: the model has no `SparseMoE`, a layer's experts are not `SwiGLUExperts`
            (e.g. already sharded), or the group size does not divide the expert count.
        only: shard these layers only (default: every `SparseMoE`).
        RuntimeError: torch.distributed is not initialized.
    """
    layers = _sparse_moes(model)
    if only is not None:  # e.g. the LM's trainable SwiGLU layers; the rest (a vision tower's MoE) stay replicated
        layers = [(n, m) for n, m in layers if any(m is o for o in only)]
    if not layers:
        raise ValueError(f"shard_experts: {type(model).__name__} contains no SparseMoE layer to shard")
    for name, moe in layers:
        if not isinstance(moe.experts, SwiGLUExperts):
            raise ValueError(
                f"shard_experts: {name}.experts is {type(moe.experts).__name__}; only SwiGLUExperts can be sharded"
                + (" (this model is already sharded)" if isinstance(moe.experts, ExpertParallelSwiGLUExperts) else "")
            )
    for _, moe in layers:
        moe.experts = ExpertParallelSwiGLUExperts.from_experts(moe.experts, group, group_name)
    return model


def unshard_experts(model: nn.Module) -> nn.Module:
    """Gather every expert shard back into full `SwiGLUExperts` on every rank (in place).

    A collective: every rank of each expert-parallel group must call it. Use it before exporting
    or evaluating a model trained with expert parallelism in one process.

    Returns:
        `model`, with `SwiGLUExperts` holding all E experts in place of each shard.

    Raises:
        ValueError: the model has no sharded experts.
    """
    layers = [(n, m) for n, m in _sparse_moes(model) if isinstance(m.experts, ExpertParallelSwiGLUExperts)]
    if not layers:
        raise ValueError(f"unshard_experts: {type(model).__name__} has no ExpertParallelSwiGLUExperts to gather")
    for _, moe in layers:
        shard = moe.experts
        full = SwiGLUExperts(shard.num_experts, shard.hidden_size, shard.intermediate_size)
        full = full.to(device=shard.gate_up_proj.device, dtype=shard.gate_up_proj.dtype)
        with torch.no_grad():
            for name in ("gate_up_proj", "down_proj"):
                local = getattr(shard, name).detach().contiguous()
                parts = [torch.empty_like(local) for _ in range(shard.ep_size)]
                dist.all_gather(parts, local, group=shard.group)
                getattr(full, name).copy_(torch.cat(parts))
                getattr(full, name).requires_grad_(getattr(shard, name).requires_grad)
        moe.experts = full
    return model


__all__ = ["GRAD_ROWS", "ExpertParallelSwiGLUExperts", "expert_group_name", "is_expert_param", "shard_experts", "unshard_experts"]
