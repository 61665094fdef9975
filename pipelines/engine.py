"""Engines: what the trainer calls to run a step, whatever does the distributing.

The interface follows DeepSpeed's engine so that a DeepSpeed engine is a thin adapter:
`backward(loss)` scales by the accumulation steps, `step()` is called after every micro-batch and
updates only at an accumulation boundary; the engine owns its checkpoint I/O.

`TorchEngine` is one process, plain PyTorch, CPU or GPU.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save

from zoo.checkpoint import load_checkpoint, save_checkpoint
from zoo.config import config_from_dict, config_to_dict

PRECISIONS = ("fp32", "bf16")


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
        precision: "fp32", or "bf16" autocast (weights and optimizer state stay fp32).
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


@dataclass
class StepResult:
    """What an optimizer step reports: pre-clip global grad norm and the LR it used."""

    grad_norm: float
    lr: float


class NonFiniteError(RuntimeError):
    """A loss or gradient norm was NaN or infinite."""


class Engine(Protocol):
    """What the trainer needs from an engine."""

    model: torch.nn.Module
    device: torch.device
    is_main: bool

    def autocast(self) -> contextlib.AbstractContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> StepResult | None: ...
    def save_checkpoint(self, path: Path, client_state: dict[str, Any]) -> Path: ...
    def load_checkpoint(self, path: Path) -> dict[str, Any]: ...


def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able copy of `obj` with every tensor moved into `tensors` under a path key."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _split_tensors(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


class TorchEngine:
    """One-process engine: AdamW, cosine schedule with warmup, accumulation, clipping, bf16 autocast.

    Args:
        model: the module to train; only parameters with `requires_grad` are optimized.
        optim: optimizer and step settings.
        total_steps: optimizer steps of the stage (for the schedule).
        device: where to run.
    """

    def __init__(self, model: torch.nn.Module, optim: OptimConfig, total_steps: int, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.optim_config = optim
        self.is_main = True
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not params:
            raise ValueError("TorchEngine: the model has no trainable parameters (every parameter is frozen)")
        self.params = [p for _, p in params]
        groups = [
            {"params": [p for _, p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
            {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=optim.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: cosine_with_warmup(
                s, warmup_steps=optim.warmup_steps, total_steps=total_steps, min_lr_ratio=optim.min_lr_ratio
            ),
        )
        self.micro_step = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.optim_config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of `loss / grad_accum`."""
        (loss / self.optim_config.grad_accum).backward()

    def step(self) -> StepResult | None:
        """Count a micro-batch; at an accumulation boundary clip, update, schedule and zero grads.

        Raises:
            NonFiniteError: the gradient norm is NaN/inf (no update is applied).
        """
        self.micro_step += 1
        if self.micro_step % self.optim_config.grad_accum:
            return None
        clip = self.optim_config.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"gradient norm is {norm.item()} at optimizer step {self.scheduler.last_epoch}")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm.item(), lr)

    def save_checkpoint(self, path: Path, client_state: dict[str, Any]) -> Path:
        """Atomically write weights, optimizer/scheduler state and `client_state` (JSON) to `path`."""
        tensors: dict[str, torch.Tensor] = {}
        optimizer = _split_tensors(self.optimizer.state_dict(), "optimizer", tensors)
        scheduler = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        config = {"client_state": client_state, "optimizer": optimizer, "scheduler": scheduler, "micro_step": self.micro_step}
        return save_checkpoint(
            path, self.model.state_dict(), config, extra_files={"optimizer.safetensors": save(tensors)}, overwrite=True
        )

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Restore what `save_checkpoint` wrote (verified against its manifest); return client_state."""
        ckpt = load_checkpoint(path, device=self.device)
        missing, unexpected = self.model.load_state_dict(ckpt.state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not fit the model: missing {missing}, unexpected {unexpected}")
        tensors = load_file(str(ckpt.paths["optimizer.safetensors"]))
        self.optimizer.load_state_dict(_join_tensors(ckpt.config["optimizer"], tensors))
        self.scheduler.load_state_dict({**ckpt.config["scheduler"], "lr_lambdas": [None] * len(self.optimizer.param_groups)})
        self.micro_step = ckpt.config["micro_step"]
        return ckpt.config["client_state"]

