"""Sparse MoE core: routers, experts, the layer, pure aux losses, routing capture.

Registries: `ROUTERS` (one file per router under `zoo/moe/routers/`) and `EXPERTS` (expert kinds).
"""

from zoo.moe.capture import LayerRoutingStats, RoutingLosses, RoutingRecord, capture_routing, routing_losses
from zoo.moe.config import LAYER_PATTERNS, MoEConfig
from zoo.moe.experts import EXPERTS, SwiGLU, SwiGLUExperts
from zoo.moe.layer import SparseMoE, build_sparse_moe
from zoo.moe.losses import experts_per_token, load_balancing_loss, load_fraction, router_entropy, router_z_loss
from zoo.moe.routers import EMPTY, ROUTERS, Router, RouterOutput, TopKRouter

__all__ = [
    "EMPTY",
    "EXPERTS",
    "LAYER_PATTERNS",
    "LayerRoutingStats",
    "MoEConfig",
    "ROUTERS",
    "Router",
    "RouterOutput",
    "RoutingLosses",
    "RoutingRecord",
    "SparseMoE",
    "SwiGLU",
    "SwiGLUExperts",
    "TopKRouter",
    "build_sparse_moe",
    "capture_routing",
    "experts_per_token",
    "load_balancing_loss",
    "load_fraction",
    "router_entropy",
    "router_z_loss",
    "routing_losses",
]
