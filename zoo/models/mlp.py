"""One inspector for the dense FFNs inside transformers decoders: what is there, or why it does not fit.

Upcycling, LoRA experts and export all need to know whether a decoder layer's `mlp` is a gated
FFN (`gate_proj`, `up_proj`, `down_proj` linears and an `act_fn`), with which activation and
whether it has biases. They ask here, so the rule and its error messages live in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

GATED_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def activation_name(act: object) -> str:
    """A short name for an activation module or function: 'silu', 'gelu', 'gelu_tanh', or its class name."""
    if isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU"):
        return "silu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    name = type(act).__name__
    if name in ("GELUActivation",):
        return "gelu"
    if name in ("PytorchGELUTanh", "GELUTanh", "NewGELUActivation", "GELUPytorchTanh"):
        return "gelu_tanh"
    return getattr(act, "__name__", name)


@dataclass(frozen=True)
class GatedMLP:
    """A dense gated FFN `down(act(gate(x)) * up(x))` found in a decoder layer.

    Attributes:
        gate, up, down: its linears (`[f, d]`, `[f, d]`, `[d, f]` weights).
        act: its activation (callable).
        activation: `activation_name(act)`.
        has_bias: whether any of the three linears has a bias.
    """

    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear
    act: Callable
    activation: str
    has_bias: bool

    @property
    def hidden_size(self) -> int:
        return self.gate.in_features

    @property
    def intermediate_size(self) -> int:
        return self.gate.out_features


def gated_mlp(mlp: nn.Module, where: str) -> GatedMLP:
    """Inspect `mlp` as a gated FFN.

    Args:
        mlp: a decoder layer's `mlp`.
        where: prefix for errors, e.g. "upcycle: layer 3's mlp".

    Raises:
        ValueError: naming what is missing (it is not a gated FFN: no `gate_proj`/... linears, or an
            MoE layer already) and what was found instead.
    """
    from zoo.models.lm import MoEBlock

    if isinstance(mlp, MoEBlock):
        raise ValueError(f"{where} is already a sparse MoE layer ({type(mlp.moe.experts).__name__}); a dense gated FFN was expected")
    missing = [n for n in GATED_PROJECTIONS if not isinstance(getattr(mlp, n, None), nn.Linear)]
    if missing:
        found = sorted(n for n, c in mlp.named_children() if isinstance(c, nn.Module))
        raise ValueError(
            f"{where} ({type(mlp).__name__}) has no {'/'.join(missing)} linear(s) (it has {found}); "
            f"a gated FFN with {', '.join(GATED_PROJECTIONS)} and act_fn was expected"
        )
    act = getattr(mlp, "act_fn", None)
    if not callable(act):
        raise ValueError(f"{where} ({type(mlp).__name__}) has no callable act_fn")
    linears = [getattr(mlp, n) for n in GATED_PROJECTIONS]
    return GatedMLP(*linears, act=act, activation=activation_name(act), has_bias=any(m.bias is not None for m in linears))


def swiglu_mlp(mlp: nn.Module, where: str) -> GatedMLP:
    """Inspect `mlp` as a bias-free SwiGLU FFN (what `SwiGLUExperts` and the HF MoE classes hold).

    Raises:
        ValueError: not a gated FFN (see `gated_mlp`), biased projections, or another activation.
    """
    spec = gated_mlp(mlp, where)
    if spec.has_bias:
        raise ValueError(f"{where} has biased projections; SwiGLU experts have no bias")
    if spec.activation != "silu":
        raise ValueError(f"{where} uses activation {type(spec.act).__name__}; the experts are SwiGLU (SiLU)")
    return spec


__all__ = ["GATED_PROJECTIONS", "GatedMLP", "activation_name", "gated_mlp", "swiglu_mlp"]
