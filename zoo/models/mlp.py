"""The dense-FFN inspector, re-exported from the MoE core (`zoo.moe.dense`, where expert kinds read it)."""

from zoo.moe.dense import FFNSpec, GATED_PROJECTIONS, GatedMLP, activation_name, ffn_spec, gated_mlp, swiglu_mlp

__all__ = ["FFNSpec", "GATED_PROJECTIONS", "GatedMLP", "activation_name", "ffn_spec", "gated_mlp", "swiglu_mlp"]
