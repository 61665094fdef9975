"""Inference: serving built models (multi-adapter expert serving), routing control (overrides, SCMoE
decoding, MoTE expert attribution), expert placement for expert parallelism (ExFlow), ..."""

from zoo.inference.attribution import ExpertAttribution, attribute_experts, selection_rates
from zoo.inference.overrides import RoutingOverride, override_routing, reroute
from zoo.inference.placement import (Placement, PlacementCost, RoutingTrace, affinity, contiguous_placement,
                                     greedy_placement, ilp_placement, permute_model_dir, placement_cost, routing_trace)
from zoo.inference.scmoe import SCMoELogitsProcessor, scmoe_generate, scmoe_scores
from zoo.inference.serving import ADAPTER_KEY, AdapterExpertMap, MultiAdapterMoE, generate, left_pad

__all__ = [
    "ADAPTER_KEY",
    "AdapterExpertMap",
    "ExpertAttribution",
    "MultiAdapterMoE",
    "Placement",
    "PlacementCost",
    "RoutingOverride",
    "RoutingTrace",
    "SCMoELogitsProcessor",
    "affinity",
    "attribute_experts",
    "contiguous_placement",
    "generate",
    "greedy_placement",
    "ilp_placement",
    "left_pad",
    "override_routing",
    "permute_model_dir",
    "placement_cost",
    "reroute",
    "routing_trace",
    "scmoe_generate",
    "scmoe_scores",
    "selection_rates",
]
