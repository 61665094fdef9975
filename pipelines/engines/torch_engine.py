"""The one-process engine: plain PyTorch on CPU or GPU (the `Engine` contract: `engines/base.py`)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from zoo.io.checkpoint import load_checkpoint, load_strict, save_checkpoint
from zoo.pipelines.optim import OptimConfig, build_optimizer, decay_groups
from zoo.pipelines.engines.base import NonFiniteError, StepResult
from zoo.pipelines.precision import MasterWeights

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
    """One-process engine: AdamW, cosine schedule with warmup, accumulation, clipping, bf16.

    Precision (`optim.precision`): "fp32"; "bf16": autocast over fp32 weights; "bf16_master":
    autocast over weights held in bf16, the optimizer updating fp32 master copies
    (`zoo.pipelines.precision.MasterWeights`; frozen encoders stay fp32: their cached features are
    keyed by their fp32 weights). Checkpoints hold fp32 weights in every mode, and `finish()` gives
    the model its fp32 weights back.

    Args:
        model: the module to train; only parameters with `requires_grad` are optimized.
        optim: optimizer and step settings.
        total_steps: optimizer steps of the stage (for the schedule).
        device: where to run.
    """

    def __init__(self, model: torch.nn.Module, optim: OptimConfig, total_steps: int, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = self.module = model.to(self.device)
        self.optim_config = optim
        self.is_main = True
        self.ep_size = 1
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not params:
            raise ValueError("TorchEngine: the model has no trainable parameters (every parameter is frozen)")
        self.master = None
        if optim.precision == "bf16_master":
            frozen_encoders = [n for n in getattr(model, "frozen", ()) if n.startswith("encoders.")]
            self.master = MasterWeights(model, torch.bfloat16, keep_fp32=frozen_encoders)
        # what the optimizer updates: the fp32 masters of bf16 weights, and fp32 parameters as they are
        masters = {id(p): m for p, m in self.master.pairs} if self.master else {}
        self.params = [masters.get(id(p), p) for _, p in params]
        self.optimizer, self.scheduler = build_optimizer(decay_groups(self.params, optim.weight_decay), optim, total_steps)
        self.micro_step = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.optim_config.precision in ("bf16", "bf16_master"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _full_precision(self) -> contextlib.AbstractContextManager:
        return self.master.full_precision() if self.master else contextlib.nullcontext()

    def finish(self) -> None:
        """After training: the model's parameters are fp32 again (bf16_master: the masters' values)."""
        if self.master:
            self.master.restore()
            self.master = None

    def rank_batches(self, batches):
        """One process reads every micro-batch."""
        return batches

    def consolidate(self) -> torch.nn.Module:
        """The model is already whole."""
        return self.model

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
        if self.master:
            self.master.sync()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm.item(), lr)

    def save_checkpoint(self, path: Path, client_state: dict[str, Any]) -> Path:
        """Atomically write weights, optimizer/scheduler state and `client_state` (JSON) to `path`."""
        tensors: dict[str, torch.Tensor] = {}
        optimizer = _split_tensors(self.optimizer.state_dict(), "optimizer", tensors)
        scheduler = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        config = {"client_state": client_state, "optimizer": optimizer, "scheduler": scheduler, "micro_step": self.micro_step}
        with self._full_precision():
            return save_checkpoint(
                path, self.model.state_dict(), config, extra_files={"optimizer.safetensors": save(tensors)}, overwrite=True
            )

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Restore what `save_checkpoint` wrote (verified against its manifest); return client_state."""
        ckpt = load_checkpoint(path, device=self.device)
        with self._full_precision():
            load_strict(self.model, ckpt.state_dict, path)
        if self.master:
            self.master.sync(all_weights=True)
        tensors = load_file(str(ckpt.paths["optimizer.safetensors"]))
        self.optimizer.load_state_dict(_join_tensors(ckpt.config["optimizer"], tensors))
        self.scheduler.load_state_dict({**ckpt.config["scheduler"], "lr_lambdas": [None] * len(self.optimizer.param_groups)})
        self.micro_step = ckpt.config["micro_step"]
        return ckpt.config["client_state"]
