"""Routers, one file each, registered in `ROUTERS` (see `base.py` for the contract)."""

from zoo.moe.routers.base import EMPTY, ROUTERS, Router, RouterOutput, check_loss_coefs
from zoo.moe.routers.topk import TopKOptions, TopKRouter

__all__ = ["EMPTY", "ROUTERS", "Router", "RouterOutput", "TopKOptions", "TopKRouter", "check_loss_coefs"]
