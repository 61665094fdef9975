"""Reorder the experts of sparse MoE layers without changing what the model computes.

Expert e of a `SparseMoE` is row `[e]` of every stacked expert tensor together with the router
rows that score it (logit column e; `RouterOutput.logits` is `[T, R]` with the E experts first and
any non-expert choices, e.g. AdaMoE's null experts, after them). Moving both the same way gives
every token the same expert functions with the same combine weights, so the layer's output is
unchanged (up to the float summation order of a token's K slot contributions). A placement of
experts on devices (`zoo.inference.placement`, ExFlow) is applied this way: after the
permutation, the contiguous shards that expert parallelism takes (`zoo.moe.expert_parallel`: rank
r holds experts `[r E / P, (r + 1) E / P)`) are the placement's devices.

The rule is generic over `ROUTERS` and `EXPERTS`: every router tensor with a leading dimension of
at least E has its first E rows permuted (weights, K-means centroids and counts, SMoE-Dropout's
fixed projection); 0-dim state (schedules, flags) is left; the experts' own `[E, ...]` tensors are
permuted and their submodules (a frozen base FFN shared by LoRA experts) left. Each layer is then
checked on a probe batch: the permuted router must make the same decisions (its dense `[T, E]`
combine weights equal the old ones with columns permuted) and the layer the same output; a router
or experts module for which the rule does not hold is restored and refused by name. A buffer that
is not saved with the weights (LoRAMoE's expert groups, rebuilt from the options on load) must be
unchanged by the permutation, else a checkpoint could not hold it: such permutations are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

PROBE_TOKENS = 16


def _as_perm(perm: torch.Tensor | Sequence[int], num_experts: int, where: str) -> torch.Tensor:
    p = torch.as_tensor(perm, dtype=torch.long).reshape(-1).cpu()
    if p.numel() != num_experts or not torch.equal(torch.sort(p).values, torch.arange(num_experts)):
        raise ValueError(f"{where}: a permutation of the {num_experts} experts 0..{num_experts - 1} is needed, "
                         f"got {p.tolist()}")
    return p


def _tensors(module: nn.Module):
    """(owner, name, tensor, persistent) for every parameter and buffer of `module` and its submodules."""
    for owner in module.modules():
        for name, p in owner._parameters.items():
            if p is not None:
                yield owner, name, p, True
        for name, b in owner._buffers.items():
            if b is not None:
                yield owner, name, b, name not in owner._non_persistent_buffers_set


def _dense_weights(weights: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`[T, E]` combine weight of each expert per token (0 where not chosen)."""
    dense = torch.zeros(indices.shape[0], num_experts + 1, dtype=torch.float64, device=indices.device)
    slots = torch.where(indices < 0, num_experts, indices)
    return dense.scatter_add_(1, slots, weights.double())[:, :num_experts]


def _router_rows(router: nn.Module, perm: torch.Tensor, num_experts: int, where: str) -> list[torch.Tensor]:
    """The router tensors whose first E rows are its experts; raises naming one that is not."""
    name = type(router).__name__
    rows = []
    for _, key, t, persistent in _tensors(router):
        if t.dim() == 0:
            continue
        if t.shape[0] < num_experts:
            raise ValueError(f"{where}: router {name} holds {key} of shape {tuple(t.shape)}, whose rows are not "
                             f"its {num_experts} experts; it cannot be permuted")
        if not persistent and not torch.equal(t[:num_experts][perm.to(t.device)], t[:num_experts]):
            raise ValueError(f"{where}: router {name}'s buffer {key} is rebuilt from its options on load, not saved, "
                             f"and this permutation changes it ({t.tolist()} -> "
                             f"{t[:num_experts][perm.to(t.device)].tolist()}); permute experts only within what it groups")
        rows.append(t)
    return rows


def _expert_rows(experts: nn.Module, num_experts: int, where: str) -> list[torch.Tensor]:
    """The experts module's own stacked `[E, ...]` tensors; raises naming one that is not stacked."""
    name = type(experts).__name__
    own = [(k, t) for k, t in [*experts._parameters.items(), *experts._buffers.items()] if t is not None]
    for key, t in own:
        if t.dim() == 0 or t.shape[0] != num_experts:
            raise ValueError(f"{where}: experts {name} hold {key} of shape {tuple(t.shape)}, not stacked over its "
                             f"num_experts={num_experts} (a shard of expert parallelism?); it cannot be permuted")
    return [t for _, t in own]


def _reorder(tensors: list[torch.Tensor], perm: torch.Tensor, num_experts: int) -> None:
    """In place: rows `[:E]` of each tensor reordered by `perm` (rows past E stay)."""
    for t in tensors:
        t[:num_experts] = t[:num_experts][perm.to(t.device)]


@torch.no_grad()
def permute_moe(moe: nn.Module, perm: torch.Tensor | Sequence[int], *, where: str = "permute_moe") -> None:
    """Reorder one `SparseMoE`'s experts in place: new expert p is old expert `perm[p]`.

    Args:
        moe: the layer (router with `num_experts`, experts with stacked `[E, ...]` tensors).
        perm: `[E]`, a permutation of `0..E-1`.
        where: prefix of error messages (the layer's name).

    Raises:
        ValueError: `perm` is not a permutation of the layer's experts, a router or experts tensor
            has fewer rows than experts (a shard), the permutation changes a buffer that
            checkpoints do not save, or the reordered layer routes or computes differently on a
            probe batch (then it is put back as it was). Shapes are checked before anything runs.
    """
    experts, router = moe.experts, moe.router
    if getattr(moe, "expert_map", None) is not None:
        raise ValueError(f"{where}: the layer remaps expert ids ({type(moe.expert_map).__name__}, multi-adapter "
                         "serving); permute the base model before building the server")
    num_experts = experts.num_experts
    if router.num_experts != num_experts:
        raise ValueError(f"{where}: router scores {router.num_experts} experts but the layer has {num_experts}")
    perm = _as_perm(perm, num_experts, where)
    rows = _router_rows(router, perm, num_experts, where) + _expert_rows(experts, num_experts, where)
    ref = next(experts.parameters())
    dtype = ref.dtype
    probe = torch.randn(PROBE_TOKENS, router.hidden_size, generator=torch.Generator().manual_seed(0))
    probe = probe.to(device=ref.device, dtype=dtype)
    was_training = moe.training
    moe.eval()
    try:
        y0, r0 = moe(probe)
        _reorder(rows, perm, num_experts)
        try:
            y1, r1 = moe(probe)
            w0 = _dense_weights(r0.weights, r0.indices, num_experts)
            w1 = _dense_weights(r1.weights, r1.indices, num_experts)
            tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
            same_routing = torch.allclose(w1, w0[:, perm.to(w0.device)], rtol=tol, atol=tol)
            scale = float(y0.abs().max().clamp_min(1))
            same_output = torch.allclose(y1.double(), y0.double(), rtol=tol, atol=tol * scale)
            if not (same_routing and same_output):
                what = "routing" if not same_routing else "output"
                raise ValueError(f"{where}: permuting router {type(router).__name__} and experts "
                                 f"{type(experts).__name__} row by row changed the layer's {what} on a probe batch: "
                                 "their tensors are not one row per expert; this layer cannot be permuted")
        except Exception:
            _reorder(rows, torch.argsort(perm), num_experts)  # indexing is exact: the layer is as it was
            raise
    finally:
        moe.train(was_training)


def permute_experts(model: nn.Module, perms: Mapping[int, torch.Tensor | Sequence[int]]) -> nn.Module:
    """Reorder the experts of a model's MoE decoder layers in place (logits unchanged).

    Args:
        model: an `MoECausalLM`, or a `MultimodalMoE` whose language model is one.
        perms: decoder layer index -> `[E]` permutation (new expert p is old expert `perm[p]`);
            layers not named keep their order.

    Returns:
        `model`.

    Raises:
        ValueError: a named layer is not an MoE layer, or `permute_moe` refuses one (then the
            layers permuted before it are put back: the model is as it was).
    """
    from zoo.transforms.esft import moe_layers_of

    layers = moe_layers_of(model)
    unknown = sorted(set(perms) - set(layers))
    if unknown:
        raise ValueError(f"permute_experts: layer(s) {unknown} are not MoE layers (MoE layers: {sorted(layers)})")
    done = []
    try:
        for layer, perm in sorted(perms.items()):
            permute_moe(layers[layer], perm, where=f"permute_experts: layer {layer}")
            done.append((layer, torch.as_tensor(perm, dtype=torch.long).reshape(-1)))
    except ValueError:
        for layer, perm in reversed(done):
            permute_moe(layers[layer], torch.argsort(perm), where=f"permute_experts: undoing layer {layer}")
        raise
    return model


__all__ = ["permute_experts", "permute_moe"]
