"""MoExtend: add experts to a trained MoE for a new modality or task, everything old frozen.

Zhong et al., 2024, "MoExtend: Tuning New Experts for Modality and Task Extension": M new experts
join each extended MoE layer, the router gains M rows, and only those are trained, so the old
experts, the old router rows and every other weight stay bit-identical (the model's behaviour on
old data changes only through tokens that the new rows win). Initialization, where the paper
leaves the form to the implementation (our choice, stated): new expert j of a layer copies the
old expert that the new data selects most in that layer (`expert_relevance`, token ratio), and
its router row copies that expert's row, so the new expert starts where the new data already goes
and training moves it apart.

Routers whose whole state is a `weight [E, d]` can be extended (top-k, top-p, DynMoLE,
expert-choice); others are refused, naming their state.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from zoo.moe.config import MoEConfig
from zoo.moe.experts import EXPERTS
from zoo.moe.routers import ROUTERS


def _check_router(router: nn.Module, num_experts: int, where: str) -> None:
    state = router.state_dict()
    if set(state) != {"weight"} or tuple(state["weight"].shape[:1]) != (num_experts,):
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        raise ValueError(f"{where}: MoExtend adds rows to a router whose state is one weight [E, d]; "
                         f"{type(router).__name__} has {shapes}")


def extend_moe(moe, cfg: MoEConfig, num_new: int, init_from: list[int], where: str = "extend") -> None:
    """Give `moe` (a `SparseMoE` built from `cfg`) `num_new` more experts, in place.

    Args:
        moe: the layer.
        cfg: its `MoEConfig` (router kind and options, expert kind).
        num_new: M >= 1.
        init_from: for each new expert, the old expert it starts as (length M).
    """
    if num_new < 1:
        raise ValueError(f"{where}: the number of new experts must be >= 1, got {num_new}")
    old = moe.experts
    e = old.num_experts
    if len(init_from) != num_new or not all(0 <= i < e for i in init_from):
        raise ValueError(f"{where}: init_from must name {num_new} of the old experts 0..{e - 1}, got {init_from}")
    _check_router(moe.router, e, where)
    kind, options = cfg.experts_kind()
    new = EXPERTS.build(kind, options, num_experts=e + num_new, hidden_size=old.hidden_size,
                        intermediate_size=old.intermediate_size)
    router = ROUTERS.build(cfg.router, cfg.router_options, hidden_size=old.hidden_size, num_experts=e + num_new)
    ref = next(old.parameters())
    new, router = new.to(device=ref.device, dtype=ref.dtype), router.to(device=ref.device, dtype=moe.router.weight.dtype)
    with torch.no_grad():
        for name, p in new.named_parameters(recurse=False):
            src = getattr(old, name)
            p.copy_(torch.cat([src, src[init_from]]))
        router.weight.copy_(torch.cat([moe.router.weight, moe.router.weight[init_from]]))
    moe.experts, moe.router = new, router


def old_row_masks(moe, num_old: int) -> list:
    """Gradient hooks zeroing rows `< num_old` of the layer's stacked experts and router weight."""
    from zoo.transforms.esft import row_mask

    handles = []
    for p in [*moe.experts.parameters(recurse=False), moe.router.weight]:
        handles.append(row_mask(p, list(range(num_old)), keep=False))
        p.zoo_no_decay = True  # AdamW's decoupled decay would move the frozen rows
    return handles


def extended_params(moes: Mapping[int, nn.Module]) -> list[nn.Parameter]:
    """The stacked expert parameters and router weights of the extended layers."""
    return [p for moe in moes.values() for p in [*moe.experts.parameters(recurse=False), moe.router.weight]]


__all__ = ["extend_moe", "extended_params", "old_row_masks"]
