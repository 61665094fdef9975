"""The engine contract: what the trainer calls to run a step, whatever does the distributing.

The interface follows DeepSpeed's engine so that every engine is a thin adapter:
`backward(loss)` scales by the accumulation steps, `step()` is called after every micro-batch and
updates only at an accumulation boundary; the engine owns its checkpoint I/O. The trainer
(`pipelines/train.py`) and the runner (`pipelines/runner.py`) only ever call what `Engine` lists,
so they never branch on which engine runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist


@dataclass
class StepResult:
    """What an optimizer step reports: pre-clip global grad norm and the LR it used."""

    grad_norm: float
    lr: float


class NonFiniteError(RuntimeError):
    """A loss or gradient norm was NaN or infinite."""


class Engine(Protocol):
    """What the trainer and the runner need from an engine.

    Attributes:
        model: what the trainer calls with a batch's keyword arguments (returns `.loss`).
        module: the model being trained (inside any wrapper): where activation checkpointing and
            compiled layers apply.
        device: where batches go.
        is_main: this process writes metrics and logs (rank 0).
        ep_size: the expert-parallel size actually used (1: experts replicated or sharded as dense).
    """

    model: torch.nn.Module
    module: torch.nn.Module
    device: torch.device
    is_main: bool
    ep_size: int

    def rank_batches(self, batches: Callable[[int], dict]) -> Callable[[int], dict]:
        """Global micro-batch index -> this rank's batch (one process: `batches` itself)."""
        ...

    def autocast(self) -> contextlib.AbstractContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> StepResult | None: ...
    def save_checkpoint(self, path: Path, client_state: dict[str, Any]) -> Path: ...
    def load_checkpoint(self, path: Path) -> dict[str, Any]: ...

    def finish(self) -> None:
        """After the loop, also when it stops on an error: undo what the loop needed (bf16 weights)."""
        ...

    def consolidate(self) -> torch.nn.Module:
        """After a successful loop: the trained model as an ordinary one-process module on every rank
        (full experts, fp32, no sharding), ready to evaluate and save. A collective for
        distributed engines: every rank calls it."""
        ...


def fingerprint(params: list[torch.Tensor]) -> torch.Tensor:
    """`[n, 2]` float64 (sum, sum of squares) per parameter: cheap evidence that a tensor changed."""
    if not params:
        return torch.zeros(0, 2, dtype=torch.float64)
    return torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()]) for p in params]).cpu()


def same_on_all_ranks(value: torch.Tensor, device: torch.device | str, group=None) -> bool:
    """Whether `value` is equal on every rank of `group` (a collective; `device`: where the backend reduces)."""
    value = value.to(device)
    lo, hi = value.clone(), value.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    return torch.equal(lo, hi)


@contextlib.contextmanager
def all_ranks_write(path: Path, is_main: bool) -> Iterator[Path]:
    """A directory every rank writes into, published as `path` only once all of them are done.

    Yields `.tmp-<name>` beside `path` (emptied by rank 0 first); after the block, rank 0 renames it
    to `path` (replacing an older one), so `path` only ever exists complete: a kill mid-save leaves a
    `.tmp-*` that resuming skips. A collective; the directory must be on a file system all ranks share.
    """
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    yield tmp
    dist.barrier()
    if is_main:
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    dist.barrier()
