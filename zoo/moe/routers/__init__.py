"""Routers, one file each, registered in `ROUTERS` (see `base.py` for the contract).

topk (Mixtral / Qwen2-MoE), topp (Huang et al. 2024), null_experts (AdaMoE), expert_choice
(Zhou et al. 2022), dynmole (DynMoLE), smoe_dropout (SMoE-Dropout), kmeans (MixER), loramoe
(LoRAMoE's soft router with its localized balancing constraint), deepseek_v3 (DeepSeek-V3: sigmoid,
aux-loss-free selection bias, group-limited top-k). Capacity with token dropping for token-choice
routers: `capacity.py`.
"""

from zoo.moe.routers.base import EMPTY, ROUTERS, Router, RouterOutput, check_loss_coefs
from zoo.moe.routers.deepseek_v3 import DeepSeekV3Router
from zoo.moe.routers.dynmole import DynMoLERouter
from zoo.moe.routers.expert_choice import ExpertChoiceRouter
from zoo.moe.routers.kmeans import KMeansRouter
from zoo.moe.routers.loramoe import LoRAMoERouter
from zoo.moe.routers.null_experts import NullExpertsRouter
from zoo.moe.routers.smoe_dropout import SMoEDropoutRouter
from zoo.moe.routers.topk import TopKOptions, TopKRouter
from zoo.moe.routers.topp import TopPRouter

__all__ = [
    "DeepSeekV3Router",
    "DynMoLERouter",
    "EMPTY",
    "ExpertChoiceRouter",
    "KMeansRouter",
    "LoRAMoERouter",
    "NullExpertsRouter",
    "ROUTERS",
    "Router",
    "RouterOutput",
    "SMoEDropoutRouter",
    "TopKOptions",
    "TopKRouter",
    "TopPRouter",
    "check_loss_coefs",
]
