"""bf16 weights with an fp32 master copy: the "bf16_master" precision of `TorchEngine`.

Autocast ("bf16") keeps fp32 weights and casts each to bf16 at every use, every step, and casts
every weight gradient back (SmolLM2-135M on our CPU, one thread: casts and copies 5.9% of a step,
2.9% with this; `bench/RESULTS.md`). `MasterWeights` casts the weights once instead:

- every floating parameter of the model is held in bf16 (the module computes in bf16);
- its fp32 tensor lives on, untouched by the forward: for a trainable parameter it becomes the
  optimizer's *master* (an `nn.Parameter` the optimizer updates); a frozen one keeps it only so
  that `restore()` hands the model back exactly as it came;
- gradients reach the masters as backward produces them (a post-accumulate hook adds each bf16
  gradient into the master's fp32 `.grad`, kept allocated across steps, and frees it), so
  accumulation over micro-batches and the optimizer's moments are fp32; `sync()` copies the
  updated masters back into the bf16 weights after each optimizer step.

Autocast stays on around the forward (ops it runs in fp32 — softmax, norms, losses — still do),
so a step computes what "bf16" computes, except that the residual stream is bf16 (autocast's is
fp32, added to fp32 weights' outputs). Parameters of modules named in `keep_fp32` stay fp32 (a
frozen encoder whose features are cached under a hash of its fp32 weights).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


class MasterWeights:
    """Hold `model`'s floating parameters in `dtype`, keeping their fp32 tensors as master copies.

    Args:
        model: the model; its parameters are changed in place (`p.data` becomes a `dtype` copy).
        dtype: the compute dtype of the weights.
        keep_fp32: module-name prefixes (`"encoders.image"`) whose parameters stay as they are.

    Attributes:
        masters: fp32 master parameters of the trainable parameters (what the optimizer updates),
            in `model.parameters()` order; zoo_* attributes (`zoo_no_decay`, ...) are copied.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16, keep_fp32: Iterable[str] = ()) -> None:
        keep = tuple(f"{k}." for k in keep_fp32)
        self.model = model
        self.pairs: list[tuple[nn.Parameter, nn.Parameter]] = []  # (module parameter, fp32 tensor as a Parameter)
        self._hooks = []
        for name, p in model.named_parameters():  # tied parameters once
            if not p.is_floating_point() or p.dtype == dtype or name.startswith(keep):
                continue
            master = nn.Parameter(p.data, requires_grad=p.requires_grad)
            for attr, value in vars(p).items():
                if attr.startswith("zoo_"):
                    setattr(master, attr, value)
            p.data = p.data.to(dtype)
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._fold(master)))
            self.pairs.append((p, master))
        self.masters = [m for _, m in self.pairs if m.requires_grad]

    @staticmethod
    def _fold(master: nn.Parameter):
        storage: list[torch.Tensor] = []  # the master's gradient, reused every step: a fresh 100 MB
        # tensor per step (the embeddings') costs more in page faults on CPU than the copy into it

        def hook(p: nn.Parameter) -> None:
            if master.grad is None:
                if not storage:
                    storage.append(torch.empty_like(master))
                master.grad = storage[0].copy_(p.grad)
            else:
                master.grad.add_(p.grad)
            p.grad = None

        return hook

    @torch.no_grad()
    def sync(self, *, all_weights: bool = False) -> None:
        """Copy the masters into the low-precision weights (trainable ones; every one with `all_weights`)."""
        pairs = [(p, m) for p, m in self.pairs if all_weights or m.requires_grad]
        if pairs:
            torch._foreach_copy_([p.data for p, _ in pairs], [m.data for _, m in pairs])

    @contextmanager
    def full_precision(self) -> Iterator[None]:
        """Inside the block the model's parameters are the fp32 tensors (for state dicts, loads)."""
        low = [p.data for p, _ in self.pairs]
        for p, m in self.pairs:
            p.data = m.data
        try:
            yield
        finally:
            for (p, _), data in zip(self.pairs, low):
                p.data = data

    def restore(self) -> None:
        """Give the model its fp32 parameters back for good (trained ones with their master values)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for p, m in self.pairs:
            p.data = m.data
            p.grad = None
        self.pairs = []


__all__ = ["MasterWeights"]
