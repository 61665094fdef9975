"""Adapters (`ADAPTERS`): plain LoRA through PEFT, MixLoRA and LoRAMoE LoRA experts."""

from zoo.transforms.adapters.lora import (
    ATTENTION_TARGETS,
    LoRALinear,
    PlainLoRA,
    lora_modules,
    merge_lora,
    unmerge_lora,
)
from zoo.transforms.adapters.loramoe import LoRAMoE, LoRAMoEExperts, apply_loramoe
from zoo.transforms.adapters.mixlora import MixLoRA, MixLoRAExperts, apply_mixlora
from zoo.transforms.adapters.registry import ADAPTERS

__all__ = [
    "ADAPTERS",
    "ATTENTION_TARGETS",
    "LoRALinear",
    "LoRAMoE",
    "LoRAMoEExperts",
    "MixLoRA",
    "MixLoRAExperts",
    "PlainLoRA",
    "apply_loramoe",
    "apply_mixlora",
    "lora_modules",
    "merge_lora",
    "unmerge_lora",
]
