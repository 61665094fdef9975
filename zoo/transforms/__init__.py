"""Transforms over a built model: upcycling dense -> MoE (`UPCYCLERS`), adapters (`ADAPTERS`), expert
permutation (`permute_experts`)."""

from zoo.transforms.adapters import ADAPTERS
from zoo.transforms.permute import permute_experts
from zoo.transforms.upcycle import UPCYCLERS, upcycle, upcycle_from_experts

__all__ = ["ADAPTERS", "UPCYCLERS", "permute_experts", "upcycle", "upcycle_from_experts"]
