"""Weight-only quantization of a built model's stacked experts (FineQuant; Kim et al. 2023).

`quantize_experts(model, bits=, group_size=)` replaces every stacked experts module (`swiglu`,
`glu`, `mlp` kinds, wherever they sit: LM MoE layers, an upcycled vision tower) with a
`QuantizedExperts` holding int8 / int4 codes and scales, in place, and returns the resolved
`QuantizationConfig` (the group size of every matrix) for `ModelConfig.quantization`, so that
`build_model(cfg)` rebuilds the same structure. Attention, embeddings, routers, norms, shared
experts, connectors (the Parrot projector's experts included) and LoRA experts stay as they are.

FineQuant's adaptive granularity starts from column-wise quantization and halves a matrix's
groups while the ranges within them are dominated by outliers, using the weights alone. The exact
test and threshold are ours (we could not pin the paper's down), stated: per
stacked projection (all E experts of one layer's `gate_up_proj` share a group size, so they stack),
halve the group g while the mean over all groups of `min / max` of the absmax of the two halves a
split would make is below `threshold` (a half much quieter than its neighbour is quantized with a
step its neighbour's outlier set), and while g / 2 >= `min_group_size` (and stays even for int4).
Measured (bench/RESULTS.md): on trained weights (the tiny zoo's experts, MiniLM's FFNs) the
half-range ratios are 0.75-0.87 at every level, so it keeps per-channel scales, which fixed groups
of 32-128 beat in error at a few percent more bytes; it pays off only on outlier-dominated matrices.
"""

from __future__ import annotations

import torch
from torch import nn

from zoo.moe.experts import EXPERTS
from zoo.moe.quantized import QuantizationConfig, QuantizedExperts


def expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> every stacked experts module in `model` (float `EXPERTS` kinds or quantized)."""
    kinds = tuple(EXPERTS.get(n) for n in EXPERTS.names())
    return {path: m for path, m in model.named_modules() if type(m) in kinds or isinstance(m, QuantizedExperts)}


def adaptive_group_size(w: torch.Tensor, bits: int, min_group_size: int = 32, threshold: float = 0.7) -> int:
    """FineQuant's adaptive granularity for one stacked matrix (our reading; see the module docstring).

    Args:
        w: `[..., N, K]` weights (e.g. `[E, 2f, d]`).
        bits: 8 or 4 (int4 groups stay even).
        min_group_size: the smallest group to pick.
        threshold: halve while the mean half-range ratio is below it.

    Returns:
        The group size g (a divisor of K; K itself is per channel).
    """
    k = w.shape[-1]
    absw = w.detach().abs().to(torch.float32)
    g = k
    while g % 2 == 0 and g // 2 >= min_group_size and (bits == 8 or (g // 2) % 2 == 0):
        halves = absw.reshape(*w.shape[:-1], k // g, 2, g // 2).amax(dim=-1)  # [..., N, G, 2]
        ratio = halves.amin(dim=-1) / halves.amax(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
        if float(ratio.mean()) >= threshold:
            break
        g //= 2
    return g


def _group_sizes(experts: nn.Module, cfg: QuantizationConfig) -> tuple[int | None, int | None]:
    if not cfg.adaptive:
        return cfg.group_size, cfg.group_size
    w_in, w_out = getattr(experts, type(experts).in_proj), getattr(experts, type(experts).out_proj)
    return tuple(adaptive_group_size(w, cfg.bits, cfg.min_group_size, cfg.threshold) for w in (w_in, w_out))


def quantize_experts(model: nn.Module, config: QuantizationConfig | dict | None = None, *, bits: int = 8,
                     group_size: int | None = None, adaptive: bool = False) -> QuantizationConfig:
    """Replace every stacked experts module of `model` with its weight-only quantized form, in place.

    Args:
        model: any module holding `EXPERTS` modules (a `MultimodalMoE`, an `MoECausalLM`, a `SparseMoE`).
        config: a `QuantizationConfig` (or its dict); when given, `bits`, `group_size`, `adaptive`
            are ignored. A config with `group_sizes` (from a checkpoint) fixes every matrix's group
            size and must name exactly the model's experts modules.
        bits: 8 or 4.
        group_size: inputs per scale (None: per channel).
        adaptive: FineQuant's adaptive granularity (`adaptive_group_size`).

    Returns:
        The resolved config: `group_sizes` holds `[g_in, g_out]` per module path.

    Raises:
        ValueError: bits not in {4, 8}; a group size that does not divide a projection's input
            dimension (the module and projection named); no experts to quantize; already quantized;
            recorded group sizes that name other modules.
    """
    if config is None:
        config = QuantizationConfig(bits=bits, group_size=group_size, adaptive=adaptive)
    elif isinstance(config, dict):
        config = QuantizationConfig(**config)
    found = expert_modules(model)
    if not found:
        raise ValueError(f"quantize: {type(model).__name__} holds no stacked experts ({EXPERTS.names()} kinds) to quantize")
    done = sorted(p for p, m in found.items() if isinstance(m, QuantizedExperts))
    if done:
        raise ValueError(f"quantize: experts {done[:3]} are already quantized")
    if config.group_sizes and set(config.group_sizes) != set(found):
        raise ValueError(f"quantize: the recorded group_sizes name {sorted(config.group_sizes)[:3]}..., but the model's "
                         f"experts are {sorted(found)[:3]}...")
    if "" in found:
        raise ValueError("quantize: pass the module that holds the experts (a model or a SparseMoE), not the experts "
                         "module itself")
    resolved = {}
    for path, experts in found.items():
        sizes = tuple(config.group_sizes[path]) if config.group_sizes else _group_sizes(experts, config)
        try:
            q = QuantizedExperts.from_float(experts, config.bits, sizes)
        except ValueError as e:
            raise ValueError(f"{path or type(model).__name__}: {e}") from None
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, q)
        resolved[path] = list(q.group_sizes)
    return QuantizationConfig(**{**config.to_dict(), "group_sizes": resolved})


def expert_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the stacked expert weights of `model`: `float32` (what float experts hold at fp32),
    and for quantized ones `codes` and `scales` (biases excluded: they stay float either way)."""
    total = {"float32": 0, "codes": 0, "scales": 0}
    for m in expert_modules(model).values():
        if isinstance(m, QuantizedExperts):
            for k, v in m.weight_bytes().items():
                total[k] += v
        else:
            w_in, w_out = getattr(m, type(m).in_proj), getattr(m, type(m).out_proj)
            total["float32"] += (w_in.numel() + w_out.numel()) * 4
    return total


__all__ = ["adaptive_group_size", "expert_modules", "expert_weight_bytes", "quantize_experts"]
