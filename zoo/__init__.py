"""moe-zoo: multimodal Mixture-of-Experts models, trained in stages, loaded with `zoo.load`."""

from zoo.config import ModelConfig, MoEConfig
from zoo.lm import MoECausalLM
from zoo.loading import build, load
from zoo.model import MultimodalMoE, build_model
from zoo.registry import get_card, list_models
from zoo.upcycle import upcycle

__version__ = "0.1.0"

__all__ = [
    "MoECausalLM",
    "MoEConfig",
    "ModelConfig",
    "MultimodalMoE",
    "build",
    "build_model",
    "get_card",
    "list_models",
    "load",
    "upcycle",
    "__version__",
]
