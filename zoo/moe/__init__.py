"""Sparse MoE core: routers, experts, the layer, pure aux losses, routing capture."""

from zoo.moe.experts import SwiGLU, SwiGLUExperts
from zoo.moe.capture import LayerRoutingStats, RoutingRecord, capture_routing, routing_losses
from zoo.moe.layer import SparseMoE, build_sparse_moe
from zoo.moe.losses import load_balancing_loss, load_fraction, router_entropy, router_z_loss
from zoo.moe.router import ROUTERS, RouterOutput, TopKRouter, build_router

__all__ = [
    "LayerRoutingStats",
    "ROUTERS",
    "RoutingRecord",
    "RouterOutput",
    "SparseMoE",
    "SwiGLU",
    "SwiGLUExperts",
    "TopKRouter",
    "build_router",
    "build_sparse_moe",
    "capture_routing",
    "load_balancing_loss",
    "load_fraction",
    "router_entropy",
    "router_z_loss",
    "routing_losses",
]
