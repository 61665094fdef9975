"""Weight-only quantized stacked experts (FineQuant; Kim et al. 2023, arXiv 2308.09723).

FineQuant stores each weight matrix as low-bit integer codes with fine-grained scales (groups
of consecutive inputs of one output row) and dequantizes on the fly, keeping activations in
floating point; attention, embeddings, routers, norms and biases stay as they are. Here that is
`QuantizedExperts`: the codes and scales of an `EXPERTS` module's two stacked projections
(int8 per channel or group-wise, int4 group-wise and packed two per byte; the format is
documented in `zoo.kernels.reference`), with the same call as every experts module,
`(x [T, d], weights [T, K], indices [T, K]) -> [T, d]`.

`QuantizationConfig` is what a model config records (`ModelConfig.quantization`), so
`build_model(cfg)` rebuilds a quantized model and a checkpoint's codes and scales load strictly.
The transform that makes one is `zoo.transforms.quantize.quantize_experts`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from zoo.kernels import ops
from zoo.kernels.reference import QUANT_BITS, check_quantization, dequantize, quantize_weight
from zoo.moe.experts import EXPERTS


@dataclass
class QuantizationConfig:
    """How a model's stacked experts are quantized (weights only).

    Attributes:
        bits: 8 or 4.
        group_size: inputs per scale; it must divide both projections' input dimensions (d for the
            input projection, the expert width f for the output one). None: one scale per output
            channel (FineQuant's column-wise quantization).
        adaptive: FineQuant's adaptive granularity: each stacked matrix starts per channel and its
            groups are halved while the heuristic says an outlier dominates them
            (`zoo.transforms.quantize.adaptive_group_size`); leave `group_size` unset.
        min_group_size: the smallest group adaptive granularity may pick.
        threshold: adaptive granularity halves a matrix's groups while the mean over its groups of
            `min / max` of the two halves' ranges is below this (0 < threshold <= 1).
        group_sizes: the resolved group sizes, module path -> `[input projection, output
            projection]`; written by `quantize_experts` (what the checkpoint holds) and, when
            present, used as is instead of `group_size` / `adaptive`.
    """

    bits: int = 8
    group_size: int | None = None
    adaptive: bool = False
    min_group_size: int = 32
    threshold: float = 0.7
    group_sizes: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from zoo.moe.routers.base import check_range

        if isinstance(self.bits, bool) or self.bits not in QUANT_BITS:
            raise ValueError(f"quantization: bits={self.bits!r} is not supported; accepted: {list(QUANT_BITS)}")
        if self.group_size is not None:
            check_range("quantization: group_size", self.group_size, 1, float("inf"), integer=True)
        if self.adaptive and self.group_size is not None:
            raise ValueError(f"quantization: adaptive granularity chooses each matrix's group size itself; leave "
                             f"group_size unset (got group_size={self.group_size})")
        check_range("quantization: min_group_size", self.min_group_size, 1, float("inf"), integer=True)
        check_range("quantization: threshold", self.threshold, 0.0, 1.0, low_open=True)
        if not isinstance(self.group_sizes, dict):
            raise TypeError(f"quantization: group_sizes must map module paths to [in, out] group sizes, got "
                            f"{type(self.group_sizes).__name__}")
        for path, sizes in self.group_sizes.items():
            if not (isinstance(sizes, (list, tuple)) and len(sizes) == 2):
                raise ValueError(f"quantization: group_sizes[{path!r}] must be [input projection, output projection], "
                                 f"got {sizes!r}")
        self.group_sizes = {p: [int(a) for a in s] for p, s in self.group_sizes.items()}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _kind_of(experts: nn.Module) -> tuple[str, dict[str, Any]]:
    """The `EXPERTS` name and options of a float experts module (exact class match)."""
    for name in EXPERTS.names():
        if type(experts) is EXPERTS.get(name):
            entry = EXPERTS.entry(name)
            options = {} if entry.options is None else {
                f.name: getattr(experts, f.name) for f in dataclasses.fields(entry.options)}
            return name, options
    raise ValueError(f"quantize: {type(experts).__name__} is not a registered expert kind ({EXPERTS.names()}); only "
                     "stacked EXPERTS modules are quantized")


class QuantizedExperts(nn.Module):
    """E experts of a registered kind whose two stacked projections are int8 / int4 codes + scales.

    Built empty (a skeleton for a strict load) or from float experts with `from_float`. Codes and
    scales are buffers (nothing here trains); biases stay float buffers under their usual names.
    Scales are computed in float32 and stored in the float weights' dtype.

    Args:
        num_experts: E.
        hidden_size: d.
        intermediate_size: f.
        kind: the float kind (`swiglu`, `glu`, `mlp`) whose computation this runs.
        options: that kind's options (`activation`, `bias`).
        bits: 8 or 4.
        group_sizes: `(g_in, g_out)`: inputs per scale of the input projection (divides d) and of
            the output projection (divides f).

    Buffers (with `P` the kind's input projection name, `gate_up_proj` or `fc1`, and `Q` its output
    one, `down_proj` or `fc2`; N = 2f gated, f plain):
        P_codes: `[E, N, d]` int8 or `[E, N, d/2]` uint8 (int4); P_scales: `[E, N, d/g_in]`.
        Q_codes: `[E, d, f]` / `[E, d, f/2]`; Q_scales: `[E, d, f/g_out]`.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, kind: str,
                 options: dict[str, Any] | None = None, bits: int, group_sizes: tuple[int, int]) -> None:
        super().__init__()
        cls = EXPERTS.get(kind)
        opts = EXPERTS.options(kind, options or {})
        self.kind = kind
        self.options = dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else dict(opts)
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.bits = bits
        self.gated = cls.gated
        self.in_proj, self.out_proj, self.in_bias, self.out_bias = cls.in_proj, cls.out_proj, cls.in_bias, cls.out_bias
        self.activation = self.options.get("activation", "silu")
        self.has_bias = bool(self.options.get("bias", False))
        n_in = (2 if self.gated else 1) * intermediate_size
        g_in = check_quantization(bits, group_sizes[0], hidden_size, f"quantize {kind} experts' {self.in_proj}")
        g_out = check_quantization(bits, group_sizes[1], intermediate_size, f"quantize {kind} experts' {self.out_proj}")
        self.group_sizes = (g_in, g_out)
        per_byte = 2 if bits == 4 else 1
        code_dtype = torch.uint8 if bits == 4 else torch.int8
        e = num_experts
        self.register_buffer(f"{self.in_proj}_codes", torch.zeros(e, n_in, hidden_size // per_byte, dtype=code_dtype))
        self.register_buffer(f"{self.in_proj}_scales", torch.zeros(e, n_in, hidden_size // g_in))
        self.register_buffer(f"{self.out_proj}_codes", torch.zeros(e, hidden_size, intermediate_size // per_byte,
                                                                   dtype=code_dtype))
        self.register_buffer(f"{self.out_proj}_scales", torch.zeros(e, hidden_size, intermediate_size // g_out))
        if self.has_bias:
            self.register_buffer(self.in_bias, torch.zeros(e, n_in))
            self.register_buffer(self.out_bias, torch.zeros(e, hidden_size))

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (getattr(self, f"{self.in_proj}_codes"), getattr(self, f"{self.in_proj}_scales"),
                getattr(self, f"{self.out_proj}_codes"), getattr(self, f"{self.out_proj}_scales"))

    def _biases(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.has_bias:
            return None, None
        return getattr(self, self.in_bias), getattr(self, self.out_bias)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """`x [T, d]`, `weights`/`indices [T, K]` (-1: empty) -> `[T, d]` (`zoo.kernels.ops.moe_quantized`)."""
        in_bias, out_bias = self._biases()
        return ops.moe_quantized(x, weights, indices, *self._tensors(), bits=self.bits, gated=self.gated,
                                 activation=self.activation, in_bias=in_bias, out_bias=out_bias)

    @classmethod
    def from_float(cls, experts: nn.Module, bits: int, group_sizes: tuple[int | None, int | None]) -> QuantizedExperts:
        """Quantize a float experts module (`swiglu`, `glu` or `mlp`).

        Args:
            experts: the float module.
            bits: 8 or 4.
            group_sizes: `(g_in, g_out)`, None meaning per channel.

        Raises:
            ValueError: not a registered expert kind; bits not in {4, 8}; a group size that does not
                divide its projection's input dimension (named).
        """
        kind, options = _kind_of(experts)
        w_in, w_out = getattr(experts, type(experts).in_proj), getattr(experts, type(experts).out_proj)
        q = cls(experts.num_experts, experts.hidden_size, experts.intermediate_size, kind=kind, options=options,
                bits=bits, group_sizes=group_sizes).to(device=w_in.device)
        with torch.no_grad():
            for name, w, g in ((q.in_proj, w_in, q.group_sizes[0]), (q.out_proj, w_out, q.group_sizes[1])):
                codes, scales = quantize_weight(w, bits, g)
                getattr(q, f"{name}_codes").copy_(codes)
                getattr(q, f"{name}_scales").copy_(scales)
            if q.has_bias:
                getattr(q, q.in_bias).copy_(getattr(experts, q.in_bias))
                getattr(q, q.out_bias).copy_(getattr(experts, q.out_bias))
        # Scales and biases in the float weights' dtype, so a checkpoint keeps one float dtype.
        return q.to(dtype=w_in.dtype)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The float experts module of this kind holding the dequantized weights (what the codes mean)."""
        in_codes, in_scales, out_codes, out_scales = self._tensors()
        experts = EXPERTS.build(self.kind, self.options, num_experts=self.num_experts, hidden_size=self.hidden_size,
                                intermediate_size=self.intermediate_size).to(device=in_codes.device, dtype=dtype)
        with torch.no_grad():
            getattr(experts, self.in_proj).copy_(dequantize(in_codes, in_scales, self.bits, dtype))
            getattr(experts, self.out_proj).copy_(dequantize(out_codes, out_scales, self.bits, dtype))
            if self.has_bias:
                getattr(experts, self.in_bias).copy_(getattr(self, self.in_bias))
                getattr(experts, self.out_bias).copy_(getattr(self, self.out_bias))
        return experts

    def expert(self, e: int) -> nn.Module:
        """Expert e as a dense float module with its dequantized weights (the test reference)."""
        return self.dequantized(getattr(self, f"{self.out_proj}_scales").dtype).expert(e)

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of the stacked weights: `codes`, `scales`, and `float32` (what the float kind holds)."""
        in_codes, in_scales, out_codes, out_scales = self._tensors()
        n_in = in_scales.shape[1]
        floats = self.num_experts * (n_in * self.hidden_size + self.hidden_size * self.intermediate_size) * 4
        return {"codes": _nbytes(in_codes) + _nbytes(out_codes), "scales": _nbytes(in_scales) + _nbytes(out_scales),
                "float32": floats}

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"kind={self.kind}, bits={self.bits}, group_sizes={self.group_sizes}")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


__all__ = ["QuantizationConfig", "QuantizedExperts"]
