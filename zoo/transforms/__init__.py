"""Transforms over a built model: upcycling dense -> MoE (`UPCYCLERS`) and adapters (`ADAPTERS`)."""

from zoo.transforms.adapters import ADAPTERS
from zoo.transforms.upcycle import UPCYCLERS, upcycle, upcycle_from_experts

__all__ = ["ADAPTERS", "UPCYCLERS", "upcycle", "upcycle_from_experts"]
