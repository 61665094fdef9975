"""MoTE expert attribution: "Mixture of Tunable Experts - Behavior Modification of DeepSeek-R1 at
Inference Time" (Dahlke et al., 2025, arXiv 2502.11096).

functional Token Resonance Imaging (fTRI): run the model on prompts that elicit a behaviour and on
contrast prompts that do not, record which experts the router chooses, and call an expert
behaviour-relevant when it is chosen more often on the behaviour set. MoTE then switches the
top experts off, or forces them on, at inference (`override_routing(disable=...)` /
`override_routing(force=...)`), with no training.

Statistic: per MoE layer and expert e, the selection rate `rate(e)`, the fraction of the set's real
tokens (attention mask = 1) whose chosen experts include e; the score is `rate_behaviour(e) -
rate_contrast(e)`, ranked per layer (ties: lower id). Choices where the paper is vague: the rates
count every real token of each forward pass (prompt tokens; put a response in the batch to count
its tokens too); `top(n)` ranks per layer by default (the issue's choice) or over all layers
(`per_layer=False`, the paper's "top 10 experts" of the whole model); experts whose score is not
above `min_score` (default 0: not chosen more on the behaviour set) are never returned.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from zoo.moe.capture import capture_routing
from zoo.moe.routers.base import check_range


@dataclass
class ExpertAttribution:
    """Per MoE layer, how much more each expert is chosen on the behaviour set than on the contrast set.

    Attributes:
        behaviour: layer -> `[E]` selection rate on the behaviour set.
        contrast: layer -> `[E]` selection rate on the contrast set.
        behaviour_tokens: real tokens counted on the behaviour set.
        contrast_tokens: real tokens counted on the contrast set.
    """

    behaviour: dict[int, torch.Tensor]
    contrast: dict[int, torch.Tensor]
    behaviour_tokens: int = 0
    contrast_tokens: int = 0

    @property
    def scores(self) -> dict[int, torch.Tensor]:
        """layer -> `[E]` `rate_behaviour - rate_contrast`."""
        return {layer: self.behaviour[layer] - self.contrast[layer] for layer in sorted(self.behaviour)}

    def ranking(self, layer: int) -> list[int]:
        """Expert ids of `layer`, most behaviour-relevant first (ties: lower id)."""
        if layer not in self.behaviour:
            raise ValueError(f"ExpertAttribution: no layer {layer}; layers are {sorted(self.behaviour)}")
        score = self.scores[layer]
        return sorted(range(score.numel()), key=lambda e: (-float(score[e]), e))

    def top(self, n: int, *, per_layer: bool = True, min_score: float = 0.0) -> dict[int, list[int]]:
        """The n most behaviour-relevant experts, as `{layer: [expert ids]}` for `override_routing`.

        Args:
            n: experts per layer (`per_layer`) or in all (otherwise), >= 1.
            per_layer: rank within each layer, or over all layers together.
            min_score: keep only experts whose score exceeds it.
        """
        check_range("n", n, 1, float("inf"), integer=True)
        scores = self.scores
        if per_layer:
            out = {layer: [e for e in self.ranking(layer) if float(scores[layer][e]) > min_score][:n] for layer in scores}
        else:
            ranked = sorted(((float(s[e]), layer, e) for layer, s in scores.items() for e in range(s.numel())),
                            key=lambda t: (-t[0], t[1], t[2]))
            out: dict[int, list[int]] = {}
            for score, layer, e in ranked[:n]:
                if score > min_score:
                    out.setdefault(layer, []).append(e)
        return {layer: sorted(ids) for layer, ids in out.items() if ids}


@torch.no_grad()
def selection_rates(model: nn.Module, batches: Iterable[Mapping], *, within: nn.Module | None = None
                    ) -> tuple[dict[int, torch.Tensor], int]:
    """Per MoE layer, the fraction of real tokens routed to each expert, over forward passes on `batches`.

    Args:
        model: called as `model(**batch)` for each batch.
        batches: keyword dicts for `model` (`input_ids`, `attention_mask`, media, ...).
        within: the module whose `SparseMoE` layers are counted (default `model`; e.g. a
            `MultimodalMoE`'s `language_model`, to leave encoder MoE blocks out).

    Returns:
        `({layer: [E] rates}, real tokens counted)`. A token counts where its record's routing
        mask (or the batch's `attention_mask`) is 1.

    Raises:
        ValueError: no MoE layer ran, no token was counted, or two MoE layers share a layer index
            (pass `within`).
    """
    counts: dict[int, torch.Tensor] = {}
    tokens: dict[int, int] = {}
    names: dict[int, str] = {}
    root = model if within is None else within
    with capture_routing(root) as records:
        for batch in batches:
            records.clear()
            model(**batch)
            batch_mask = batch.get("attention_mask")
            for r in records:
                if names.setdefault(r.layer, r.name) != r.name:
                    raise ValueError(f"selection_rates: MoE layers {names[r.layer]!r} and {r.name!r} share layer index "
                                     f"{r.layer}; pass within= the module holding the layers to count")
                indices = r.output.indices  # [T, K]
                mask = r.context.get("mask")
                if mask is None and batch_mask is not None and batch_mask.numel() == indices.shape[0]:
                    mask = batch_mask
                real = (torch.ones(indices.shape[0], dtype=torch.bool, device=indices.device) if mask is None
                        else mask.reshape(-1).bool().to(indices.device))
                chosen = torch.zeros(indices.shape[0], r.num_experts + 1, device=indices.device)
                chosen.scatter_(1, torch.where(indices >= 0, indices, r.num_experts), 1.0)  # column E: empty slots
                per_expert = chosen[real, : r.num_experts].sum(dim=0).double().cpu()
                counts[r.layer] = counts.get(r.layer, torch.zeros(r.num_experts, dtype=torch.float64)) + per_expert
                tokens[r.layer] = tokens.get(r.layer, 0) + int(real.sum())
    if not counts:
        raise ValueError(f"selection_rates: no SparseMoE layer of {type(root).__name__} ran on the batches")
    total = max(tokens.values())
    if total == 0:
        raise ValueError("selection_rates: the batches hold no real token (every attention_mask entry is 0)")
    return {layer: counts[layer] / max(tokens[layer], 1) for layer in sorted(counts)}, total


def attribute_experts(model: nn.Module, behaviour: Iterable[Mapping], contrast: Iterable[Mapping], *,
                      within: nn.Module | None = None) -> ExpertAttribution:
    """fTRI: rank each layer's experts by how much more the behaviour set chooses them than the contrast set.

    Args:
        model: called as `model(**batch)`.
        behaviour: batches of prompts that show the behaviour.
        contrast: batches of prompts that do not.
        within: the module whose MoE layers are counted (see `selection_rates`).
    """
    b, nb = selection_rates(model, behaviour, within=within)
    c, nc = selection_rates(model, contrast, within=within)
    if set(b) != set(c):
        raise ValueError(f"attribute_experts: the behaviour set ran MoE layers {sorted(b)} but the contrast set {sorted(c)}")
    return ExpertAttribution(b, c, nb, nc)


__all__ = ["ExpertAttribution", "attribute_experts", "selection_rates"]
