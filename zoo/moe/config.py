"""`MoEConfig`: a sparse MoE layer (router, experts, losses) and where it goes in a decoder."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from zoo.config import config_from_dict, config_to_dict, key_path, rewrap

LAYER_PATTERNS = ("all", "every_other", "first_half", "second_half")
"""Named layer patterns; `layers` also takes `every_<n>` (layers 0, n, 2n, ...: Megatron-Core's
`--moe-layer-freq n`), `after_<k>` (the first k layers dense: DeepSeek's `first_k_dense_replace`),
`pattern:<M|D per layer>` (Megatron-Core's list form, e.g. `pattern:DMMM`) or explicit indices."""

_PATTERN_RE = re.compile(r"^(?:every_(?P<every>[1-9]\d*)|after_(?P<after>\d+)|pattern:(?P<pattern>[MD]+))$")


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
        shared_expert_gate: scale the shared expert by `sigmoid(Linear(d, 1)(x))` (Qwen2-MoE); False
            adds it as is (DeepSeek-V3).
        layers: which decoder layers become MoE: one of `LAYER_PATTERNS`, `every_<n>`, `after_<k>`,
            `pattern:<M|D ...>` or explicit indices.
        layer_experts: per-MoE-layer expert counts, in layer order (DeepSpeed-MoE's PR-MoE pyramid,
            e.g. `[4, 4, 8, 8]`), one per MoE layer; None: `num_experts` everywhere. `num_experts`
            stays the default (and what the router options are checked against with the others).
        residual: Residual-MoE (DeepSpeed-MoE, Rajbhandari et al. 2022, sec. 4.1.2): a dense FFN
            beside the routed experts (the paper's top-1), mixed per token by a learned coefficient,
            `y = c_0 * moe(x) + c_1 * mlp(x)`, `c = softmax(Linear(d, 2)(x))` (DeepSpeed's
            `use_residual`). Upcycling copies the dense FFN into it and zeroes the coefficient layer,
            so the model equals the dense one at initialization. Excludes `shared_expert_size`.
    """

    num_experts: int = 4
    router: str = "topk"
    router_options: dict[str, Any] = field(default_factory=dict)
    loss_coefs: dict[str, float] = field(default_factory=dict)
    experts: str = "auto"
    experts_options: dict[str, Any] = field(default_factory=dict)
    expert_intermediate_size: int | None = None
    shared_expert_size: int = 0
    shared_expert_gate: bool = True
    layers: str | list[int] = "all"
    layer_experts: list[int] | None = None
    residual: bool = False

    def __post_init__(self) -> None:
        from zoo.moe.experts import EXPERTS
        from zoo.moe.routers import ROUTERS, check_loss_coefs

        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"MoEConfig: num_experts must be an integer >= 1, got {self.num_experts!r}")
        if self.layer_experts is not None:
            counts = list(self.layer_experts)
            bad = [n for n in counts if isinstance(n, bool) or not isinstance(n, int) or n < 1]
            if bad or not counts:
                raise ValueError(f"MoEConfig: layer_experts={counts!r} must be a non-empty list of integers >= 1")
            self.layer_experts = counts
        try:
            with key_path("router"):
                ROUTERS.entry(self.router)
            with key_path("router_options"):
                opts = ROUTERS.options(self.router, self.router_options)
                if hasattr(opts, "validate_for"):
                    for n in sorted({self.num_experts, *(self.layer_experts or [])}):
                        opts.validate_for(n)
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
            if self.layers not in LAYER_PATTERNS and not _PATTERN_RE.match(self.layers):
                raise ValueError(
                    f"MoEConfig: layers={self.layers!r} is not one of {LAYER_PATTERNS}, every_<n>, after_<k>, "
                    f"pattern:<M|D per layer> or a list of indices"
                )
        else:
            self.layers = [int(i) for i in self.layers]
        if self.layer_experts is not None:
            counts = list(self.layer_experts)
            if isinstance(self.layers, list) and len(counts) != len(self.layers):
                raise ValueError(f"MoEConfig: layer_experts has {len(counts)} entries but layers={self.layers} "
                                 f"names {len(self.layers)} MoE layers")
        if self.residual and self.shared_expert_size:
            raise ValueError("MoEConfig: residual=True brings its own dense FFN; shared_expert_size must be 0")

    def moe_layer_indices(self, num_layers: int) -> list[int]:
        """Decoder layer indices that become MoE layers in a model of `num_layers` layers.

        Raises:
            ValueError: `layer_experts` does not have one count per MoE layer.
        """
        indices = layer_indices(self.layers, num_layers, "MoEConfig")
        if self.layer_experts is not None and len(self.layer_experts) != len(indices):
            raise ValueError(f"MoEConfig: layer_experts has {len(self.layer_experts)} entries but {len(indices)} of the "
                             f"{num_layers} layers are MoE ({indices})")
        return indices

    def for_layer(self, position: int) -> MoEConfig:
        """The config of the `position`-th MoE layer (in layer order): `num_experts` from `layer_experts`."""
        if self.layer_experts is None:
            return self
        return dataclasses.replace(self, num_experts=self.layer_experts[position], layer_experts=None)

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
    match = _PATTERN_RE.match(layers) if isinstance(layers, str) else None
    if match and match["every"]:
        return list(range(0, num_layers, int(match["every"])))
    if match and match["after"]:
        k = int(match["after"])
        if k >= num_layers:
            raise ValueError(f"{who}: layers={layers!r} leaves no MoE layer in a model with {num_layers} layers")
        return list(range(k, num_layers))
    if match and match["pattern"]:
        if len(match["pattern"]) != num_layers:
            raise ValueError(f"{who}: layers={layers!r} gives {len(match['pattern'])} layers, the model has {num_layers}")
        return [i for i, c in enumerate(match["pattern"]) if c == "M"]
    if isinstance(layers, str):
        raise ValueError(f"{who}: layers={layers!r} is not one of {LAYER_PATTERNS} or a list of indices")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"{who}: layer indices {bad} out of range for a model with {num_layers} layers")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{who}: duplicate layer indices in {list(layers)}")
    return sorted(layers)


__all__ = ["LAYER_PATTERNS", "MoEConfig", "layer_indices"]
