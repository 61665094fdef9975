"""Optimizer settings and the one optimizer + schedule builder every engine uses.

AdamW with decay on matrices only (never on vectors: norms, biases), and a linear-warmup cosine
schedule stepped once per optimizer step. `TorchEngine` and `DeepSpeedEngine` both build theirs
here (DeepSpeed first moves expert parameters into its MoE groups).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from zoo.config import config_from_dict, config_to_dict

PRECISIONS = ("fp32", "bf16", "bf16_master")


@dataclass
class OptimConfig:
    """Optimizer, schedule and step settings of one training stage.

    Attributes:
        lr: peak learning rate.
        min_lr_ratio: the cosine schedule ends at `lr * min_lr_ratio`.
        warmup_steps: linear warmup from 0 over this many optimizer steps.
        weight_decay: AdamW decay on matrices (never on vectors: norms, biases).
        betas: AdamW betas.
        grad_clip: max global grad norm; 0 disables clipping.
        grad_accum: micro-batches per optimizer step.
        precision: "fp32"; "bf16": autocast (weights and optimizer state stay fp32, each weight is
            cast at every use); "bf16_master": autocast over weights held in bf16, the optimizer
            updating fp32 master copies (no per-step weight casts; `zoo.pipelines.precision`).
            Under DeepSpeed both bf16 modes are DeepSpeed's bf16 (bf16 weights, fp32 master).
    """

    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    grad_accum: int = 1
    precision: str = "fp32"

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.precision not in PRECISIONS:
            raise ValueError(f"OptimConfig: precision={self.precision!r} is not one of {PRECISIONS}")
        if self.grad_accum < 1:
            raise ValueError(f"OptimConfig: grad_accum must be >= 1, got {self.grad_accum}")
        if self.lr <= 0:
            raise ValueError(f"OptimConfig: lr must be > 0, got {self.lr}")

    @property
    def bf16(self) -> bool:
        """Whether the stage computes in bf16 (either bf16 precision)."""
        return self.precision in ("bf16", "bf16_master")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimConfig:
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


def cosine_with_warmup(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier at optimizer step `step`: linear warmup, then cosine down to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _no_decay(p: torch.Tensor) -> bool:
    return bool(getattr(p, "zoo_no_decay", False))


def decay_groups(params: Iterable[torch.Tensor], weight_decay: float) -> list[dict[str, Any]]:
    """Param groups: matrices with `weight_decay`, vectors (and tensors marked `zoo_no_decay`, such as
    ESFT's masked expert stacks) without; empty groups left out.

    Each group is a fresh dict (DeepSpeed's MoE splitter mutates what it is given).
    """
    params = list(params)
    groups = [
        {"name": "decay", "params": [p for p in params if p.ndim >= 2 and not _no_decay(p)], "weight_decay": weight_decay},
        {"name": "no_decay", "params": [p for p in params if p.ndim < 2 or _no_decay(p)], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(groups: list[dict[str, Any]], optim: OptimConfig, total_steps: int):
    """AdamW over `groups` and its warmup-cosine `LambdaLR`.

    Returns:
        `(optimizer, scheduler)`.
    """
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: cosine_with_warmup(s, warmup_steps=optim.warmup_steps, total_steps=total_steps,
                                     min_lr_ratio=optim.min_lr_ratio),
    )
    return optimizer, scheduler


__all__ = ["OptimConfig", "PRECISIONS", "build_optimizer", "cosine_with_warmup", "decay_groups"]
