"""Sparse upcycling: turn a dense transformers causal LM into a sparse MoE LM (`UPCYCLERS`).

A transform over a built model (not a twin builder): each chosen decoder layer's dense FFN becomes
a `SparseMoE` whose experts an upcycler initializes from it, and a router is added (Komatsuzaki
et al. 2022, "Sparse Upcycling"; MoE-LLaVA stage 3). Upcyclers are `UPCYCLERS` entries:

- `copy`: every expert is a copy of the dense FFN, so with renormalized top-k weights the
  upcycled model computes exactly what the dense one did, whatever the router says. Given
  specialized FFN copies (`expert_seeds`, Uni-MoE stage 2, MedPLIB), expert j copies copy j mod n
  instead (`upcycle_from_experts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zoo.models.lm import MoEBlock, MoECausalLM, decoder_layers
from zoo.models.mlp import GATED_PROJECTIONS, swiglu_mlp
from zoo.moe.config import MoEConfig
from zoo.moe.experts import EXPERTS
from zoo.moe.layer import build_sparse_moe
from zoo.registry import Registry

UPCYCLERS: Registry = Registry("upcycler")

ExpertSeeds = list  # n specialized FFN copies: models, or {layer index: FFN state dict | module}


@UPCYCLERS.register("copy")
@dataclass
class CopyUpcycler:
    """Experts start as copies of the dense FFN (or of specialized copies of it).

    Sparse Upcycling (Komatsuzaki et al. 2022): with renormalized top-k weights the MoE equals the
    dense FFN at initialization. With `seeds` (n specialized copies), expert j starts from copy
    `j % n` (Uni-MoE stage 2); the model then no longer equals the dense one at init.
    """

    preserves_dense = True  # without seeds

    def experts(self, mlp: nn.Module, cfg: MoEConfig, *, layer: int, seeds: list | None = None) -> nn.Module:
        """The experts module for decoder layer `layer`, initialized from its dense `mlp`."""
        experts = EXPERTS.get(cfg.experts).from_dense(mlp, cfg.num_experts)
        if seeds:
            with torch.no_grad():
                for e in range(cfg.num_experts):
                    gate, up, down = seeds[e % len(seeds)]
                    experts.gate_up_proj[e].copy_(torch.cat([gate, up], dim=0))
                    experts.down_proj[e].copy_(down)
        return experts


def _config(cfg: MoEConfig | None, kwargs: dict[str, Any], who: str) -> MoEConfig:
    if cfg is not None and kwargs:
        raise ValueError(f"{who}: pass either an MoEConfig or keyword fields, not both (got {sorted(kwargs)})")
    return cfg if cfg is not None else MoEConfig.from_dict(kwargs)


def upcycle(
    model: nn.Module,
    config: MoEConfig | None = None,
    *,
    method: str = "copy",
    method_options: dict[str, Any] | None = None,
    expert_seeds: ExpertSeeds | None = None,
    **kwargs,
) -> MoECausalLM:
    """Replace chosen dense MLPs of `model` by sparse MoE layers whose experts come from them.

    The model is changed in place and returned wrapped in `MoECausalLM`. Nothing is changed when
    it raises.

    Args:
        model: a built transformers causal LM (Llama, Qwen2, Mistral, ...).
        config: an `MoEConfig`; or pass its fields as keywords (`num_experts=`,
            `router_options={"top_k": 2}`, `layers="every_other"`, `loss_coefs={"balance": 0.01}`, ...).
        method: the `UPCYCLERS` entry that initializes the experts.
        method_options: its options.
        expert_seeds: specialized FFN copies for the experts (see `upcycle_from_experts`).

    Returns:
        The MoE LM. A shared expert, if configured, starts with a zero `down_proj` so the model
        still equals the dense one at initialization.
    """
    if isinstance(model, MoECausalLM):
        raise ValueError("upcycle: the model is already an MoECausalLM")
    cfg = _config(config, kwargs, "upcycle")
    upcycler = UPCYCLERS.build(method, method_options)
    layers = decoder_layers(model)
    indices = cfg.moe_layer_indices(len(layers))
    for i in indices:
        swiglu_mlp(layers[i].mlp, f"upcycle: layer {i}'s mlp")
        width = layers[i].mlp.gate_proj.out_features
        if cfg.expert_intermediate_size not in (None, width):
            raise ValueError(
                f"upcycle: method {method!r} copies the dense FFN (width {width}) into each expert, but "
                f"expert_intermediate_size={cfg.expert_intermediate_size}"
            )
    seeds = _seed_weights(expert_seeds, layers, indices, cfg) if expert_seeds is not None else {}
    std = getattr(getattr(model, "config", None), "initializer_range", 0.02)
    for i in indices:
        mlp = layers[i].mlp
        ref = mlp.gate_proj.weight
        moe = build_sparse_moe(cfg, ref.shape[1], ref.shape[0])
        moe.experts = upcycler.experts(mlp, cfg, layer=i, seeds=seeds.get(i))
        with torch.no_grad():
            moe.router.reset_parameters(std)
            if moe.shared_expert is not None:
                moe.shared_expert.down_proj.weight.zero_()
        layers[i].mlp = MoEBlock(moe.to(device=ref.device, dtype=ref.dtype))
    return MoECausalLM(model, cfg)


def _seed_weights(copies: ExpertSeeds, layers: nn.ModuleList, indices: list[int], cfg: MoEConfig) -> dict[int, list]:
    """Layer -> per copy (gate [f, d], up [f, d], down [d, f]), checked against the model's FFNs."""
    if isinstance(copies, (nn.Module, dict)) or not copies:
        raise ValueError(
            "upcycle_from_experts: expert_mlps must be a non-empty list of specialized copies "
            f"(models or {{layer: FFN state dict}}), got {type(copies).__name__}"
        )
    n = len(copies)
    if cfg.num_experts % n:
        raise ValueError(
            f"upcycle_from_experts: num_experts={cfg.num_experts} is not a multiple of the {n} specialized copies "
            f"(expert j is seeded from copy j % {n}); use num_experts={n} or a multiple of it"
        )
    return {i: [_expert_weights(c, i, j, layers[i].mlp) for j, c in enumerate(copies)] for i in indices}


def _expert_weights(copy, index: int, j: int, like: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate [f, d], up [f, d], down [d, f]) of layer `index` in specialized copy `j`, checked against `like`."""
    where = f"upcycle_from_experts: copy {j}, layer {index}"
    if isinstance(copy, nn.Module):
        try:
            mlp = decoder_layers(copy)[index].mlp
        except IndexError:
            raise ValueError(f"{where}: the copy ({type(copy).__name__}) has fewer decoder layers") from None
        swiglu_mlp(mlp, f"{where}: the copy's mlp")
        state = mlp.state_dict()
    else:
        keys = {int(k) for k in copy}
        if index not in keys:
            raise ValueError(f"{where}: the copy has no entry for layer {index} (it has layers {sorted(keys)})")
        entry = copy[index] if index in copy else copy[str(index)]
        state = entry.state_dict() if isinstance(entry, nn.Module) else dict(entry)
    expected = {f"{n}.weight": getattr(like, n).weight.shape for n in GATED_PROJECTIONS}
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise ValueError(
            f"{where}: unexpected keys {unknown} in the FFN state dict (expected exactly {sorted(expected)}; "
            "SwiGLU experts have no biases)"
        )
    for key, shape in expected.items():
        if key not in state:
            raise ValueError(f"{where}: the FFN state dict has no {key!r}")
        if tuple(state[key].shape) != tuple(shape):
            raise ValueError(
                f"{where}: {key} has shape {tuple(state[key].shape)} but the model's FFN has {tuple(shape)}"
            )
    return state["gate_proj.weight"], state["up_proj.weight"], state["down_proj.weight"]


def upcycle_from_experts(
    model: nn.Module, expert_mlps: ExpertSeeds, config: MoEConfig | None = None, **kwargs
) -> MoECausalLM:
    """Upcycle `model` with experts seeded from specialized FFN copies (Uni-MoE stage 2, MedPLIB).

    Expert j of every MoE layer i starts as copy `j % n` of layer i's dense FFN (n = number of
    copies), so `num_experts == n` gives one expert per copy and `num_experts = m * n` gives m
    experts per copy. Everything outside the FFNs (attention, norms, embeddings) comes from
    `model`; routers start fresh. Unlike `upcycle`, the result does not equal `model` at
    initialization: routing a token to expert j (top-1) gives copy j's FFN.

    Args:
        model: a built dense transformers causal LM (changed in place), the FFNs' shapes reference.
        expert_mlps: n specialized copies, each either a causal LM with the same decoder layout
            (its layer i's `mlp` is used) or a dict `{layer index: FFN}` where FFN is a state dict
            with exactly `gate_proj.weight [f, d]`, `up_proj.weight [f, d]`, `down_proj.weight [d, f]`
            or a module with those linears. A dict needs an entry for every MoE layer.
        config: an `MoEConfig`, or its fields as keywords (as in `upcycle`).

    Returns:
        The MoE LM (`MoECausalLM`).

    Raises:
        ValueError: no copies; `num_experts` not a multiple of the number of copies; a copy lacks a
            layer, has the wrong keys or shapes, or is not a dense gated model; `model`'s MLPs are
            not gated SwiGLU (as in `upcycle`). Nothing is changed when it raises.
    """
    if isinstance(model, MoECausalLM):
        raise ValueError("upcycle_from_experts: the model is already an MoECausalLM")
    cfg = _config(config, kwargs, "upcycle_from_experts")
    if isinstance(expert_mlps, (nn.Module, dict)) or not expert_mlps:
        _seed_weights(expert_mlps, nn.ModuleList(), [], cfg)  # raises naming the cause
    return upcycle(model, cfg, expert_seeds=expert_mlps)


__all__ = ["CopyUpcycler", "UPCYCLERS", "upcycle", "upcycle_from_experts"]
