"""Sparse upcycling: turn a dense transformers causal LM into a sparse MoE LM.

A transform over a built model (not a twin builder): each chosen decoder layer's gated MLP
(`gate_proj`, `up_proj`, `down_proj`, SiLU) is copied into every expert of a `SparseMoE` and a
router is added (Komatsuzaki et al. 2022; MoE-LLaVA stage 3). With renormalized top-k weights the
upcycled model computes exactly what the dense one did, whatever the router says.
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
