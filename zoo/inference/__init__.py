"""Inference: serving built models (multi-adapter expert serving, ...)."""

from zoo.inference.serving import ADAPTER_KEY, AdapterExpertMap, MultiAdapterMoE, generate, left_pad

__all__ = ["ADAPTER_KEY", "AdapterExpertMap", "MultiAdapterMoE", "generate", "left_pad"]
