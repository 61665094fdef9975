"""What a training run says when a loss or gradient goes NaN or infinite.

Policy: **halt**. A non-finite loss (checked before backward) or gradient norm (checked before the
optimizer step, which the one-process engine then does not apply) stops the stage with a
`NonFiniteError`; no step is skipped silently, because a skipped step changes the run without
saying so and a NaN usually comes back at the next batch. The error names the stage, the step as
`metrics.jsonl` counts it (1-based: the step that failed is the first one not written there), and
the newest checkpoint whose weights are all finite and whose recorded loss was finite: the one to
resume from (with a lower learning rate) once newer checkpoints, if any, are removed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def _finite_weights(ckpt: Path) -> bool:
    """Every floating tensor of every safetensors file in `ckpt` is finite (other formats: assumed)."""
    import torch
    from safetensors import safe_open

    for file in sorted(ckpt.rglob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    return False
    return True


def _finite_losses(metrics_path: Path) -> dict[int, bool]:
    """metrics.jsonl step -> whether its loss was finite."""
    out = {}
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            try:
                m = json.loads(line)
                out[int(m["step"])] = isinstance(m.get("loss"), (int, float)) and math.isfinite(m["loss"])
            except (ValueError, KeyError, TypeError):
                continue
    return out


def last_finite_checkpoint(checkpoints: list[Path], metrics_path: Path) -> tuple[Path | None, list[Path]]:
    """(newest checkpoint with finite weights and a finite loss at its step, newer ones that are not).

    Args:
        checkpoints: the run's checkpoints, oldest first (`step-XXXXXXXX` directories).
        metrics_path: its metrics.jsonl.
    """
    losses = _finite_losses(metrics_path)
    bad = []
    for ckpt in reversed(checkpoints):
        try:
            step = int(ckpt.name.split("-")[-1])
        except ValueError:
            step = None
        if (step is None or losses.get(step, True)) and _finite_weights(ckpt):
            return ckpt, bad[::-1]
        bad.append(ckpt)
    return None, bad[::-1]


def nonfinite_message(stage: str, step: int, cause: str, checkpoints: list[Path], metrics_path: Path,
                      micro: int | None = None) -> str:
    """The one-line `NonFiniteError` message (see the module docstring).

    Args:
        stage: the stage (or branch) being trained.
        step: the 0-based loop index of the failing optimizer step (the message says `step + 1`).
        cause: what was non-finite, e.g. `loss is nan`, `gradient norm is inf`.
        checkpoints: the run's checkpoints, oldest first.
        metrics_path: its metrics.jsonl.
        micro: the micro-batch within the step, if known.
    """
    good, bad = last_finite_checkpoint(checkpoints, metrics_path)
    where = f" (micro-batch {micro})" if micro is not None else ""
    after = (f"; newer checkpoints with non-finite values: {[p.name for p in bad]} (remove them before --resume)"
             if bad else "")
    return (f"stage {stage!r}: {cause} at step {step + 1}{where} (steps counted as in metrics.jsonl); training halted; "
            f"last good checkpoint: {good or 'none'} (weights and loss finite){after}; lower the learning rate "
            f"or check the data, then resume from it")


__all__ = ["last_finite_checkpoint", "nonfinite_message"]
