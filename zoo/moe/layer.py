"""The sparse MoE layer every model, stage, kernel and engine in the zoo shares."""

from __future__ import annotations

import torch
from torch import nn

from zoo.moe.block import MoEBlock  # noqa: F401  (re-exported)
from zoo.moe.config import MoEConfig
from zoo.moe.experts import EXPERTS, SwiGLU
from zoo.moe.routers import ROUTERS, RouterOutput


class SparseMoE(nn.Module):
    """Route tokens to experts and combine them; optionally add a gated shared expert.

    Composition by keyword: any router returning `RouterOutput` and any experts module taking
    `(x [T, d], weights [T, K], indices [T, K]) -> [T, d]` work together. Empty slots
    (`indices == -1`) cost nothing; a token with no expert gets 0 from the routed experts.

    Args:
        router: maps `[T, d]` to a `RouterOutput`.
        experts: routed experts.
        shared_expert: optional dense module `[T, d] -> [T, d]` applied to every token.
        shared_expert_gate: optional `Linear(d, 1)`; the shared expert's output is scaled by
            `sigmoid(shared_expert_gate(x))` (Qwen2-MoE). Without it the shared expert is added as is.
        residual_coefficient: optional `Linear(d, 2)` making this a Residual-MoE (DeepSpeed-MoE,
            Rajbhandari et al. 2022): `y = c_0 * routed + c_1 * shared_expert(x)` with
            `c = softmax(residual_coefficient(x))` (DeepSpeed's `use_residual`); needs a
            `shared_expert` (the dense FFN) and excludes `shared_expert_gate`.
        expert_map: optional module `(indices [T, K], context) -> [T, K]` that maps the router's
            expert ids to rows of `experts` before they run (multi-adapter serving,
            `zoo.inference.serving`, reroutes each token to its adapter's copy of an expert). The
            returned `RouterOutput` keeps the router's own ids.
    """

    def __init__(
        self,
        *,
        router: nn.Module,
        experts: nn.Module,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
        expert_map: nn.Module | None = None,
        residual_coefficient: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if shared_expert_gate is not None and shared_expert is None:
            raise ValueError("SparseMoE: shared_expert_gate given without a shared_expert")
        if residual_coefficient is not None and (shared_expert is None or shared_expert_gate is not None):
            raise ValueError("SparseMoE: residual_coefficient needs a shared_expert (the dense FFN) and no shared_expert_gate")
        self.hidden_size = router.hidden_size
        self.router = router
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.expert_map = expert_map
        if residual_coefficient is not None:  # registered only when used: state dicts of other layers unchanged
            self.residual_coefficient = residual_coefficient
        else:
            self.residual_coefficient = None

    def forward(self, x: torch.Tensor, context: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, RouterOutput]:
        """Apply the layer.

        Args:
            x: token states `[..., d]` (e.g. `[B, S, d]`); leading dims are flattened to T.
            context: per-token tensors `[T]` (`mask`: real tokens; see `zoo.moe.context`), usually
                handed in by `routing_context`.

        Returns:
            y: `[..., d]`, same shape and dtype as x.
            router_output: `RouterOutput` over the T flattened tokens (row-major in leading dims).
        """
        if x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"SparseMoE: input has hidden size {x.shape[-1]} but the layer was built for {self.hidden_size} "
                f"(input shape {tuple(x.shape)})"
            )
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, d]
        routing = self.router(flat, mask=(context or {}).get("mask"))
        indices = routing.indices if self.expert_map is None else self.expert_map(routing.indices, context or {})
        y = self.experts(flat, routing.weights, indices)  # [T, d]
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.residual_coefficient is not None:
                coef = torch.softmax(self.residual_coefficient(flat).float(), dim=-1).to(y.dtype)  # [T, 2]
                y = coef[:, :1] * y + coef[:, 1:] * shared
            else:
                if self.shared_expert_gate is not None:
                    shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
                y = y + shared
        return y.reshape(shape), routing


def build_sparse_moe(cfg: MoEConfig, hidden_size: int, intermediate_size: int) -> SparseMoE:
    """Build a `SparseMoE` from a `zoo.moe.MoEConfig` for a model of width `hidden_size`.

    Args:
        cfg: router and its options, expert kind, E and shared expert size.
        hidden_size: d.
        intermediate_size: f of each routed expert (the caller resolves
            `cfg.expert_intermediate_size`).
    """
    router = ROUTERS.build(cfg.router, cfg.router_options, hidden_size=hidden_size, num_experts=cfg.num_experts)
    shared = gate = coefficient = None
    if cfg.shared_expert_size:
        shared = SwiGLU(hidden_size, cfg.shared_expert_size)
        gate = nn.Linear(hidden_size, 1, bias=False) if cfg.shared_expert_gate else None
    if cfg.residual:  # the dense FFN beside the experts (upcycling replaces it by a copy of the dense one)
        shared = SwiGLU(hidden_size, intermediate_size)
        coefficient = nn.Linear(hidden_size, 2)
        nn.init.zeros_(coefficient.weight)
        nn.init.zeros_(coefficient.bias)
    kind, options = cfg.experts_kind()
    experts = EXPERTS.build(kind, options, num_experts=cfg.num_experts, hidden_size=hidden_size,
                            intermediate_size=intermediate_size)
    return SparseMoE(router=router, experts=experts, shared_expert=shared, shared_expert_gate=gate,
                     residual_coefficient=coefficient)
