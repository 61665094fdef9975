"""ExFlow expert placement: put experts that tokens use in succession on the same device.

Yao et al., 2024, "Exploiting Inter-Layer Expert Affinity for Accelerating Mixture-of-Experts
Model Inference" (ExFlow, IPDPS 2024, arXiv 2401.08383). In context-coherent expert parallelism a
token is not sent back to its home device after each MoE layer: the attention context is kept on
every device, so the token stays where its experts ran and one all-to-all per layer moves it to its
next experts (plain expert parallelism needs two: dispatch and combine). A token whose expert at
layer l+1 sits on the device of its expert at layer l does not move at all. Routing traces show a
strong inter-layer affinity, P(expert j at l+1 | expert i at l), and ExFlow places the experts of
every layer on G devices (E/G each, so every device keeps the same compute) to keep the likely
transitions on one device, solving an integer program.

The pieces, each usable alone:

- `RoutingTrace` / `routing_trace`: which experts each real token chose at each MoE decoder layer
  (from `zoo.moe.capture_routing`).
- `affinity_counts` / `affinity`: per pair of consecutive MoE layers, `C[i, j]` = tokens routed to
  i at l and to j at l+1, and `P(j | i) = C[i, j] / n_l(i)`.
- `contiguous_placement` (what expert parallelism does today), `greedy_placement` and
  `ilp_placement` (scipy's `milp`, HiGHS): `Placement`s that keep the balance constraint
  (checked on construction).
- `placement_cost`: the cross-device transitions (the program's objective) and the simulated
  all-to-all volume of context-coherent EP and of plain EP.
- `Placement.permutations` + `zoo.transforms.permute.permute_experts` / `permute_model_dir`: the
  placement applied to a model or a checkpoint, function-preserving, so the contiguous shards of
  `zoo.moe.expert_parallel` are the placement's devices.

Choices where the paper is vague or only treats top-1 routing (ours, stated):

- Top-K: a token contributes every pair (i in S_l, j in S_{l+1}) of its chosen experts to
  `C`; `P(j | i)` then sums over j to the mean number of experts at l+1 of the tokens that chose i
  (1 for top-1). Empty slots (`-1`) are no choice.
- Objective: minimize `sum_l sum_ij C_l[i, j] [dev_l(i) != dev_{l+1}(j)]` over all consecutive
  pairs jointly, in one program (`same_l(i, j, g) <= x_l(i, g), x_{l+1}(j, g)` linearized, with
  the valid cuts `sum_j same_l(i, j, g) <= (E_{l+1}/G) x_l(i, g)` and the devices' symmetry broken
  by putting layer 0's expert e on a device <= e). Balance: every device holds exactly E_l/G
  experts of every layer. `time_limit` bounds the solve; `Placement.optimal` says whether HiGHS
  proved optimality (relative gap 0). The LP relaxation is weak (all x = 1/G keeps every
  transition), so at 16 experts x 4 layers HiGHS does not close the gap in a minute; the greedy
  placement's objective is then a cutoff (`at_least_greedy`) and the fallback, so the program never
  returns a worse placement than the baseline.
- Greedy baseline: layer 0 contiguous; then layer by layer, the (expert, device) pair with the
  most transitions from the device's experts of the previous layer is placed first, while the
  device has room.
- Cost model, in token vectors (d numbers) sent between devices, over the transitions between
  consecutive MoE layers (what placement changes; the first dispatch from a token's home and the
  return to it for the LM head are the same for every balanced placement and not counted):
  context-coherent EP (ExFlow): after layer l the token's output is split over the devices of its
  layer-l experts (one partial sum per device); each of them sends its part to every other device
  that runs one of the token's layer-(l+1) experts, i.e. `|D_l| |D_{l+1}| - |D_l & D_{l+1}|`
  messages (for top-1: 1 if the two experts are on different devices). A token with no expert at
  a layer keeps its place; one with none yet is at its home device, uniform over the G devices.
  Plain EP: the token goes home after every MoE layer: `2 |D_l| (G - 1) / G` messages per layer
  in expectation over a uniform home (dispatch + combine). The attention context's all-gather that
  ExFlow adds is the same for every placement and not counted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

# --- traces ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingTrace:
    """The experts each token chose at each MoE layer, over the same tokens in the same order.

    Attributes:
        layers: decoder layer index of each MoE layer, strictly increasing.
        indices: per layer `[T, K_l]` int64 expert ids, -1 for an empty slot.
        num_experts: per layer E_l.
    """

    layers: tuple[int, ...]
    indices: tuple[torch.Tensor, ...]
    num_experts: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "num_experts", tuple(int(e) for e in self.num_experts))
        object.__setattr__(self, "indices", tuple(torch.as_tensor(i, dtype=torch.long).cpu() for i in self.indices))
        if not self.layers:
            raise ValueError("RoutingTrace: no MoE layer")
        if len(self.indices) != len(self.layers) or len(self.num_experts) != len(self.layers):
            raise ValueError(f"RoutingTrace: {len(self.layers)} layers but {len(self.indices)} index tensors and "
                             f"{len(self.num_experts)} expert counts")
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise ValueError(f"RoutingTrace: layers must be strictly increasing, got {list(self.layers)}")
        tokens = None
        for layer, idx, e in zip(self.layers, self.indices, self.num_experts):
            if idx.dim() != 2:
                raise ValueError(f"RoutingTrace: layer {layer}'s indices must be [T, K], got shape {tuple(idx.shape)}")
            if tokens is None:
                tokens = (self.layers[0], idx.shape[0])
            elif idx.shape[0] != tokens[1]:
                raise ValueError(f"RoutingTrace: layer {layer} routes {idx.shape[0]} tokens but layer {tokens[0]} "
                                 f"routes {tokens[1]}: every layer of a trace must route the same tokens")
            if e < 1:
                raise ValueError(f"RoutingTrace: layer {layer} has num_experts={e}, must be >= 1")
            bad = idx[(idx < -1) | (idx >= e)]
            if bad.numel():
                raise ValueError(f"RoutingTrace: layer {layer} has expert ids {sorted(set(bad.tolist()))[:5]} outside "
                                 f"0..{e - 1} (and -1 for an empty slot)")

    @property
    def num_tokens(self) -> int:
        return int(self.indices[0].shape[0])

    def chosen(self, position: int) -> torch.Tensor:
        """`[T, E_l]` bool: expert e chosen by token t at the `position`-th MoE layer (repeats counted once)."""
        idx, e = self.indices[position], self.num_experts[position]
        out = torch.zeros(idx.shape[0], e + 1, dtype=torch.bool)
        out.scatter_(1, torch.where(idx < 0, e, idx), True)
        return out[:, :e]

    def permuted(self, perms: Mapping[int, torch.Tensor | Sequence[int]]) -> RoutingTrace:
        """The trace a model permuted by `perms` (layer -> new expert p is old `perm[p]`) would record."""
        unknown = sorted(set(perms) - set(self.layers))
        if unknown:
            raise ValueError(f"RoutingTrace.permuted: layer(s) {unknown} are not in the trace (layers {list(self.layers)})")
        out = []
        for layer, idx in zip(self.layers, self.indices):
            if layer not in perms:
                out.append(idx)
                continue
            inverse = torch.argsort(torch.as_tensor(perms[layer], dtype=torch.long))
            out.append(torch.where(idx < 0, idx, inverse[idx.clamp_min(0)]))
        return RoutingTrace(self.layers, tuple(out), self.num_experts)

    @staticmethod
    def concat(traces: Sequence[RoutingTrace]) -> RoutingTrace:
        """The tokens of several traces of the same layers, one after another."""
        if not traces:
            raise ValueError("RoutingTrace.concat: no trace")
        first = traces[0]
        for t in traces[1:]:
            if t.layers != first.layers or t.num_experts != first.num_experts:
                raise ValueError(f"RoutingTrace.concat: layers {list(t.layers)} with experts {list(t.num_experts)} do not "
                                 f"match layers {list(first.layers)} with experts {list(first.num_experts)}")
        width = [max(t.indices[i].shape[1] for t in traces) for i in range(len(first.layers))]
        pad = [[torch.nn.functional.pad(t.indices[i], (0, width[i] - t.indices[i].shape[1]), value=-1) for t in traces]
               for i in range(len(first.layers))]
        return RoutingTrace(first.layers, tuple(torch.cat(p) for p in pad), first.num_experts)


def trace_from_records(records: Sequence, mask: torch.Tensor | None = None) -> RoutingTrace:
    """A trace from the `RoutingRecord`s of forward calls (`zoo.moe.capture_routing`).

    Records of several calls (a batch loop, KV-cached generation steps) are joined per call: each
    call contributes one record per MoE layer, in layer order. Only real tokens are kept: the
    record's `context["mask"]` (set by `MoECausalLM.forward`), else `mask` where it has T elements.

    Raises:
        ValueError: the calls do not all route the same layers, or a call's layers route different
            numbers of tokens.
    """
    calls: list[list] = []
    for r in records:
        if not calls or any(q.layer >= r.layer for q in calls[-1][-1:]):
            calls.append([])
        calls[-1].append(r)
    if not calls:
        raise ValueError("trace_from_records: no routing records (did the forward call run any MoE layer?)")
    traces = []
    for call in calls:
        tokens = call[0].output.indices.shape[0]
        m = call[0].context.get("mask")
        if m is None or m.numel() != tokens:
            m = mask if mask is not None and mask.numel() == tokens else None
        keep = None if m is None else m.reshape(-1).bool().cpu()
        idx = [r.output.indices.detach().cpu() for r in call]
        sizes = {r.layer: i.shape[0] for r, i in zip(call, idx)}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"trace_from_records: one forward call's MoE layers route different token counts {sizes}")
        if keep is not None:
            idx = [i[keep] for i in idx]
        traces.append(RoutingTrace(tuple(r.layer for r in call), tuple(idx), tuple(r.router.num_experts for r in call)))
    return RoutingTrace.concat(traces)


@torch.no_grad()
def routing_trace(model: nn.Module, batches: Iterable[Mapping]) -> RoutingTrace:
    """Run `model` on `batches` (eval mode) and record its MoE decoder layers' routing of real tokens.

    Args:
        model: an `MoECausalLM`, or a `MultimodalMoE` whose language model is one (its encoders'
            and connectors' MoE layers are not recorded).
        batches: model inputs (`input_ids`, `attention_mask`, media, ...).
    """
    from zoo.models.lm import MoECausalLM
    from zoo.moe.capture import capture_routing
    from zoo.transforms.esft import moe_layers_of

    moe_layers_of(model)
    lm = model if isinstance(model, MoECausalLM) else model.language_model
    was_training = model.training
    model.eval()
    traces = []
    try:
        for batch in batches:
            with capture_routing(lm) as records:
                out = model(**batch)
            mask = getattr(out, "attention_mask", None)
            traces.append(trace_from_records(records, mask if mask is not None else batch.get("attention_mask")))
    finally:
        model.train(was_training)
    if not traces:
        raise ValueError("routing_trace: no batches")
    return RoutingTrace.concat(traces)


# --- affinity -------------------------------------------------------------------------------------


def affinity_counts(trace: RoutingTrace) -> list[torch.Tensor]:
    """Per pair of consecutive MoE layers, `[E_l, E_{l+1}]` float64: `C[i, j]` = tokens that chose
    expert i at layer l and expert j at layer l+1."""
    chosen = [trace.chosen(p).double() for p in range(len(trace.layers))]
    return [a.t() @ b for a, b in zip(chosen, chosen[1:])]


def affinity(trace: RoutingTrace) -> list[torch.Tensor]:
    """Per pair of consecutive MoE layers, `[E_l, E_{l+1}]`: `P(j at l+1 | i at l)`, the share of the
    tokens that chose i at l that choose j at l+1 (a row of an expert no token chose is 0)."""
    out = []
    for p, counts in enumerate(affinity_counts(trace)):
        n = trace.chosen(p).double().sum(0)  # [E_l]
        out.append(counts / n.clamp_min(1)[:, None])
    return out


# --- placements -----------------------------------------------------------------------------------


def _check_devices(num_devices: int, num_experts: Sequence[int], layers: Sequence[int]) -> None:
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"num_devices={num_devices!r} must be an integer >= 1")
    for layer, e in zip(layers, num_experts):
        if e % num_devices:
            raise ValueError(f"num_devices={num_devices} must divide num_experts={e} (layer {layer}): every device "
                             "holds the same number of experts of each layer")


@dataclass(frozen=True)
class Placement:
    """Which device holds each expert of each MoE layer (checked balanced on construction).

    Attributes:
        layers: decoder layer indices.
        devices: per layer `[E_l]` int64 device ids in `[0, G)`, each device holding `E_l / G`.
        num_devices: G.
        method: what made it ("contiguous", "greedy", "ilp").
        optimal: for "ilp", whether the solver proved the placement optimal; None for heuristics.
        solve_seconds: time to compute it.
    """

    layers: tuple[int, ...]
    devices: tuple[torch.Tensor, ...]
    num_devices: int
    method: str = ""
    optimal: bool | None = None
    solve_seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "devices", tuple(torch.as_tensor(d, dtype=torch.long).reshape(-1).cpu() for d in self.devices))
        if len(self.devices) != len(self.layers):
            raise ValueError(f"Placement: {len(self.layers)} layers but {len(self.devices)} device maps")
        _check_devices(self.num_devices, [d.numel() for d in self.devices], self.layers)
        for layer, dev in zip(self.layers, self.devices):
            per = dev.numel() // self.num_devices
            counts = torch.bincount(dev.clamp(0, self.num_devices), minlength=self.num_devices + 1)
            if dev.min() < 0 or dev.max() >= self.num_devices or (counts[: self.num_devices] != per).any():
                raise ValueError(f"Placement: layer {layer} puts experts on devices {dev.tolist()}; each of the "
                                 f"{self.num_devices} devices 0..{self.num_devices - 1} must hold exactly {per}")

    def permutations(self) -> dict[int, torch.Tensor]:
        """Layer -> `[E]` permutation that makes this placement contiguous: device g's experts (in
        their old order) become experts `[g E/G, (g+1) E/G)` (new expert p is old `perm[p]`)."""
        return {layer: torch.sort(dev, stable=True).indices for layer, dev in zip(self.layers, self.devices)}

    def to_dict(self) -> dict:
        return {"method": self.method, "num_devices": self.num_devices, "optimal": self.optimal,
                "layers": {str(layer): dev.tolist() for layer, dev in zip(self.layers, self.devices)}}


def contiguous_placement(trace: RoutingTrace, num_devices: int) -> Placement:
    """Expert e of every layer on device `e // (E / G)`: the shards of `zoo.moe.expert_parallel`."""
    _check_devices(num_devices, trace.num_experts, trace.layers)
    devices = [torch.arange(e) // (e // num_devices) for e in trace.num_experts]
    return Placement(trace.layers, tuple(devices), num_devices, "contiguous")


def greedy_placement(trace: RoutingTrace, num_devices: int) -> Placement:
    """Layer 0 contiguous; then per layer, place first the (expert, device) pair with the most
    transitions from the device's previous-layer experts, while the device has room (ties: lower
    expert, then lower device)."""
    _check_devices(num_devices, trace.num_experts, trace.layers)
    start = time.perf_counter()
    g = num_devices
    devices = [torch.arange(trace.num_experts[0]) // (trace.num_experts[0] // g)]
    for counts, e_next in zip(affinity_counts(trace), trace.num_experts[1:]):
        prev = devices[-1]
        score = torch.zeros(g, e_next, dtype=torch.float64).index_add_(0, prev, counts).numpy()  # [G, E_{l+1}]
        room = np.full(g, e_next // g)
        dev = np.full(e_next, -1)
        # order: by score descending, then expert, then device ascending
        order = sorted(((-score[d, j], j, d) for d in range(g) for j in range(e_next)))
        for _, j, d in order:
            if dev[j] < 0 and room[d] > 0:
                dev[j], room[d] = d, room[d] - 1
        devices.append(torch.as_tensor(dev))
    return Placement(trace.layers, tuple(devices), g, "greedy", solve_seconds=time.perf_counter() - start)


def ilp_placement(trace: RoutingTrace, num_devices: int, *, time_limit: float = 60.0,
                  at_least_greedy: bool = True) -> Placement:
    """ExFlow's integer program (module docstring), solved by scipy's `milp` (HiGHS).

    Args:
        trace: the routing to fit.
        num_devices: G, dividing every layer's E.
        time_limit: seconds for the solver; past it the best placement found is returned with
            `optimal=False` and `info["mip_gap"]` (HiGHS's relative gap to its bound).
        at_least_greedy: add the constraint "keep at least as many transitions on one device as
            `greedy_placement` does" (a cutoff: the program is unchanged where it solves to
            optimality), and return the greedy placement (`info["fallback"]`) when the solver finds
            nothing better in time. So the result is never worse than greedy on the objective.

    Raises:
        ValueError: G does not divide some E, a bad `time_limit`, or (without `at_least_greedy`)
            no placement was found in time.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    _check_devices(num_devices, trace.num_experts, trace.layers)
    if not time_limit > 0:
        raise ValueError(f"time_limit={time_limit!r} must be a number of seconds > 0")
    start = time.perf_counter()
    g = num_devices
    num_e = trace.num_experts
    x_base = np.cumsum([0, *[e * g for e in num_e]])  # x(l, e, d) = x_base[l] + e * g + d

    def x(pos: int, e: int, d: int) -> int:
        return int(x_base[pos] + e * g + d)

    pairs = []  # (pos, i, j, weight) with weight > 0
    for pos, counts in enumerate(affinity_counts(trace)):
        nz = torch.nonzero(counts > 0).tolist()
        pairs += [(pos, i, j, float(counts[i, j])) for i, j in nz]
    n_x = int(x_base[-1])
    n = n_x + len(pairs) * g  # y(p, d) = n_x + p * g + d
    cost = np.zeros(n)
    rows, cols, vals, lo, hi = [], [], [], [], []

    def row(entries, low, high):
        r = len(lo)
        for c, v in entries:
            rows.append(r)
            cols.append(c)
            vals.append(v)
        lo.append(low)
        hi.append(high)

    for pos, e in enumerate(num_e):
        for i in range(e):
            row([(x(pos, i, d), 1.0) for d in range(g)], 1, 1)  # each expert on one device
        for d in range(g):
            row([(x(pos, i, d), 1.0) for i in range(e)], e // g, e // g)  # E/G experts per device
    out_of: dict[tuple[int, int, int], list[int]] = {}  # (pos, i, d) -> y columns leaving (l, i) on d
    into: dict[tuple[int, int, int], list[int]] = {}  # (pos + 1, j, d) -> y columns entering (l+1, j) on d
    for p, (pos, i, j, w) in enumerate(pairs):
        for d in range(g):
            y = n_x + p * g + d
            cost[y] = -w  # maximize the transitions kept on one device
            row([(y, 1.0), (x(pos, i, d), -1.0)], -np.inf, 0)
            row([(y, 1.0), (x(pos + 1, j, d), -1.0)], -np.inf, 0)
            out_of.setdefault((pos, i, d), []).append(y)
            into.setdefault((pos + 1, j, d), []).append(y)
    for (pos, i, d), ys in out_of.items():  # valid cuts: a device holds E_{l+1}/G successors
        row([*((y, 1.0) for y in ys), (x(pos, i, d), -(num_e[pos + 1] // g))], -np.inf, 0)
    for (pos, j, d), ys in into.items():
        row([*((y, 1.0) for y in ys), (x(pos, j, d), -(num_e[pos - 1] // g))], -np.inf, 0)
    upper = np.ones(n)
    for e in range(min(num_e[0], g)):  # symmetry: layer 0's expert e on a device <= e
        for d in range(e + 1, g):
            upper[x(0, e, d)] = 0
    greedy = greedy_placement(trace, g) if at_least_greedy else None
    if greedy is not None:  # cutoff: kept transitions >= greedy's
        kept = float(sum(c.sum() for c in affinity_counts(trace))) - cross_device_transitions(trace, greedy)
        row([(c, -cost[c]) for c in range(n_x, n)], kept - 1e-6, np.inf)
    integrality = np.zeros(n)
    integrality[:n_x] = 1
    a = coo_matrix((vals, (rows, cols)), shape=(len(lo), n)).tocsr()
    res = milp(cost, integrality=integrality, bounds=Bounds(np.zeros(n), upper),
               constraints=LinearConstraint(a, np.array(lo), np.array(hi)),
               options={"time_limit": float(time_limit), "mip_rel_gap": 0.0, "presolve": True})
    gap = getattr(res, "mip_gap", None)
    info = {"mip_gap": None if gap is None else float(gap), "variables": n, "constraints": len(lo)}
    if res.x is None:
        if greedy is None:
            raise ValueError(f"ilp_placement: no placement found within time_limit={time_limit} s ({res.message})")
        return Placement(trace.layers, greedy.devices, g, "ilp", optimal=False, solve_seconds=time.perf_counter() - start,
                         info={**info, "fallback": "greedy"})
    sol = np.round(res.x[:n_x]).reshape(-1)
    devices = [torch.as_tensor(sol[x_base[pos]: x_base[pos + 1]].reshape(e, g).argmax(1)) for pos, e in enumerate(num_e)]
    return Placement(trace.layers, tuple(devices), g, "ilp", optimal=bool(res.status == 0),
                     solve_seconds=time.perf_counter() - start, info=info)


PLACERS = {"contiguous": contiguous_placement, "greedy": greedy_placement, "ilp": ilp_placement}


def place(trace: RoutingTrace, num_devices: int, method: str = "ilp", **options) -> Placement:
    """A placement of `trace`'s experts on `num_devices` devices by `method` (`PLACERS`)."""
    if method not in PLACERS:
        raise ValueError(f"placement method {method!r} is not one of {sorted(PLACERS)}")
    return PLACERS[method](trace, num_devices, **options)


# --- cost model -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlacementCost:
    """What a placement costs on a trace (module docstring: the cost model).

    Attributes:
        tokens: T.
        transitions: token-expert pairs (i at l, j at l+1) over consecutive MoE layers (`sum C`).
        cross_device: of those, the pairs whose experts sit on different devices (the ILP objective).
        exflow_volume: token vectors sent by context-coherent EP's one all-to-all per transition.
        ep_volume: expected token vectors sent by plain EP's two all-to-alls per MoE layer, over the
            same transitions (every MoE layer after the first).
    """

    tokens: int
    transitions: float
    cross_device: float
    exflow_volume: float
    ep_volume: float

    @property
    def cross_fraction(self) -> float:
        return self.cross_device / self.transitions if self.transitions else 0.0


def _check_layers(trace: RoutingTrace, placement: Placement) -> None:
    if placement.layers != trace.layers:
        raise ValueError(f"the placement covers MoE layers {list(placement.layers)} but the trace has "
                         f"{list(trace.layers)}")
    for layer, dev, e in zip(trace.layers, placement.devices, trace.num_experts):
        if dev.numel() != e:
            raise ValueError(f"layer {layer}: the placement places {dev.numel()} experts but the trace's router has {e}")


def cross_device_transitions(trace: RoutingTrace, placement: Placement) -> float:
    """`sum_l sum_ij C_l[i, j] [dev_l(i) != dev_{l+1}(j)]`: the quantity `ilp_placement` minimizes."""
    _check_layers(trace, placement)
    total = 0.0
    for pos, counts in enumerate(affinity_counts(trace)):
        a, b = placement.devices[pos], placement.devices[pos + 1]
        total += float((counts * (a[:, None] != b[None, :])).sum())
    return total


def placement_cost(trace: RoutingTrace, placement: Placement) -> PlacementCost:
    """The cross-device transitions and simulated all-to-all volumes of `placement` on `trace`."""
    _check_layers(trace, placement)
    g = placement.num_devices
    on = []  # per layer [T, G] float: token t has an expert on device d
    for pos in range(len(trace.layers)):
        chosen = trace.chosen(pos).double()  # [T, E]
        onehot = torch.nn.functional.one_hot(placement.devices[pos], g).double()  # [E, G]
        on.append((chosen @ onehot > 0).double())
    where = torch.where(on[0].sum(1, keepdim=True) > 0, on[0], torch.full_like(on[0], 1.0 / g))  # home: uniform
    exflow = ep = 0.0
    for dest in on[1:]:
        exflow += float((where.sum(1) * dest.sum(1) - (where * dest).sum(1)).sum())
        ep += float(2 * dest.sum() * (g - 1) / g)
        where = torch.where(dest.sum(1, keepdim=True) > 0, dest, where)
    counts = affinity_counts(trace)
    return PlacementCost(trace.num_tokens, float(sum(c.sum() for c in counts)), cross_device_transitions(trace, placement),
                         exflow, ep)


# --- applying a placement to a checkpoint ----------------------------------------------------------


def permute_model_dir(src: str | os.PathLike, dst: str | os.PathLike, placement: Placement) -> None:
    """Write the checkpoint `src` (`zoo.io.model_dir`) to `dst` with its experts reordered so that
    `placement` becomes contiguous (logits unchanged); `config.json` records the placement.

    The weights change, so expert adapters made for `src` are refused on `dst` (their base hash).
    """
    from zoo.io.model_dir import TOKENIZER_DIR, load_model_dir, save_model_dir
    from zoo.transforms.esft import moe_layers_of
    from zoo.transforms.permute import permute_experts

    model, cfg, ckpt = load_model_dir(src)
    layers = moe_layers_of(model)
    if tuple(sorted(layers)) != placement.layers:
        raise ValueError(f"permute_model_dir: the placement covers MoE layers {list(placement.layers)} but "
                         f"{str(src)!r} has MoE layers {sorted(layers)}")
    for layer, dev in zip(placement.layers, placement.devices):
        if dev.numel() != layers[layer].experts.num_experts:
            raise ValueError(f"permute_model_dir: layer {layer}: the placement places {dev.numel()} experts but the "
                             f"model has {layers[layer].experts.num_experts}")
    permute_experts(model, placement.permutations())
    extra_files = {k: p for k, p in ckpt.paths.items() if not k.startswith(f"{TOKENIZER_DIR}/")}
    extra = {k: v for k, v in ckpt.config.items() if k != "model"}
    extra["expert_placement"] = placement.to_dict()
    save_model_dir(model, cfg, dst, Path(src) / TOKENIZER_DIR, extra=extra, extra_files=extra_files)


__all__ = ["PLACERS", "Placement", "PlacementCost", "RoutingTrace", "affinity", "affinity_counts", "contiguous_placement",
           "cross_device_transitions", "greedy_placement", "ilp_placement", "permute_model_dir", "place", "placement_cost",
           "routing_trace", "trace_from_records"]
