"""moe-zoo: multimodal Mixture-of-Experts models, trained in stages, loaded with `zoo.load`.

Layers (see docs/ARCHITECTURE.md): `zoo.moe` (routers, experts, the layer, losses), `zoo.models`
(LM wrapper, multimodal model, builders), `zoo.transforms` (upcycling, adapters), `zoo.io`
(checkpoints, downloads, export), `zoo.catalog` (cards, installs, load). Training lives in
`zoo.pipelines`, which this package never imports.
"""

from zoo.catalog import get_card, list_models, load
from zoo.models import ModelConfig, MoECausalLM, MultimodalMoE, build_model
from zoo.moe import MoEConfig
from zoo.transforms import ADAPTERS, UPCYCLERS, upcycle

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS",
    "MoECausalLM",
    "MoEConfig",
    "ModelConfig",
    "MultimodalMoE",
    "UPCYCLERS",
    "build_model",
    "get_card",
    "list_models",
    "load",
    "upcycle",
    "__version__",
]
