"""Inference: serving built models (multi-adapter expert serving), routing control (overrides, SCMoE
decoding, MoTE expert attribution), ..."""

from zoo.inference.attribution import ExpertAttribution, attribute_experts, selection_rates
from zoo.inference.overrides import RoutingOverride, override_routing, reroute
from zoo.inference.scmoe import SCMoELogitsProcessor, scmoe_generate, scmoe_scores
from zoo.inference.serving import ADAPTER_KEY, AdapterExpertMap, MultiAdapterMoE, generate, left_pad

__all__ = [
    "ADAPTER_KEY",
    "AdapterExpertMap",
    "ExpertAttribution",
    "MultiAdapterMoE",
    "RoutingOverride",
    "SCMoELogitsProcessor",
    "attribute_experts",
    "generate",
    "left_pad",
    "override_routing",
    "reroute",
    "scmoe_generate",
    "scmoe_scores",
    "selection_rates",
]
