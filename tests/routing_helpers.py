"""Helpers shared by the router and inference-control tests (imported, not collected)."""

import torch

from zoo.moe import ROUTERS


def identity_router(name: str, R: int = 4, num_experts: int = 4, **options):
    """A router whose logits are its input: hidden size R and an identity weight (R = num_experts
    for a plain linear router; a low-rank router's projection is R x R too)."""
    router = ROUTERS.build(name, options, hidden_size=R, num_experts=num_experts)
    with torch.no_grad():
        for attr in ("weight", "projection"):
            if hasattr(router, attr):
                getattr(router, attr).copy_(torch.eye(R))
    return router.eval()
