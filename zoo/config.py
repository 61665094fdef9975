"""Small dataclass configs. A model size is a config entry, never a class.

Every config round-trips through plain dicts (and so YAML/JSON), and `from_dict` rejects unknown
keys by name, so a typo in a recipe fails loudly instead of silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

C = TypeVar("C")

LAYER_PATTERNS = ("all", "every_other", "first_half", "second_half")


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build dataclass `cls` from `data`, naming any key `cls` does not have."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config key(s) {unknown}; known keys are {sorted(known)}")
    return cls(**data)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form of a config dataclass (tuples become lists, for YAML/JSON)."""
    out = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


@dataclass
class MoEConfig:
    """A sparse MoE layer and where it goes in a decoder.

    Attributes:
        num_experts: routed experts per MoE layer (E).
        top_k: experts each token is sent to (k <= E).
        router: registered router name (see `zoo.moe.router.ROUTERS`).
        norm_topk_prob: renormalize the k selected probabilities to sum to 1 (Mixtral: True;
            Qwen2-MoE: configurable). Upcycling reproduces the dense model at init only when True.
        jitter_noise: multiplicative uniform noise on router inputs in training (Mixtral).
        shared_expert_size: intermediate size of an always-on shared expert gated by a sigmoid
            (Qwen2-MoE); 0 means none.
        layers: which decoder layers become MoE: one of `LAYER_PATTERNS` or explicit indices.
        aux_loss_coef: weight of the load-balancing loss in the training loss.
        z_loss_coef: weight of the router z-loss in the training loss.
    """

    num_experts: int = 4
    top_k: int = 2
    router: str = "topk"
    norm_topk_prob: bool = True
    jitter_noise: float = 0.0
    shared_expert_size: int = 0
    layers: str | list[int] = "all"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"MoEConfig: num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"MoEConfig: top_k={self.top_k} must be between 1 and num_experts={self.num_experts}"
            )
        if self.jitter_noise < 0:
            raise ValueError(f"MoEConfig: jitter_noise must be >= 0, got {self.jitter_noise}")
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
        if self.layers == "all":
            return list(range(num_layers))
        if self.layers == "every_other":  # MoE-LLaVA "sparse": layers 0, 2, 4, ...
            return list(range(0, num_layers, 2))
        if self.layers == "first_half":
            return list(range(num_layers // 2))
        if self.layers == "second_half":
            return list(range(num_layers // 2, num_layers))
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"MoEConfig: layer indices {bad} out of range for a model with {num_layers} layers")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"MoEConfig: duplicate layer indices in {self.layers}")
        return sorted(self.layers)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEConfig:
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


__all__ = ["MoEConfig", "LAYER_PATTERNS", "config_from_dict", "config_to_dict"]
