"""Tile configurations: a list to autotune over on a GPU, a single one under the interpreter.

`triton.autotune` with more than one config benchmarks them, which needs a GPU driver; under
`TRITON_INTERPRET=1` (CPU tests) every kernel gets exactly one config, with tiles chosen large
relative to the test shapes because the interpreter costs ~3 ms per (program x K-step).
"""

from __future__ import annotations

import os

import torch
import triton


# Row tiles that run together in the grouped GEMMs (see routing.grouped_pid); not tuned.
GROUP_M = 8


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (read when kernels are decorated)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def configs(gpu: list[dict], interpret: dict) -> list[triton.Config]:
    """Autotune configs for this process.

    Args:
        gpu: entries `{"BLOCK_M": .., ..., "num_warps": .., "num_stages": ..}` tried on a GPU.
        interpret: the one entry used under `TRITON_INTERPRET=1`.

    Returns:
        `triton.Config`s: all of `gpu`, or just `interpret` when interpreting.
    """
    entries = [interpret] if interpreting() else gpu
    out = []
    for entry in entries:
        meta = dict(entry)
        num_warps = meta.pop("num_warps", 4)
        num_stages = meta.pop("num_stages", 3)
        out.append(triton.Config(meta, num_warps=num_warps, num_stages=num_stages))
    return out


def grid_rows(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the row tiles of a grouped GEMM: `sum_e ceil(n_e / BM) <= ceil(N / BM) + E`.

    Programs past the real tile count exit at once (see `routing.expert_tile`), so the launch
    needs no device-to-host copy of the per-expert counts.
    """
    return triton.cdiv(num_rows, block_m) + num_experts


def block_e(num_experts: int) -> int:
    """Vector width that holds the per-expert counts inside a kernel (a power of two, >= 2)."""
    return max(triton.next_power_of_2(num_experts), 2)


def dot_precision(dtype: torch.dtype) -> str | None:
    """`tl.dot` input precision: for fp32, TF32 only if torch allows it for matmuls (default: no);
    None (the backend's default) for 16-bit inputs, which run on tensor cores either way."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
