"""`MoEConfig`: a sparse MoE layer (router, experts, losses) and where it goes in a decoder."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from zoo.config import config_from_dict, config_to_dict, key_path, rewrap

LAYER_PATTERNS = ("all", "every_other", "first_half", "second_half")


@dataclass
class MoEConfig:
    """A sparse MoE layer and where it goes in a decoder.

    Attributes:
        num_experts: routed experts per MoE layer (E).
        router: registered router name (`zoo.moe.ROUTERS`).
        router_options: that router's options (validated against it; e.g. `{top_k: 2}` for `topk`).
        loss_coefs: weight of each of the router's aux losses by name (e.g. `{balance: 0.01, z: 0}`);
            a loss not named keeps the router's default weight.
        experts: registered expert kind (`zoo.moe.EXPERTS`), or "auto": upcycling picks the kind that
            holds the dense FFN (`swiglu` for Llama-style, `glu` for GeGLU/biased, `mlp` for fc1/fc2)
            and records it; an MoE built from scratch gets `swiglu`.
        experts_options: that kind's options (e.g. `{activation: gelu_tanh, bias: true}` for `mlp`).
        expert_intermediate_size: width f of each routed expert; None = the dense FFN's width.
        shared_expert_size: intermediate size of an always-on shared expert gated by a sigmoid
            (Qwen2-MoE); 0 means none.
        layers: which decoder layers become MoE: one of `LAYER_PATTERNS` or explicit indices.
    """

    num_experts: int = 4
    router: str = "topk"
    router_options: dict[str, Any] = field(default_factory=dict)
    loss_coefs: dict[str, float] = field(default_factory=dict)
    experts: str = "auto"
    experts_options: dict[str, Any] = field(default_factory=dict)
    expert_intermediate_size: int | None = None
    shared_expert_size: int = 0
    layers: str | list[int] = "all"

    def __post_init__(self) -> None:
        from zoo.moe.experts import EXPERTS
        from zoo.moe.routers import ROUTERS, check_loss_coefs

        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"MoEConfig: num_experts must be an integer >= 1, got {self.num_experts!r}")
        try:
            with key_path("router"):
                ROUTERS.entry(self.router)
            with key_path("router_options"):
                opts = ROUTERS.options(self.router, self.router_options)
                if hasattr(opts, "validate_for"):
                    opts.validate_for(self.num_experts)
            with key_path("loss_coefs"):
                check_loss_coefs(self.router, self.loss_coefs)
            if self.experts == "auto":
                if self.experts_options:
                    raise ValueError(f"experts_options {sorted(self.experts_options)} need an explicit expert kind "
                                     f"(one of {EXPERTS.names()}), not experts='auto'")
                experts_opts = {}
            else:
                with key_path("experts"):
                    EXPERTS.entry(self.experts)
                with key_path("experts_options"):
                    experts_opts = EXPERTS.options(self.experts, self.experts_options)
        except (TypeError, ValueError) as e:
            raise rewrap(e, "MoEConfig") from None
        self.experts_options = config_to_dict(experts_opts) if dataclasses.is_dataclass(experts_opts) else dict(experts_opts)
        self.router_options = config_to_dict(opts) if dataclasses.is_dataclass(opts) else dict(opts)
        self.loss_coefs = {k: float(v) for k, v in self.loss_coefs.items()}
        if self.expert_intermediate_size is not None and self.expert_intermediate_size < 1:
            raise ValueError(f"MoEConfig: expert_intermediate_size must be >= 1 or None, got {self.expert_intermediate_size}")
        if self.shared_expert_size < 0:
            raise ValueError(f"MoEConfig: shared_expert_size must be >= 0, got {self.shared_expert_size}")
        if isinstance(self.layers, str):
            if self.layers not in LAYER_PATTERNS:
                raise ValueError(
                    f"MoEConfig: layers={self.layers!r} is not one of {LAYER_PATTERNS} or a list of indices"
                )
        else:
            self.layers = [int(i) for i in self.layers]

    def moe_layer_indices(self, num_layers: int) -> list[int]:
        """Decoder layer indices that become MoE layers in a model of `num_layers` layers."""
        return layer_indices(self.layers, num_layers, "MoEConfig")

    def experts_kind(self) -> tuple[str, dict[str, Any]]:
        """The expert kind an MoE built from this config (not by upcycling) gets, and its options."""
        return ("swiglu", {}) if self.experts == "auto" else (self.experts, dict(self.experts_options))

    def loss_coef(self, name: str) -> float:
        """Weight of the router's loss `name` (the configured one, else the router's default)."""
        from zoo.moe.routers import ROUTERS

        return self.loss_coefs.get(name, ROUTERS.get(self.router).default_loss_coefs[name])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEConfig:
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


def layer_indices(layers: str | list[int], num_layers: int, who: str) -> list[int]:
    """Resolve a `LAYER_PATTERNS` name or an index list to sorted layer indices of a `num_layers` decoder."""
    if layers == "all":
        return list(range(num_layers))
    if layers == "every_other":  # MoE-LLaVA "sparse": layers 0, 2, 4, ...
        return list(range(0, num_layers, 2))
    if layers == "first_half":
        return list(range(num_layers // 2))
    if layers == "second_half":
        return list(range(num_layers // 2, num_layers))
    if isinstance(layers, str):
        raise ValueError(f"{who}: layers={layers!r} is not one of {LAYER_PATTERNS} or a list of indices")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"{who}: layer indices {bad} out of range for a model with {num_layers} layers")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{who}: duplicate layer indices in {list(layers)}")
    return sorted(layers)


__all__ = ["LAYER_PATTERNS", "MoEConfig", "layer_indices"]
