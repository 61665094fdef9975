"""Routing overrides at inference: k per layer, rank-r routing, disabled and forced experts.

`override_routing(model, top_k=, rank=, disable=, force=)` changes what the routers of the
`SparseMoE` layers in `model` decide, for the duration of a `with` block, without touching a
weight or a buffer: a forward hook on each named layer's router rewrites its `RouterOutput` from
the router's own logits, and every hook is removed on exit (scoped like `capture_routing`).
Prefill and every KV-cached decode step go through the same hooks, so generation under an
override needs nothing else::

    with override_routing(model, top_k={0: 1, 2: 4}, disable={1: [3]}):
        model.generate(**batch, max_new_tokens=8)

What each option means (for every router in `zoo.moe.ROUTERS`):

* `top_k=k`: each token gets exactly its k best choices by the router's own score (SMoE-Dropout's
  self-slimming at any k, Chen et al. 2023, without `set_active_k` changing its buffer). For
  routers whose k is not a top-k this turns them into top-k routing of their scores with their own
  weighting: `topp`, `dynmole`, `loramoe` and `expert_choice` keep the raw softmax probabilities
  (none of them renormalizes), so expert choice becomes token choice (and causal); `null_experts`
  counts k among its E + N choices, a null choice staying an empty slot; `kmeans` takes the k
  nearest centroids with weight 1/k each (1 at k = 1, as the router does).
  `deepseek_v3` ranks by affinity + selection bias, its group limit first (the experts of a
  token's best groups before the others), and weights the chosen by their affinities, normalized
  and scaled as the router does; its capacity (a training-time bound) is not applied.
* `rank=r`: each token gets only its r-th best choice, weighted as the router weights a single
  choice (1 for renormalizing routers): SCMoE's rank-r weak activation (Shi et al. 2024).
* `disable=[e, ...]`: those experts are never chosen. A disabled expert is removed from the router
  as if the layer had been built without it: its logit is -inf before the router's normalization
  (softmax routers renormalize over the remaining experts; top-p reaches p among them; expert
  choice spreads its capacity over the remaining experts). For routers that renormalize the chosen
  weights (top-k with `norm_topk_prob`, SMoE-Dropout, null experts) this is the same as dropping
  it from the ranking.
* `force=[e, ...]`: those experts are always chosen; they take slots first and the router's rule
  fills the rest (top-k: k - |force| best others; top-p: the smallest set holding them that reaches
  p; expert choice: the expert takes every real token). A forced expert is weighted by the
  router's own rule (its probability, renormalized where the router renormalizes), not boosted.

Without `top_k` / `rank` each router keeps its own count rule (its k, p, capacity, entropy switch),
applied to the masked logits; a router left with fewer experts than its own k uses all that are left. The output's `logits` stay the router's (aux losses and routing
stats see the real scores); `weights` and `indices` are the override's.

Each value is one setting for every MoE layer in `model`, or a mapping from a layer to its setting:
an int is the layer index `capture_routing` reports (`layers.3` -> 3), a str the `SparseMoE`'s
module path inside `model`. To override only the language model of a multimodal model, pass it
(`model.language_model`). Nested overrides: the innermost block's setting replaces an outer one on
the layers it names (each hook recomputes from the logits).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from zoo.moe.capture import _LAYER_RE
from zoo.moe.layer import SparseMoE
from zoo.moe.losses import tsallis_entropy_per_token
from zoo.moe.routers import EMPTY, ROUTERS, RouterOutput
from zoo.moe.routers.base import check_range
from zoo.moe.routers.expert_choice import expert_capacity
from zoo.moe.routers.topp import top_p_count


@dataclass(frozen=True)
class RoutingOverride:
    """What one MoE layer's router decides differently inside `override_routing`.

    Attributes:
        top_k: exactly this many choices per token (None: the router's own count).
        rank: only the r-th best choice per token, 1-based (None: off). Excludes `top_k` and `force`.
        disable: expert ids never chosen.
        force: expert ids always chosen.
    """

    top_k: int | None = None
    rank: int | None = None
    disable: tuple[int, ...] = ()
    force: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.top_k is not None:
            check_range("top_k", self.top_k, 1, math.inf, integer=True)
        if self.rank is not None:
            check_range("rank", self.rank, 1, math.inf, integer=True)
            if self.top_k is not None:
                raise ValueError(f"rank={self.rank} and top_k={self.top_k} both given: rank-r routing uses one expert per token")
            if self.force:
                raise ValueError(f"rank={self.rank} and force={list(self.force)} both given: rank-r routing uses one expert per token")
        for name in ("disable", "force"):
            for e in getattr(self, name):
                check_range(f"{name} expert id", e, 0, math.inf, integer=True)
        both = sorted(set(self.disable) & set(self.force))
        if both:
            raise ValueError(f"expert(s) {both} are both disabled and forced")
        if self.top_k is not None and len(self.force) > self.top_k:
            raise ValueError(f"force names {len(self.force)} experts {list(self.force)} but top_k={self.top_k} slots hold them")

    def validate_for(self, router: nn.Module) -> None:
        """Raise naming the cause if this override does not fit `router` (expert ids, k against E)."""
        num_experts = router.num_experts
        for name in ("disable", "force"):
            for e in getattr(self, name):
                check_range(f"{name} expert id", e, 0, num_experts - 1, integer=True)
        if len(set(self.disable)) >= num_experts:
            raise ValueError(f"disable={sorted(self.disable)} leaves no expert of the {num_experts}")
        choices = num_choices(router)
        left = choices - len(set(self.disable))
        what = f"num_experts={num_experts}" + (f" + {choices - num_experts} null choices" if choices > num_experts else "")
        what += f", {len(set(self.disable))} disabled" if self.disable else ""
        for name in ("top_k", "rank"):
            value = getattr(self, name)
            if value is not None and value > left:
                raise ValueError(f"{name}={value} must be an integer in [1, {left}] ({what})")


@dataclass(frozen=True)
class RerouteRule:
    """How one router kind ranks, counts and weights its choices (what an override recomputes).

    Attributes:
        scores: `(router, masked_logits [T, R]) -> [T, R]` ranking scores, higher is better
            (disabled choices: logit -inf in, lowest score out).
        count: `(router, sorted_scores [T, R]) -> [T]` the router's own number of choices per token,
            given its scores in rank order (forced experts first, disabled last).
        slots: `router -> K` the router's own slot count.
        weigh: `(router, picked_scores [T, K], keep [T, K] bool, picked [T, K] choice ids) ->
            [T, K]` float32 combine weights of the kept choices (0 elsewhere).
        rank_key: `(router, scores [T, R]) -> [T, R]` what ranks the choices when it is not the
            score (DeepSeek-V3: affinity + selection bias); None: the scores.
        allowed: `(router, rank_key [T, R], disabled choices -inf) -> [T, R]` bool, the choices a
            token may take before any other (DeepSeek-V3's group limit); the others rank after
            them (before the disabled). None: all.
    """

    scores: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    count: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    slots: Callable[[nn.Module], int]
    weigh: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    rank_key: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    allowed: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None


def _softmax(router, logits):
    return torch.softmax(logits, dim=-1)


def _identity(router, logits):
    return logits


def _fixed(n_of: Callable[[nn.Module], int]):
    def count(router, sorted_scores):
        return torch.full(sorted_scores.shape[:1], n_of(router), dtype=torch.long, device=sorted_scores.device)
    return count


def _raw(router, picked, keep, ids):
    return torch.where(keep, picked, torch.zeros_like(picked))


def _renormalized(picked, keep):
    w = torch.where(keep, picked, torch.zeros_like(picked))
    total = w.sum(dim=-1, keepdim=True)
    return w / torch.where(total > 0, total, torch.ones_like(total))


def _topk_weigh(router, picked, keep, ids):
    return _renormalized(picked, keep) if router.norm_topk_prob else _raw(router, picked, keep, ids)


def _null_weigh(router, picked, keep, ids):
    return _renormalized(picked, keep & (ids < router.num_experts))  # null choices are empty slots


def _softmax_of_kept(router, picked, keep, ids):
    w = torch.softmax(picked.masked_fill(~keep, -math.inf), dim=-1)
    return torch.nan_to_num(w, nan=0.0)


def _uniform(router, picked, keep, ids):
    n = keep.sum(dim=-1, keepdim=True).clamp_min(1)
    return keep.float() / n


def _deepseek_scores(router, logits):
    return router.scores(logits)


def _deepseek_key(router, scores):
    return scores + router.e_score_correction_bias.float().to(scores.device)


def _deepseek_allowed(router, key):
    from zoo.moe.routers.deepseek_v3 import group_limited_mask

    return group_limited_mask(key.masked_fill(torch.isneginf(key), -1e30), router.n_group, router.topk_group)


def _deepseek_weigh(router, picked, keep, ids):
    w = _renormalized(picked, keep) if router.norm_topk_prob else _raw(router, picked, keep, ids)
    return w * router.routed_scaling_factor


def _topp_count(router, sorted_probs):
    return top_p_count(sorted_probs, router.p).clamp(max=router.max_k)


def _dynmole_count(router, sorted_probs):
    n = top_p_count(sorted_probs, router.p).clamp(min=router.keep_top_k)
    uncertain = tsallis_entropy_per_token(sorted_probs, router.q) > router.entropy_threshold
    return torch.where(uncertain, torch.full_like(n, sorted_probs.shape[-1]), n)  # clamped to the allowed later


REROUTE_RULES: dict[str, RerouteRule] = {
    "topk": RerouteRule(_softmax, _fixed(lambda r: r.top_k), lambda r: r.top_k, _topk_weigh),
    "topp": RerouteRule(_softmax, _topp_count, lambda r: r.max_k, _raw),
    "null_experts": RerouteRule(_softmax, _fixed(lambda r: r.top_k), lambda r: r.top_k, _null_weigh),
    # Expert choice's own rule is column-wise (see `_expert_choice`); this entry serves top_k / rank.
    "expert_choice": RerouteRule(_softmax, _fixed(lambda r: r.num_experts), lambda r: r.num_experts, _raw),
    "dynmole": RerouteRule(_softmax, _dynmole_count, lambda r: r.num_experts, _raw),
    "smoe_dropout": RerouteRule(_identity, _fixed(lambda r: int(r.active_k)), lambda r: int(r.active_k), _softmax_of_kept),
    "kmeans": RerouteRule(_identity, _fixed(lambda r: 1), lambda r: 1, _uniform),
    "loramoe": RerouteRule(_softmax, _fixed(lambda r: r.num_experts), lambda r: r.num_experts, _raw),
    # DeepSeek-V3: ranked by affinity + selection bias inside the token's best groups, weighted by the
    # affinities of the chosen (normalized, scaled); capacity is a training-time bound, not applied here.
    "deepseek_v3": RerouteRule(_deepseek_scores, _fixed(lambda r: r.top_k), lambda r: r.top_k, _deepseek_weigh,
                               rank_key=_deepseek_key, allowed=_deepseek_allowed),
}
"""Registered router name -> its `RerouteRule`. A new router adds its entry here (a test insists)."""


def router_name(router: nn.Module) -> str:
    """The `ROUTERS` name of `router`'s class; raises naming it when it is not registered."""
    for name in ROUTERS.names():
        if type(router) is ROUTERS.get(name):
            return name
    raise ValueError(f"override_routing: router {type(router).__name__} is not registered in zoo.moe.ROUTERS")


def num_choices(router: nn.Module) -> int:
    """R, the choices a router ranks: E, or E + N for null experts."""
    return router.num_experts + getattr(router, "num_null", 0)


def _expert_choice(router, logits, override: RoutingOverride, mask):
    """Expert choice's own rule over the experts left: each takes its top-C real tokens; forced take all."""
    scores = torch.softmax(logits, dim=-1)  # [T, E], disabled experts 0
    T, E = scores.shape
    real = torch.ones(T, dtype=torch.bool, device=logits.device) if mask is None else mask.reshape(-1).bool()
    capacity = expert_capacity(int(real.sum()), E - len(override.disable), router.capacity_factor)
    ranked = scores.masked_fill(~real[:, None], -1.0)
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen.scatter_(0, torch.sort(ranked, dim=0, descending=True, stable=True).indices[:capacity], True)
    if override.disable:
        chosen[:, list(override.disable)] = False
    if override.force:
        chosen[:, list(override.force)] = real[:, None]
    weights = scores * chosen
    indices = torch.where(chosen, torch.arange(E, device=logits.device).expand_as(chosen),
                          torch.full((), EMPTY, dtype=torch.long, device=logits.device))
    return weights, indices


def reroute(router: nn.Module, logits: torch.Tensor, override: RoutingOverride,
            mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A router's decision under `override`, recomputed from its logits.

    Args:
        router: a router registered in `ROUTERS` (its options: k, p, normalization, ...).
        logits: `[T, R]` the router's logits for T tokens.
        override: what to change.
        mask: `[T]` real tokens (expert choice's capacity counts only them).

    Returns:
        `(weights [T, K] float32, indices [T, K] int64)`, empty slots -1 with weight 0.
    """
    name = router_name(router)
    masked = logits.float()
    if override.disable:
        masked = masked.clone()
        masked[:, list(override.disable)] = -math.inf
    if name == "expert_choice" and override.top_k is None and override.rank is None:
        return _expert_choice(router, masked, override, mask)
    rule = REROUTE_RULES[name]
    T, R = masked.shape
    scores = rule.scores(router, masked)  # [T, R]
    key = scores if rule.rank_key is None else rule.rank_key(router, scores)
    # Rank: by key (ties: lower id), then forced first, outside the allowed next to last, disabled last (stable).
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # [T, R]
    group = torch.zeros(R, dtype=torch.long, device=masked.device)
    group[list(override.force)] = -1
    group[list(override.disable)] = 2
    group = group.expand(T, R)
    if rule.allowed is not None:
        disabled = group == 2
        outside = ~rule.allowed(router, key.masked_fill(disabled, -math.inf))
        group = torch.where(outside & (group == 0), torch.ones_like(group), group)
    order = order.gather(1, torch.sort(group.gather(1, order), dim=-1, stable=True).indices)
    allowed = R - len(override.disable)
    if override.rank is not None:
        picked = order[:, override.rank - 1: override.rank]  # [T, 1]
        keep = torch.ones_like(picked, dtype=torch.bool)
    else:
        if override.top_k is not None:
            n = torch.full((T,), override.top_k, dtype=torch.long, device=masked.device)
            K = override.top_k
        else:
            n = rule.count(router, scores.gather(1, order))
            K = min(max(rule.slots(router), len(override.force)), allowed)
        n = n.clamp(min=len(override.force), max=allowed)
        picked = order[:, :K]  # [T, K]
        keep = torch.arange(K, device=masked.device)[None, :] < n[:, None]
    weights = rule.weigh(router, scores.gather(1, picked), keep, picked).float()
    filled = keep & (picked < router.num_experts)
    indices = torch.where(filled, picked, torch.full((), EMPTY, dtype=torch.long, device=masked.device))
    return weights.masked_fill(~filled, 0.0), indices


# --- the context manager ----------------------------------------------------------------------------

RoutingPlan = dict[str, tuple[SparseMoE, RoutingOverride]]
"""Module path of each overridden `SparseMoE` -> (the layer, its override)."""


def moe_layers(model: nn.Module) -> dict[str, tuple[int | None, SparseMoE]]:
    """Every `SparseMoE` in `model`: module path -> (layer index parsed from the path or None, layer)."""
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, SparseMoE):
            match = _LAYER_RE.search(path)
            found[path] = (int(match.group(1)) if match else None, module)
    return found


def _as_ids(option: str, value) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, Sequence) and not isinstance(value, str):
        ids = []
        for e in value:
            check_range(f"{option} expert id", e, 0, math.inf, integer=True)
            ids.append(int(e))
        return tuple(sorted(set(ids)))
    raise ValueError(f"{option}={value!r} must be an expert id or a list of expert ids (or a mapping layer -> those)")


def _per_layer(option: str, value, layers: dict[str, tuple[int | None, SparseMoE]]) -> dict[str, object]:
    """Spread one option over the layers it names: path -> value."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        return {path: value for path in layers}
    out = {}
    indices = sorted({i for i, _ in layers.values() if i is not None})
    for key, v in value.items():
        if isinstance(key, str):
            if key not in layers:
                raise ValueError(f"override_routing: {option} names layer {key!r}, but the MoE layers of the model are "
                                 f"{sorted(layers)}")
            paths = [key]
        elif isinstance(key, int) and not isinstance(key, bool):
            paths = [p for p, (i, _) in layers.items() if i == key]
            if not paths:
                raise ValueError(f"override_routing: {option} names layer {key}, but the model's MoE layers are {indices}")
            if len(paths) > 1:
                raise ValueError(f"override_routing: {option} layer {key} is ambiguous ({paths}); name the module path "
                                 "or pass the submodule that holds the layers you mean")
        else:
            raise ValueError(f"override_routing: {option} layer keys must be layer indices or module paths, got {key!r}")
        for p in paths:
            out[p] = v
    return out


def resolve_overrides(model: nn.Module, *, top_k=None, rank=None, disable=None, force=None) -> RoutingPlan:
    """Check the options against `model`'s MoE layers and build the per-layer plan.

    Args: see `override_routing`.

    Raises:
        ValueError: naming the cause (no MoE layer, an unknown layer, k or rank outside [1, E], an
            expert id outside [0, E), an expert both disabled and forced, more forced experts than k).
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"override_routing: {type(model).__name__} has no SparseMoE layer to override")
    spread = {name: _per_layer(name, value, layers)
              for name, value in (("top_k", top_k), ("rank", rank), ("disable", disable), ("force", force))}
    plan: RoutingPlan = {}
    for path in layers:
        given = {name: per[path] for name, per in spread.items() if path in per}
        if not given:
            continue
        index, moe = layers[path]
        where = f"layer {index if index is not None else path!r}"
        try:
            override = RoutingOverride(
                top_k=given.get("top_k"), rank=given.get("rank"),
                disable=_as_ids("disable", given["disable"]) if "disable" in given else (),
                force=_as_ids("force", given["force"]) if "force" in given else (),
            )
            router_name(moe.router)
            override.validate_for(moe.router)
        except ValueError as e:
            raise ValueError(f"override_routing: {where}: {e}") from None
        plan[path] = (moe, override)
    return plan


@contextmanager
def apply_overrides(plan: RoutingPlan) -> Iterator[None]:
    """Install a resolved plan's router hooks for the block (see `override_routing`)."""

    def hook_for(override: RoutingOverride):
        def hook(router, args, kwargs, output: RouterOutput) -> RouterOutput:
            mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
            weights, indices = reroute(router, output.logits, override, mask)
            return RouterOutput(output.logits, weights, indices)
        return hook

    handles = [moe.router.register_forward_hook(hook_for(override), with_kwargs=True) for moe, override in plan.values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def override_routing(model: nn.Module, *, top_k=None, rank=None, disable=None, force=None) -> Iterator[dict[str, RoutingOverride]]:
    """Override the routing of `model`'s MoE layers inside the block; nothing stays on any module after it.

    Args:
        model: any module holding `SparseMoE` layers (an `MoECausalLM`, a `MultimodalMoE`, a bare decoder).
        top_k: k for every layer, or `{layer: k}`; 1 <= k <= E (E + N for null experts) minus disabled.
        rank: r for every layer, or `{layer: r}`: only the r-th best choice per token.
        disable: expert ids never chosen (`[e, ...]` for every layer, or `{layer: [e, ...]}`).
        force: expert ids always chosen (same forms); at most k of them.

    Yields:
        The module path -> `RoutingOverride` of each overridden layer.

    Raises:
        ValueError: naming the cause (see `resolve_overrides`).
    """
    plan = resolve_overrides(model, top_k=top_k, rank=rank, disable=disable, force=force)
    with apply_overrides(plan):
        yield {path: override for path, (_, override) in plan.items()}


__all__ = ["REROUTE_RULES", "RerouteRule", "RoutingOverride", "RoutingPlan", "apply_overrides", "moe_layers",
           "num_choices", "override_routing", "reroute", "resolve_overrides", "router_name"]
