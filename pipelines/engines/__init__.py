"""Engines: one interface (`base.Engine`), one home per way of distributing a step.

- `torch`: one process, plain PyTorch (`torch_engine.TorchEngine`);
- `deepspeed`: ZeRO 0-2 with expert parallelism (`deepspeed_engine.DeepSpeedEngine`);
- `fsdp`: PyTorch FSDP2, every parameter sharded, experts over an EP x FSDP mesh
  (`fsdp_engine.FSDPEngine`).

`make_engine(spec, ...)` builds the one an `EngineSpec` names; the trainer and the runner only see
the `Engine` interface.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zoo.pipelines.engines.base import Engine, NonFiniteError, StepResult
from zoo.pipelines.engines.torch_engine import TorchEngine
from zoo.pipelines.optim import OptimConfig

ENGINE_KINDS = ("torch", "deepspeed", "fsdp")


@dataclass
class EngineSpec:
    """Which engine runs the stages.

    Attributes:
        kind: "torch" (one process), "deepspeed" or "fsdp" (both launched by
            `pipelines/launch/*.sh` or torchrun).
        ds_config: DeepSpeed config name in `configs/deepspeed/` or a path ("zero2": fp32 or bf16
            from the stage's precision).
        ep_size: expert-parallel group size (deepspeed and fsdp).
    """

    kind: str = "torch"
    ds_config: str = "zero2"
    ep_size: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ENGINE_KINDS:
            raise ValueError(f"engine {self.kind!r} is not one of {ENGINE_KINDS}")
        if self.ep_size < 1:
            raise ValueError(f"ep_size must be >= 1, got {self.ep_size}")
        if self.kind == "torch" and self.ep_size != 1:
            raise ValueError("ep_size > 1 needs the deepspeed or fsdp engine (launch with pipelines/launch/*.sh)")

    def init_distributed(self) -> None:
        """Start the process group this engine needs (once per process, before any stage)."""
        if self.kind == "deepspeed":
            from zoo.pipelines.engines.deepspeed_engine import init_distributed

            init_distributed()
        elif self.kind == "fsdp":
            from zoo.pipelines.engines.fsdp_engine import init_distributed

            init_distributed()


def _trains_experts(model: torch.nn.Module) -> bool:
    from zoo.moe.experts import SwiGLUExperts

    return any(isinstance(m, SwiGLUExperts) and any(p.requires_grad for p in m.parameters()) for m in model.modules())


def make_engine(spec: EngineSpec, model: torch.nn.Module, optim: OptimConfig, total_steps: int) -> Engine:
    """The engine `spec` names around `model`.

    Experts are sharded over `spec.ep_size` ranks when the stage trains them (with no trainable
    experts the distributed engines are data parallel only: `engine.ep_size` says which).
    """
    if spec.kind == "torch":
        return TorchEngine(model, optim, total_steps)
    ep_size = spec.ep_size if _trains_experts(model) else 1
    if spec.kind == "deepspeed":
        from zoo.pipelines.engines.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, optim, total_steps, ds_config=spec.ds_config, ep_size=ep_size)
    from zoo.pipelines.engines.fsdp_engine import FSDPEngine

    return FSDPEngine(model, optim, total_steps, ep_size=ep_size)


__all__ = ["ENGINE_KINDS", "Engine", "EngineSpec", "NonFiniteError", "StepResult", "TorchEngine", "make_engine"]
