"""Sparse upcycling: turn a dense transformers causal LM into a sparse MoE LM.

A transform over a built model (not a twin builder): each chosen decoder layer's gated MLP
(`gate_proj`, `up_proj`, `down_proj`, SiLU) is copied into every expert of a `SparseMoE` and a
router is added (Komatsuzaki et al. 2022; MoE-LLaVA stage 3). With renormalized top-k weights the
upcycled model computes exactly what the dense one did, whatever the router says.
`upcycle_from_experts` seeds the experts from specialized copies of the FFNs instead (Uni-MoE
stage 2, MedPLIB).
"""

from __future__ import annotations

import torch
from torch import nn

from zoo.config import MoEConfig
from zoo.lm import MoEBlock, MoECausalLM, decoder_layers
from zoo.moe.experts import SwiGLUExperts
from zoo.moe.layer import build_sparse_moe

_GATED = ("gate_proj", "up_proj", "down_proj")


def _check_gated_mlp(mlp: nn.Module, index: int) -> None:
    missing = [n for n in _GATED if not isinstance(getattr(mlp, n, None), nn.Linear)]
    if missing:
        raise ValueError(
            f"upcycle: layer {index}'s mlp ({type(mlp).__name__}) has no {'/'.join(missing)} linear(s); "
            f"upcycling needs a gated SwiGLU MLP with {', '.join(_GATED)}"
        )
    if any(getattr(mlp, n).bias is not None for n in _GATED):
        raise ValueError(f"upcycle: layer {index}'s mlp has biased projections; SwiGLU experts have no bias")
    act = getattr(mlp, "act_fn", None)
    if not isinstance(act, nn.SiLU) and type(act).__name__ not in ("SiLUActivation", "SiLU"):
        raise ValueError(
            f"upcycle: layer {index}'s mlp uses activation {type(act).__name__}; the experts are SwiGLU (SiLU)"
        )


def upcycle(model: nn.Module, config: MoEConfig | None = None, **kwargs) -> MoECausalLM:
    """Replace chosen dense MLPs of `model` by sparse MoE layers whose experts copy them.

    The model is changed in place and returned wrapped in `MoECausalLM`.

    Args:
        model: a built transformers causal LM (Llama, Qwen2, Mistral, ...).
        config: an `MoEConfig`; or pass its fields as keywords
            (`num_experts=`, `top_k=`, `layers="all" | "every_other" | "first_half" |
            "second_half" | [indices]`, `router=`, `norm_topk_prob=`, `aux_loss_coef=`, ...).

    Returns:
        The MoE LM. A shared expert, if configured, starts with a zero `down_proj` so the model
        still equals the dense one at initialization.
    """
    if isinstance(model, MoECausalLM):
        raise ValueError("upcycle: the model is already an MoECausalLM")
    if config is not None and kwargs:
        raise ValueError(f"upcycle: pass either an MoEConfig or keyword fields, not both (got {sorted(kwargs)})")
    cfg = config if config is not None else MoEConfig.from_dict(kwargs)
    layers = decoder_layers(model)
    indices = cfg.moe_layer_indices(len(layers))
    for i in indices:
        _check_gated_mlp(layers[i].mlp, i)
    std = getattr(getattr(model, "config", None), "initializer_range", 0.02)
    for i in indices:
        mlp = layers[i].mlp
        ref = mlp.gate_proj.weight
        moe = build_sparse_moe(cfg, ref.shape[1], ref.shape[0])
        moe.experts = SwiGLUExperts.from_dense(mlp, cfg.num_experts)
        with torch.no_grad():
            nn.init.normal_(moe.router.weight, std=std)
            if moe.shared_expert is not None:
                moe.shared_expert.down_proj.weight.zero_()
        layers[i].mlp = MoEBlock(moe.to(device=ref.device, dtype=ref.dtype))
    return MoECausalLM(model, cfg)


def _expert_weights(copy, index: int, j: int, like: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate [f, d], up [f, d], down [d, f]) of layer `index` in specialized copy `j`, checked against `like`."""
    where = f"upcycle_from_experts: copy {j}, layer {index}"
    if isinstance(copy, nn.Module):
        try:
            mlp = decoder_layers(copy)[index].mlp
        except IndexError:
            raise ValueError(f"{where}: the copy ({type(copy).__name__}) has fewer decoder layers") from None
        if isinstance(mlp, MoEBlock):
            raise ValueError(f"{where}: the copy's mlp is already a sparse MoE layer; copies must be dense models")
        missing = [n for n in _GATED if not isinstance(getattr(mlp, n, None), nn.Linear)]
        if missing:
            raise ValueError(f"{where}: the copy's mlp ({type(mlp).__name__}) has no {'/'.join(missing)} linear(s)")
        state = mlp.state_dict()
    else:
        keys = {int(k) for k in copy}
        if index not in keys:
            raise ValueError(f"{where}: the copy has no entry for layer {index} (it has layers {sorted(keys)})")
        entry = copy[index] if index in copy else copy[str(index)]
        state = entry.state_dict() if isinstance(entry, nn.Module) else dict(entry)
    expected = {f"{n}.weight": getattr(like, n).weight.shape for n in _GATED}
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
    model: nn.Module, expert_mlps: list, config: MoEConfig | None = None, **kwargs
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
    if config is not None and kwargs:
        raise ValueError(
            f"upcycle_from_experts: pass either an MoEConfig or keyword fields, not both (got {sorted(kwargs)})"
        )
    cfg = config if config is not None else MoEConfig.from_dict(kwargs)
    if isinstance(expert_mlps, (nn.Module, dict)) or not expert_mlps:
        raise ValueError(
            "upcycle_from_experts: expert_mlps must be a non-empty list of specialized copies "
            f"(models or {{layer: FFN state dict}}), got {type(expert_mlps).__name__}"
        )
    n = len(expert_mlps)
    if cfg.num_experts % n:
        raise ValueError(
            f"upcycle_from_experts: num_experts={cfg.num_experts} is not a multiple of the {n} specialized copies "
            f"(expert j is seeded from copy j % {n}); use num_experts={n} or a multiple of it"
        )
    layers = decoder_layers(model)
    indices = cfg.moe_layer_indices(len(layers))
    for i in indices:
        _check_gated_mlp(layers[i].mlp, i)
    weights = {i: [_expert_weights(c, i, j, layers[i].mlp) for j, c in enumerate(expert_mlps)] for i in indices}
    moe_lm = upcycle(model, cfg)
    moes = moe_lm.moe_layers()
    with torch.no_grad():
        for i in indices:
            experts = moes[i].experts
            for e in range(cfg.num_experts):
                gate, up, down = weights[i][e % n]
                experts.gate_up_proj[e].copy_(torch.cat([gate, up], dim=0))
                experts.down_proj[e].copy_(down)
    return moe_lm
