"""ESFT: expert-specialized fine-tuning and expert adapters.

Wang et al., 2024, "Let the Expert Stick to His Last: Expert-Specialized Fine-Tuning for Sparse
Architectural Large Language Models" (deepseek-ai/ESFT): score every routed expert's relevance to a
task on the task's data, keep per layer the smallest set of experts whose relevance reaches a share
p, fine-tune only those and ship only them. The pieces, each usable alone:

- `routing_relevance` / `expert_relevance`: the paper's two scores. With gate values `g[t, e]`
  (the combine weight token t gives expert e, 0 when not chosen) and `K` slots per token:
  average gate score `r_e = mean_samples mean_tokens g[t, e]`; token selection ratio
  `r_e = mean_samples mean_tokens 1[e chosen by t] / K`. Both average over a sample's real tokens
  first, then over samples, as the paper writes them.
- `select_experts`: per layer, experts sorted by relevance (normalized to sum 1), the smallest
  prefix whose cumulative relevance reaches p.
- `expert_gradient_masks` and `esft_param_groups`: train only the selected experts. The stacked
  `[E, ...]` parameters get a gradient mask (0 on other experts) and no weight decay (AdamW's
  decoupled decay would shrink frozen rows too; a choice: the selected rows lose decay as well),
  so with AdamW every other expert stays bit-identical.
- `save_expert_adapter` / `apply_expert_adapter`: the selected experts' rows as safetensors, their
  layer/expert ids and the base checkpoint's identity (`zoo.io.checkpoint.weights_identity`: a
  hash of its weight files' sha256s), in a checkpoint directory with its own manifest (the format:
  `zoo.io.expert_adapter`). Applying it to another base is refused naming both hashes.

Written by hand: PEFT has no notion of routed experts inside stacked `[E, ...]` parameters.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from zoo.io.checkpoint import CheckpointError, weights_identity
from zoo.io.expert_adapter import ADAPTER_KIND, ExpertAdapter, read_expert_adapter, write_expert_adapter
from zoo.moe.capture import capture_routing
from zoo.moe.expert_parallel import GRAD_ROWS
from zoo.moe.routers import RouterOutput

RELEVANCE = ("gate", "token")


def routing_relevance(output: RouterOutput, mask: torch.Tensor, num_experts: int, metric: str = "gate") -> torch.Tensor:
    """Per-sample relevance of each expert in one MoE layer's routing of one batch.

    Args:
        output: the router's decision for the batch's `T = B * S` tokens (weights, indices `[T, K]`).
        mask: `[B, S]`, 1 for real tokens.
        num_experts: E (slots with ids >= E, e.g. null experts, and -1 are not experts).
        metric: "gate" (average gate score) or "token" (token selection ratio).

    Returns:
        `[B, E]`: each sample's mean over its real tokens.
    """
    if metric not in RELEVANCE:
        raise ValueError(f"ESFT relevance metric {metric!r} is not one of {RELEVANCE}")
    b, s = mask.shape
    idx, w = output.indices, output.weights.float()
    if idx.shape[0] != b * s:
        raise ValueError(f"ESFT: the routing has {idx.shape[0]} tokens but the mask is [{b}, {s}]")
    real = (idx >= 0) & (idx < num_experts)
    value = w if metric == "gate" else torch.full_like(w, 1.0 / idx.shape[1])
    per_token = torch.zeros(b * s, num_experts, device=idx.device)
    per_token.scatter_add_(1, idx.clamp(0, num_experts - 1), torch.where(real, value, torch.zeros_like(value)))
    m = mask.reshape(b * s, 1).float()
    sums = (per_token * m).reshape(b, s, num_experts).sum(1)
    return sums / mask.float().sum(1, keepdim=True).clamp_min(1)


@torch.no_grad()
def expert_relevance(model: nn.Module, batches: Iterable[Mapping], metric: str = "gate") -> dict[int, torch.Tensor]:
    """Relevance `[E]` of every MoE layer's experts on `batches` (mean over all their samples).

    Args:
        model: an `MoECausalLM`, or a `MultimodalMoE` whose language model is one.
        batches: model inputs (`input_ids`, `attention_mask`, media ...).
        metric: "gate" or "token".
    """
    from zoo.models.lm import MoECausalLM

    layers = moe_layers_of(model)
    lm = model if isinstance(model, MoECausalLM) else model.language_model  # its MoE layers only, not an encoder's
    sums: dict[int, torch.Tensor] = {}
    samples = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            with capture_routing(lm) as records:
                out = model(**batch)
            mask = getattr(out, "attention_mask", None)
            if mask is None:
                mask = batch.get("attention_mask")
            if mask is None:
                mask = torch.ones(batch["input_ids"].shape, dtype=torch.long)
            for r in records:
                rel = routing_relevance(r.output, mask, layers[r.layer].router.num_experts, metric)
                sums[r.layer] = sums.get(r.layer, 0) + rel.sum(0)
            samples += mask.shape[0]
    finally:
        model.train(was_training)
    if not samples:
        raise ValueError("ESFT: no batches to score the experts on")
    return {layer: (s / samples).cpu() for layer, s in sorted(sums.items())}


def select_experts(relevance: Mapping[int, torch.Tensor], p: float) -> dict[int, list[int]]:
    """Per layer the smallest set of experts whose normalized relevance sums to at least p.

    Raises:
        ValueError: p outside (0, 1], or a layer whose experts all have relevance 0.
    """
    if not 0 < p <= 1:
        raise ValueError(f"ESFT: the relevance share p must be in (0, 1], got {p}")
    chosen = {}
    for layer, scores in relevance.items():
        total = float(scores.sum())
        if total <= 0:
            raise ValueError(f"ESFT: layer {layer}'s experts all have relevance 0 (no token was routed)")
        order = torch.argsort(scores, descending=True, stable=True)
        cum = torch.cumsum(scores[order] / total, 0)
        n = int((cum < p - 1e-6).sum()) + 1
        chosen[layer] = sorted(order[:n].tolist())
    return chosen


def stacked_params(moe) -> dict[str, nn.Parameter]:
    """A `SparseMoE`'s stacked `[E, ...]` expert parameters by name (`[E / P, ...]`: a rank's expert shard)."""
    experts = moe.experts
    rows = getattr(experts, "num_local_experts", experts.num_experts)
    return {n: p for n, p in experts.named_parameters(recurse=False) if p.shape[0] == rows}


def local_rows(experts: nn.Module, ids: Iterable[int]) -> list[int]:
    """Global expert ids -> rows of this rank's stacked parameters (all of them when not sharded)."""
    offset = getattr(experts, "expert_offset", 0)
    n = getattr(experts, "num_local_experts", experts.num_experts)
    return [i - offset for i in ids if offset <= i < offset + n]


def moe_layers_of(model: nn.Module) -> dict:
    """Layer -> `SparseMoE` of an `MoECausalLM`, or of a `MultimodalMoE`'s language model."""
    from zoo.models.lm import MoECausalLM

    lm = model if isinstance(model, MoECausalLM) else getattr(model, "language_model", None)
    if not isinstance(lm, MoECausalLM):
        raise ValueError(f"{type(model).__name__} has no sparse MoE language model")
    return lm.moe_layers()


class _RowMaskHandle:
    """Removes a row mask: the gradient hook and the `zoo_grad_rows` mark (so no later shard re-applies it)."""

    def __init__(self, param: torch.Tensor, hook) -> None:
        self.param, self.hook = param, hook

    def remove(self) -> None:
        self.hook.remove()
        if hasattr(self.param, GRAD_ROWS):
            delattr(self.param, GRAD_ROWS)


def row_mask(p: torch.Tensor, rows: list[int], keep: bool) -> _RowMaskHandle:
    """A gradient hook on `p` that lets through only rows `rows` (keep=True) or all but them (keep=False).

    The multiplier `[E, 1, ...]` is also marked on the parameter (`p.zoo_grad_rows`): expert
    parallelism (`zoo.moe.expert_parallel.shard_experts`) builds new per-rank parameters, and each
    shard re-applies its own rows of the mark, so the mask holds under expert parallelism too.

    Returns:
        A handle whose `remove()` lifts the hook and the mark.
    """
    mask = torch.full((p.shape[0], *([1] * (p.dim() - 1))), 0.0 if keep else 1.0, device=p.device, dtype=p.dtype)
    mask[list(rows)] = 1.0 if keep else 0.0
    setattr(p, GRAD_ROWS, mask)
    return _RowMaskHandle(p, p.register_hook(lambda g, mask=mask: g * mask.to(g.dtype)))  # bf16 weights: bf16 grads


def _check_selection(layers: Mapping, selected: Mapping[int, list[int]]) -> None:
    for layer, ids in selected.items():
        if layer not in layers:
            raise ValueError(f"ESFT: layer {layer} is not an MoE layer (MoE layers: {sorted(layers)})")
        e = layers[layer].experts.num_experts
        bad = [i for i in ids if not 0 <= i < e]
        if bad:
            raise ValueError(f"ESFT: layer {layer} has experts 0..{e - 1}, not {bad}")


def expert_gradient_masks(model: nn.Module, selected: Mapping[int, list[int]]) -> list:
    """Hooks that zero the gradient of every expert not selected (layers not in `selected`: all).

    Returns:
        The hook handles (call `.remove()` on each to lift the masks).
    """
    layers = moe_layers_of(model)
    _check_selection(layers, selected)
    handles = []
    for layer, moe in layers.items():
        for p in stacked_params(moe).values():
            handles.append(row_mask(p, local_rows(moe.experts, selected.get(layer, [])), keep=True))
    return handles


def esft_param_groups(model: nn.Module, selected: Mapping[int, list[int]], weight_decay: float) -> list[dict]:
    """AdamW groups for ESFT: the MoE layers' stacked expert parameters without weight decay (so
    masked rows stay bit-identical), every other trainable matrix with `weight_decay`."""
    stacked = {id(p) for moe in moe_layers_of(model).values() for p in stacked_params(moe).values()}
    params = [p for p in model.parameters() if p.requires_grad]
    experts = [p for p in params if id(p) in stacked]
    rest = [p for p in params if id(p) not in stacked]
    groups = [{"name": "experts", "params": experts, "weight_decay": 0.0},
              {"name": "decay", "params": [p for p in rest if p.ndim >= 2], "weight_decay": weight_decay},
              {"name": "no_decay", "params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def base_identity(base_dir: str | os.PathLike) -> str:
    """A base checkpoint's identity as expert adapters record it: `zoo.io.checkpoint.weights_identity`."""
    return weights_identity(base_dir)


def save_expert_adapter(model: nn.Module, selected: Mapping[int, list[int]], path: str | os.PathLike,
                        base_dir: str | os.PathLike, *, info: Mapping | None = None, overwrite: bool = False) -> Path:
    """Write the selected experts of `model` as an expert adapter for the checkpoint `base_dir`.

    The format is `zoo.io.expert_adapter`: the selected rows, their layer/expert ids, the base's
    identity (`base_identity`) and `info` (what made it).
    """
    adapter = ExpertAdapter(experts={int(k): list(v) for k, v in selected.items()}, base_sha256=base_identity(base_dir),
                            tensors=adapter_tensors(model, selected), info=dict(info or {}))
    return write_expert_adapter(path, adapter, overwrite=overwrite)


def apply_expert_adapter(model: nn.Module, adapter: str | os.PathLike | ExpertAdapter, base_dir: str | os.PathLike) -> nn.Module:
    """Load an expert adapter into `model` (built from the checkpoint `base_dir`), in place.

    Args:
        model: the base model (`MoECausalLM`, `MultimodalMoE`, ...), loaded from `base_dir`.
        adapter: an adapter directory, or one already read (`read_expert_adapter`).
        base_dir: the checkpoint `model` was loaded from; its identity must be the adapter's base.

    Raises:
        CheckpointError: the adapter is corrupt (manifest check) or was made for another base
            (both hashes named); ValueError: its experts or shapes do not fit the model.
    """
    where = str(adapter) if not isinstance(adapter, ExpertAdapter) else "(in memory)"
    if not isinstance(adapter, ExpertAdapter):
        adapter = read_expert_adapter(adapter)
    have = base_identity(base_dir)
    if adapter.base_sha256 != have:
        raise CheckpointError(f"expert adapter {where!r} was made for base {adapter.base_sha256}, "
                              f"but {str(base_dir)!r} is {have}")
    return load_adapter_tensors(model, adapter.experts, adapter.tensors)


def adapter_tensors(model: nn.Module, selected: Mapping[int, list[int]]) -> dict[str, torch.Tensor]:
    """`"<layer>/<param>"` -> the selected experts' rows `[n_selected, ...]` (in `selected` order)."""
    layers = moe_layers_of(model)
    _check_selection(layers, selected)
    return {f"{layer}/{name}": p.detach()[list(ids)].contiguous().cpu()
            for layer, ids in sorted(selected.items()) for name, p in stacked_params(layers[layer]).items()}


def load_adapter_tensors(model: nn.Module, selected: Mapping[int, list[int]], tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """Write `adapter_tensors` output back into `model`'s experts, in place.

    Raises:
        ValueError: a tensor is missing or has the wrong shape, or the selection does not fit the model.
    """
    layers = moe_layers_of(model)
    _check_selection(layers, selected)
    with torch.no_grad():
        for layer, ids in selected.items():
            for name, p in stacked_params(layers[layer]).items():
                key = f"{layer}/{name}"
                if key not in tensors:
                    raise ValueError(f"expert adapter: no tensor {key!r} (it has {sorted(tensors)})")
                rows = tensors[key]
                if tuple(rows.shape) != (len(ids), *p.shape[1:]):
                    raise ValueError(f"expert adapter: {key} has shape {tuple(rows.shape)}, the model's "
                                     f"experts need {(len(ids), *p.shape[1:])}")
                p[list(ids)] = rows.to(device=p.device, dtype=p.dtype)
    return model


__all__ = ["ADAPTER_KIND", "RELEVANCE", "adapter_tensors", "apply_expert_adapter", "base_identity", "esft_param_groups",
           "expert_gradient_masks", "expert_relevance", "load_adapter_tensors", "moe_layers_of", "routing_relevance",
           "row_mask", "save_expert_adapter", "select_experts", "stacked_params"]
