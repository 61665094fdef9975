"""Before a run trains: will its outputs fit on the disk? An estimate from the model's shapes.

A real recipe writes gigabytes (SmolLM2 upcycled to 4 experts is ~1 GB of fp32 weights per output,
and every kept training checkpoint holds the weights and AdamW's two moments of what trains), so a
full disk would otherwise stop it hours in. `check_disk` estimates the bytes from a meta-device
build (no memory, no weights read) and refuses to start, naming both figures, when they exceed
the free space of the run directory's file system.

The estimate per stage output: its parameters in fp32 (the output checkpoint), plus
`keep_checkpoints` training checkpoints of weights and two fp32 moments per trained parameter,
counted as every parameter for stages that train the LM and as the non-LM parameters for stages
that train adapters or connectors only (an upper bound on those is their whole size, which would
refuse builds that fit). Stages after a `moe-tune` count the upcycled size. Outputs of stages that
already finished are not counted again.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

FP32 = 4


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def stage_sizes(recipe) -> dict[str, int]:
    """Stage name -> parameters of its output model (meta-device builds, the MoE counted after upcycling)."""
    from zoo.models.builders import build_model
    from zoo.models.pretrained import resolve_pretrained
    from zoo.transforms.upcycle import moe_skeleton

    cfg, _ = resolve_pretrained(copy.deepcopy(recipe.model))
    with torch.device("meta"):
        model = build_model(cfg)
        dense = _params(model)
        moe = dense
        for stage in recipe.stages:
            options = stage.options
            if getattr(options, "moe", None) is not None:
                from zoo.moe.config import MoEConfig

                moe_cfg = options.moe if isinstance(options.moe, MoEConfig) else MoEConfig(**options.moe)
                lm = copy.deepcopy(model.language_model)
                moe = dense - _params(model.language_model) + _params(moe_skeleton(lm, moe_cfg))
                break
    sizes, upcycled = {}, False
    for stage in recipe.stages:
        upcycled = upcycled or getattr(stage.options, "moe", None) is not None
        sizes[stage.name] = moe if upcycled else dense
    return sizes


def estimate_bytes(recipe, out_dir: Path, only: list[str] | None = None) -> int:
    """Bytes the stages still to run will write under `out_dir` (outputs + kept training checkpoints)."""
    sizes = stage_sizes(recipe)
    total = 0
    for stage in recipe.stages:
        if only and stage.name not in only:
            continue
        branches = stage.stage().branches(stage)
        for branch in branches:
            if (Path(out_dir) / branch.path / "model").is_dir():
                continue  # done already
            params = sizes[stage.name]
            trains_lm = any(p.startswith("language_model") for p in (stage.trains or stage.stage().default_trains or []))
            trained = params if trains_lm else params // 20  # adapters / connectors: a small share
            ckpt = params * FP32 + 2 * trained * FP32
            total += params * FP32 + stage.train.keep_checkpoints * ckpt
    return total


def _readable(n: int) -> str:
    """Bytes as the largest unit that keeps a digit before the point: '3.2 GB', '41.0 MB', '512 B'."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def check_disk(recipe, out_dir: Path, only: list[str] | None = None) -> None:
    """Refuse to start when the estimate exceeds the free space where `out_dir` lives.

    Raises:
        OSError: naming the bytes needed and the bytes free.
    """
    out_dir = Path(out_dir)
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    need = estimate_bytes(recipe, out_dir, only)
    free = shutil.disk_usage(probe).free
    if need > free:
        raise OSError(f"recipe {recipe.name!r} would write about {_readable(need)} under {str(out_dir)!r} (outputs and "
                      f"kept training checkpoints) but only {_readable(free)} are free there; free space, lower "
                      f"train.keep_checkpoints, or train into another --out")


__all__ = ["check_disk", "estimate_bytes", "stage_sizes"]
