"""Per-layer expert load by task family: measured on samples of each family, drawn as a PNG.

Answers the question MoE-LLaVA and Uni-MoE ask of a trained model: do experts specialize by
modality/task, or do all families route alike?
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from zoo.pipelines.collate import collate


@torch.no_grad()
def expert_load_by_family(model, processor, datasets: Mapping[str, Sequence], *, samples: int = 32,
                          batch_size: int = 16) -> dict[str, dict[int, list[float]]]:
    """Mean expert load fraction per MoE layer for each family's first `samples` samples.

    Returns:
        family -> layer -> `[E]` load fractions (each sums to 1); empty if the model has no MoE layer.
        LM layers are ints; MoE blocks inside an encoder are "<modality> encoder <block>".
    """
    was_training = model.training
    model.eval()
    out: dict[str, dict[int, list[float]]] = {}
    for family, data in sorted(datasets.items()):
        sums: dict[int, torch.Tensor] = {}
        chunk = list(data[:samples])
        for start in range(0, len(chunk), batch_size):
            result = model(**collate(chunk[start : start + batch_size], processor))
            for stats in result.routing or []:
                sums[stats.layer] = sums.get(stats.layer, 0) + stats.load
            for modality, layers in (getattr(result, "encoder_routing", None) or {}).items():
                for stats in layers:  # MoE blocks inside an encoder: "<modality> encoder <block>"
                    key = f"{modality} encoder {stats.layer}"
                    sums[key] = sums.get(key, 0) + stats.load
        if sums:
            out[family] = {layer: (s / s.sum()).tolist() for layer, s in sorted(sums.items(), key=_layer_order)}
    model.train(was_training)
    return out


def _layer_order(item) -> tuple:
    """LM layers (ints) first in order, then encoder blocks ("image encoder 3") by name and block."""
    layer = item[0]
    if isinstance(layer, int):
        return (0, "", layer)
    name, _, block = str(layer).rpartition(" ")
    return (1, name, int(block) if block.isdigit() else 0)


def plot_expert_load(loads: Mapping[str, Mapping[int, Sequence[float]]], path: str | Path, title: str = "") -> Path:
    """Grouped bars: one panel per MoE layer, experts on x, one bar per family; saved as PNG. Each panel's
    title gives the layer's MaxVio (max load / mean load - 1, DeepSeek's imbalance), the worst family's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted(loads)
    layers = sorted({layer for f in families for layer in loads[f]}, key=lambda layer: _layer_order((layer, None)))
    if not layers:
        raise ValueError("plot_expert_load: no MoE layer loads to plot")
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers) + 1, 3), squeeze=False, sharey=True)
    width = 0.8 / len(families)
    for ax, layer in zip(axes[0], layers):
        num_experts = max(len(loads[f][layer]) for f in families if layer in loads[f])  # layers may differ in E
        for i, family in enumerate(families):
            xs = [e + (i - (len(families) - 1) / 2) * width for e in range(num_experts)]
            ax.bar(xs, loads[family].get(layer, [0] * num_experts), width, label=family)
        ax.axhline(1 / num_experts, color="gray", lw=0.8, ls="--")
        vio = max(num_experts * max(loads[f][layer]) - 1 for f in families if layer in loads[f])  # MaxVio
        ax.set_title((f"layer {layer}" if isinstance(layer, int) else str(layer)) + f"\nMaxVio {vio:.2f}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(num_experts))
    axes[0][0].set_ylabel("load fraction")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title or "expert load by task family (dashed: uniform)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_stage_routing(model, processor, datasets: Mapping[str, Sequence], path: str | Path, title: str) -> None:
    """After a stage: the per-layer expert load of each task family as `path` (PNG) and `.json`; nothing without MoE."""
    import json

    loads = expert_load_by_family(model, processor, datasets)
    if loads:
        plot_expert_load(loads, path, f"{title}: expert load by task family (dashed: uniform)")
        Path(path).with_suffix(".json").write_text(json.dumps(loads, indent=1))
