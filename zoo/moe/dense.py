"""One inspector for the dense FFNs inside transformers decoders: what is there, or why it does not fit.

Upcycling, LoRA experts and export all need to know what a decoder layer's `mlp` is: a gated FFN
(`gate_proj`/`up_proj`/`down_proj` linears and an activation: Llama, Qwen2, Mistral, Gemma; or
Phi-3's fused `gate_up_proj`), or a plain one (`fc1`/`fc2` linears: Phi; GPT-2's Conv1D
`c_fc`/`c_proj`), with which activation and biases. They ask here (`gated_mlp` for the
`gate_proj/up_proj/down_proj` form LoRA experts adapt, `ffn_spec` for any kind upcycling copies),
so the rules and their error messages live in one place.

It sits in the MoE core (expert kinds read dense FFNs in `from_dense`), below `zoo.models`;
`zoo.models.mlp` re-exports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from zoo.moe.activations import ACTIVATIONS, activation_name

GATED_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


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
    from zoo.moe.block import MoEBlock

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


@dataclass(frozen=True)
class FFNSpec:
    """A dense FFN's weights in one canonical layout, whatever module held them.

    Attributes:
        kind: "gated" (`down(act(gate x + bg) * (up x + bu)) + bd`) or "plain" (`fc2(act(fc1 x + b1)) + b2`).
        activation: an `ACTIVATIONS` name.
        w_in: gated: `[2f, d]` gate rows then up rows; plain: `[f, d]`.
        b_in: bias of `w_in` (`[2f]` / `[f]`) or None.
        w_out: `[d, f]`.
        b_out: `[d]` or None.
        source: what it was read from (e.g. "gate_proj/up_proj/down_proj").
    """

    kind: str
    activation: str
    w_in: torch.Tensor
    b_in: torch.Tensor | None
    w_out: torch.Tensor
    b_out: torch.Tensor | None
    source: str

    @property
    def hidden_size(self) -> int:
        return self.w_in.shape[1]

    @property
    def intermediate_size(self) -> int:
        return self.w_out.shape[1]

    @property
    def has_bias(self) -> bool:
        return self.b_in is not None or self.b_out is not None


def _conv1d_weight(module: nn.Module) -> torch.Tensor | None:
    """transformers' `Conv1D` computes `x @ weight + bias` with weight `[in, out]`: its `[out, in]` form."""
    if type(module).__name__ == "Conv1D" and hasattr(module, "weight"):
        return module.weight.t()
    return None


def _act(mlp: nn.Module, where: str, names=("act_fn", "activation_fn", "act", "gelu")) -> str:
    for n in names:
        act = getattr(mlp, n, None)
        if callable(act):
            name = activation_name(act)
            if name not in ACTIVATIONS:
                raise ValueError(f"{where} uses activation {type(act).__name__}, which no expert kind computes "
                                 f"(known: {sorted(ACTIVATIONS)})")
            return name
    raise ValueError(f"{where} ({type(mlp).__name__}) has no activation ({'/'.join(names)})")


def ffn_spec(mlp: nn.Module, where: str) -> FFNSpec:
    """Read a dense FFN of any kind the zoo's experts can hold.

    Recognized: `gate_proj`/`up_proj`/`down_proj` linears (Llama, Qwen2, Mistral, Gemma); a fused
    `gate_up_proj` (gate half first) with `down_proj` (Phi-3); `fc1`/`fc2` linears (Phi);
    `c_fc`/`c_proj` Conv1D (GPT-2); `fc1`/`act`/`fc2` (timm ViT `Mlp`); `c_fc`/`gelu`/`c_proj` linears
    (open_clip ViT).

    Raises:
        ValueError: an MoE layer already, or none of those forms; the message says what was found.
    """
    from zoo.moe.block import MoEBlock

    if isinstance(mlp, MoEBlock):
        raise ValueError(f"{where} is already a sparse MoE layer ({type(mlp.moe.experts).__name__}); a dense FFN was expected")

    def lin(name):
        m = getattr(mlp, name, None)
        return m if isinstance(m, nn.Linear) else None

    def bias(*ms):
        bs = [m.bias for m in ms]
        return None if all(b is None for b in bs) else torch.cat([b if b is not None else torch.zeros(m.out_features, device=m.weight.device, dtype=m.weight.dtype) for m, b in zip(ms, bs)])

    if lin("gate_proj") and lin("up_proj") and lin("down_proj"):
        g, u, dn = lin("gate_proj"), lin("up_proj"), lin("down_proj")
        return FFNSpec("gated", _act(mlp, where), torch.cat([g.weight, u.weight]), bias(g, u), dn.weight, dn.bias,
                       "gate_proj/up_proj/down_proj")
    if lin("gate_up_proj") and lin("down_proj"):
        gu, dn = lin("gate_up_proj"), lin("down_proj")
        return FFNSpec("gated", _act(mlp, where), gu.weight, gu.bias, dn.weight, dn.bias, "gate_up_proj/down_proj")
    if lin("fc1") and lin("fc2"):
        a, b = lin("fc1"), lin("fc2")
        return FFNSpec("plain", _act(mlp, where), a.weight, a.bias, b.weight, b.bias, "fc1/fc2")
    if lin("c_fc") and lin("c_proj"):  # open_clip's ViT MLP: Sequential(c_fc, gelu, c_proj)
        a, b = lin("c_fc"), lin("c_proj")
        return FFNSpec("plain", _act(mlp, where), a.weight, a.bias, b.weight, b.bias, "c_fc/c_proj")
    c_fc, c_proj = _conv1d_weight(getattr(mlp, "c_fc", None)), _conv1d_weight(getattr(mlp, "c_proj", None))
    if c_fc is not None and c_proj is not None:
        return FFNSpec("plain", _act(mlp, where), c_fc, mlp.c_fc.bias, c_proj, mlp.c_proj.bias, "c_fc/c_proj (Conv1D)")
    found = sorted(n for n, c in mlp.named_children())
    raise ValueError(
        f"{where} ({type(mlp).__name__}) is no FFN an expert kind can hold (it has {found}); expected "
        "gate_proj/up_proj/down_proj, gate_up_proj/down_proj, fc1/fc2 linears or c_fc/c_proj Conv1D"
    )


__all__ = ["FFNSpec", "GATED_PROJECTIONS", "GatedMLP", "activation_name", "ffn_spec", "gated_mlp", "swiglu_mlp"]
