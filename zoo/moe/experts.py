"""Expert modules with stacked weights, registered by kind in `EXPERTS`, and the dense SwiGLU MLP.

Stacked `[E, ...]` weights (the transformers 5 layout) let one op run all experts without a
Python list of modules; the computation itself lives in `zoo.kernels` (kernel -> op -> module).

Every experts module has the same call, `(x [T, d], weights [T, K], indices [T, K]) -> [T, d]`
(empty slots, `indices == -1`, are skipped), `from_dense(mlp, num_experts)` (E copies of a dense
FFN, for upcycling) and `expert(e)` (expert e as a plain dense module: the reference the tests
compare the stacked computation against).
"""

from __future__ import annotations

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., d] -> [..., d]`."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
        """E copies of a dense gated MLP with `gate_proj`/`up_proj`/`down_proj` linears (upcycling)."""
        gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight  # [f, d], [f, d], [d, f]
        experts = cls(num_experts, gate.shape[1], gate.shape[0]).to(device=gate.device, dtype=gate.dtype)
        with torch.no_grad():
            experts.gate_up_proj.copy_(torch.cat([gate, up], dim=0).expand(num_experts, -1, -1))
            experts.down_proj.copy_(down.expand(num_experts, -1, -1))
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


__all__ = ["EXPERTS", "SwiGLU", "SwiGLUExperts"]
