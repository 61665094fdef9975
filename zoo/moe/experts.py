"""Expert modules with stacked weights, registered by kind in `EXPERTS`, and dense FFN modules.

Kinds: `swiglu` (bias-free SiLU-gated, the Triton-kernel path), `glu` (gated experts of any
activation, with or without biases: GeGLU, ...) and `mlp` (plain fc1 -> act -> fc2 with biases).

Stacked `[E, ...]` weights (the transformers 5 layout) let one op run all experts without a
Python list of modules; the computation itself lives in `zoo.kernels` (kernel -> op -> module).

Every experts module has the same call, `(x [T, d], weights [T, K], indices [T, K]) -> [T, d]`
(empty slots, `indices == -1`, are skipped), `from_dense(mlp, num_experts)` (E copies of a dense
FFN, for upcycling) and `expert(e)` (expert e as a plain dense module: the reference the tests
compare the stacked computation against).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels import ops
from zoo.registry import Registry

EXPERTS: Registry = Registry("expert kind", context=("num_experts", "hidden_size", "intermediate_size"))


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP with the Llama/Qwen key names (`gate_proj`, `up_proj`, `down_proj`)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = F.silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., d] -> [..., d]`."""
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@EXPERTS.register("swiglu")
class SwiGLUExperts(nn.Module):
    """E SwiGLU experts, `down(silu(gate(x)) * up(x))`, weights stacked per expert.

    Args:
        num_experts: E.
        hidden_size: d.
        intermediate_size: f, the width of each expert.

    Parameters:
        gate_up_proj: `[E, 2f, d]`, gate rows then up rows (transformers' MixtralExperts layout).
        down_proj: `[E, d, f]`.
    """

    in_proj, out_proj, in_bias, out_bias, gated = "gate_up_proj", "down_proj", None, None, True

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Combine the chosen experts' outputs.

        Args:
            x: `[T, d]`.
            weights: `[T, K]` combine weights.
            indices: `[T, K]` expert ids, -1 for an empty slot.

        Returns:
            `[T, d]`.
        """
        return ops.moe_swiglu(x, weights, indices, self.gate_up_proj, self.down_proj)

    @classmethod
    def from_dense(cls, mlp: nn.Module, num_experts: int) -> SwiGLUExperts:
        """E copies of a dense bias-free SwiGLU FFN (`gate_proj`/`up_proj`/`down_proj`, or a fused `gate_up_proj`)."""
        spec = _spec(mlp, "gated", ("silu",), bias=False, kind="swiglu")
        experts = cls(num_experts, spec.hidden_size, spec.intermediate_size).to(device=spec.w_in.device, dtype=spec.w_in.dtype)
        with torch.no_grad():
            experts.gate_up_proj.copy_(spec.w_in.expand(num_experts, -1, -1))
            experts.down_proj.copy_(spec.w_out.expand(num_experts, -1, -1))
        return experts

    def expert(self, e: int) -> SwiGLU:
        """Expert e as a dense `SwiGLU` (a copy of its weights)."""
        f = self.intermediate_size
        mlp = SwiGLU(self.hidden_size, f).to(device=self.down_proj.device, dtype=self.down_proj.dtype)
        with torch.no_grad():
            mlp.gate_proj.weight.copy_(self.gate_up_proj[e, :f])
            mlp.up_proj.weight.copy_(self.gate_up_proj[e, f:])
            mlp.down_proj.weight.copy_(self.down_proj[e])
        return mlp

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}"


def _spec(mlp: nn.Module, ffn_kind: str, activations: tuple[str, ...] | None, *, bias: bool | None, kind: str):
    """The FFN spec of `mlp`, checked to be what expert kind `kind` holds."""
    from zoo.moe.dense import ffn_spec

    spec = ffn_spec(mlp, f"{kind} experts: the dense FFN")
    if spec.kind != ffn_kind:
        raise ValueError(f"{kind} experts hold {ffn_kind} FFNs; {type(mlp).__name__} is a {spec.kind} FFN ({spec.source})")
    if activations is not None and spec.activation not in activations:
        raise ValueError(f"{kind} experts use {activations}; {type(mlp).__name__} uses {spec.activation}")
    if bias is False and spec.has_bias:
        raise ValueError(f"{kind} experts have no biases; {type(mlp).__name__} has biased projections")
    return spec


def _bias_param(num_experts: int, size: int, on: bool) -> nn.Parameter | None:
    return nn.Parameter(torch.zeros(num_experts, size)) if on else None


class DenseGLU(nn.Module):
    """A dense gated FFN `down(act(gate x) * up x)` (expert e of `GLUExperts`, as a plain module)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool) -> None:
        super().__init__()
        from zoo.moe.activations import activation_fn

        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = activation_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DenseMLP(nn.Module):
    """A dense plain FFN `fc2(act(fc1 x))` (expert e of `MLPExperts`, as a plain module)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool) -> None:
        super().__init__()
        from zoo.moe.activations import activation_fn

        self.fc1 = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.fc2 = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.activation_fn = activation_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


@dataclass
class GLUOptions:
    """Options of `glu` experts.

    Attributes:
        activation: the gate's activation (`zoo.moe.activations.ACTIVATIONS`): "gelu" (GeGLU, exact),
            "gelu_tanh" (GeGLU as Gemma computes it), "silu" (SwiGLU with biases), ...
        bias: biases on the three projections (Llama's `mlp_bias`).
    """

    activation: str = "gelu"
    bias: bool = False

    def __post_init__(self) -> None:
        from zoo.moe.activations import activation_fn

        activation_fn(self.activation)


@EXPERTS.register("glu", options=GLUOptions)
class GLUExperts(nn.Module):
    """E gated experts of any activation, `down(act(gate x + bg) * (up x + bu)) + bd`, stacked.

    Bias-free SiLU experts run the Triton kernels like `SwiGLUExperts`; the rest run the
    pure-PyTorch reference (`zoo.kernels.reference.moe_glu`) on every device.

    Parameters:
        gate_up_proj: `[E, 2f, d]`; down_proj: `[E, d, f]`; with `bias`: gate_up_bias `[E, 2f]`,
        down_bias `[E, d]`.
    """

    in_proj, out_proj, in_bias, out_bias, gated = "gate_up_proj", "down_proj", "gate_up_bias", "down_bias", True

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str = "gelu",
                 bias: bool = False) -> None:
        super().__init__()
        GLUOptions(activation, bias)
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.activation, self.bias = activation, bias
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.gate_up_bias = _bias_param(num_experts, 2 * intermediate_size, bias)
        self.down_bias = _bias_param(num_experts, hidden_size, bias)
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """`x [T, d]`, `weights`/`indices [T, K]` (-1: empty) -> `[T, d]`."""
        return ops.moe_glu(x, weights, indices, self.gate_up_proj, self.down_proj, self.activation,
                           self.gate_up_bias, self.down_bias)

    @classmethod
    def from_dense(cls, mlp: nn.Module, num_experts: int) -> GLUExperts:
        """E copies of a dense gated FFN (any activation, biases or not)."""
        spec = _spec(mlp, "gated", None, bias=None, kind="glu")
        experts = cls(num_experts, spec.hidden_size, spec.intermediate_size, spec.activation, spec.has_bias)
        experts = experts.to(device=spec.w_in.device, dtype=spec.w_in.dtype)
        with torch.no_grad():
            experts.gate_up_proj.copy_(spec.w_in.expand(num_experts, -1, -1))
            experts.down_proj.copy_(spec.w_out.expand(num_experts, -1, -1))
            if spec.has_bias:
                experts.gate_up_bias.copy_(_or_zeros(spec.b_in, 2 * spec.intermediate_size, spec.w_in))
                experts.down_bias.copy_(_or_zeros(spec.b_out, spec.hidden_size, spec.w_in))
        return experts

    def expert(self, e: int) -> DenseGLU:
        f = self.intermediate_size
        mlp = DenseGLU(self.hidden_size, f, self.activation, self.bias).to(device=self.down_proj.device,
                                                                          dtype=self.down_proj.dtype)
        with torch.no_grad():
            mlp.gate_proj.weight.copy_(self.gate_up_proj[e, :f])
            mlp.up_proj.weight.copy_(self.gate_up_proj[e, f:])
            mlp.down_proj.weight.copy_(self.down_proj[e])
            if self.bias:
                mlp.gate_proj.bias.copy_(self.gate_up_bias[e, :f])
                mlp.up_proj.bias.copy_(self.gate_up_bias[e, f:])
                mlp.down_proj.bias.copy_(self.down_bias[e])
        return mlp

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"activation={self.activation}, bias={self.bias}")


@dataclass
class MLPOptions(GLUOptions):
    """Options of `mlp` experts (checked as `GLUOptions` are).

    Attributes:
        activation: the hidden activation (GPT-2 and Phi: "gelu_tanh").
        bias: biases on fc1 and fc2.
    """

    activation: str = "gelu_tanh"
    bias: bool = True


@EXPERTS.register("mlp", options=MLPOptions)
class MLPExperts(nn.Module):
    """E plain experts `fc2(act(fc1 x + b1)) + b2`, stacked (Phi, GPT-2, ViT MLP blocks).

    They run the pure-PyTorch reference (`zoo.kernels.reference.moe_mlp`) on every device.

    Parameters:
        fc1: `[E, f, d]`; fc2: `[E, d, f]`; with `bias`: fc1_bias `[E, f]`, fc2_bias `[E, d]`.
    """

    in_proj, out_proj, in_bias, out_bias, gated = "fc1", "fc2", "fc1_bias", "fc2_bias", False

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str = "gelu_tanh",
                 bias: bool = True) -> None:
        super().__init__()
        MLPOptions(activation, bias)
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.activation, self.bias = activation, bias
        self.fc1 = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.fc2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.fc1_bias = _bias_param(num_experts, intermediate_size, bias)
        self.fc2_bias = _bias_param(num_experts, hidden_size, bias)
        nn.init.normal_(self.fc1, std=0.02)
        nn.init.normal_(self.fc2, std=0.02)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """`x [T, d]`, `weights`/`indices [T, K]` (-1: empty) -> `[T, d]`."""
        return ops.moe_mlp(x, weights, indices, self.fc1, self.fc2, self.activation, self.fc1_bias, self.fc2_bias)

    @classmethod
    def from_dense(cls, mlp: nn.Module, num_experts: int) -> MLPExperts:
        """E copies of a dense plain FFN (fc1/fc2 linears or GPT-2's Conv1D c_fc/c_proj)."""
        spec = _spec(mlp, "plain", None, bias=None, kind="mlp")
        experts = cls(num_experts, spec.hidden_size, spec.intermediate_size, spec.activation, spec.has_bias)
        experts = experts.to(device=spec.w_in.device, dtype=spec.w_in.dtype)
        with torch.no_grad():
            experts.fc1.copy_(spec.w_in.expand(num_experts, -1, -1))
            experts.fc2.copy_(spec.w_out.expand(num_experts, -1, -1))
            if spec.has_bias:
                experts.fc1_bias.copy_(_or_zeros(spec.b_in, spec.intermediate_size, spec.w_in))
                experts.fc2_bias.copy_(_or_zeros(spec.b_out, spec.hidden_size, spec.w_in))
        return experts

    def expert(self, e: int) -> DenseMLP:
        mlp = DenseMLP(self.hidden_size, self.intermediate_size, self.activation, self.bias).to(
            device=self.fc1.device, dtype=self.fc1.dtype)
        with torch.no_grad():
            mlp.fc1.weight.copy_(self.fc1[e])
            mlp.fc2.weight.copy_(self.fc2[e])
            if self.bias:
                mlp.fc1.bias.copy_(self.fc1_bias[e])
                mlp.fc2.bias.copy_(self.fc2_bias[e])
        return mlp

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"activation={self.activation}, bias={self.bias}")


def _or_zeros(bias: torch.Tensor | None, size: int, like: torch.Tensor) -> torch.Tensor:
    return bias if bias is not None else torch.zeros(size, device=like.device, dtype=like.dtype)


def neuron_rows(experts: nn.Module, neurons: torch.Tensor) -> torch.Tensor:
    """Rows of `experts.<in_proj>[e]` (and of its bias) that belong to intermediate neurons `neurons`:
    gated kinds hold neuron j's gate row at j and its up row at f + j."""
    if experts.gated:
        return torch.cat([neurons, neurons + experts.intermediate_size])
    return neurons


def copy_expert(dst: nn.Module, e: int, src: nn.Module, j: int = 0) -> None:
    """Copy expert j of stacked experts `src` into expert e of `dst` (same kind and shapes)."""
    with torch.no_grad():
        for name, p in dst.named_parameters(recurse=False):
            p[e].copy_(getattr(src, name)[j])


def expert_kind_for(spec) -> tuple[str, dict]:
    """The expert kind (and its options) that holds copies of a dense FFN described by `spec` (`FFNSpec`):
    bias-free SiLU gated -> `swiglu`; other gated -> `glu`; plain -> `mlp`."""
    if spec.kind == "gated":
        if spec.activation == "silu" and not spec.has_bias:
            return "swiglu", {}
        return "glu", {"activation": spec.activation, "bias": spec.has_bias}
    return "mlp", {"activation": spec.activation, "bias": spec.has_bias}


__all__ = ["DenseGLU", "DenseMLP", "EXPERTS", "GLUExperts", "MLPExperts", "SwiGLU", "SwiGLUExperts", "copy_expert", "expert_kind_for",
           "neuron_rows"]
