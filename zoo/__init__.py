"""moe-zoo: multimodal Mixture-of-Experts models, trained in stages, loaded with `zoo.load`."""

from zoo.config import MoEConfig
from zoo.lm import MoECausalLM
from zoo.upcycle import upcycle

__version__ = "0.1.0"

__all__ = ["MoECausalLM", "MoEConfig", "upcycle", "__version__"]
