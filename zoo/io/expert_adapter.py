"""The expert adapter format: some experts' rows of an MoE, tied to the base checkpoint they fit.

An expert adapter (ESFT's unit of storage, `zoo.transforms.esft`) is a checkpoint directory::

    manifest.json          sha256 and size of every other file (kind "expert_adapter")
    adapter.json           {"kind", "experts": {layer: [expert ids]}, "base_sha256", "base", "info"}
    experts.safetensors    "<layer>/<param>" -> the selected experts' rows [n_selected, ...]
    README.md              the model card, when installed from a card

`base_sha256` is the base checkpoint's `weights_identity` (its weight files' hashes, not its card),
so the adapter applies to the base however that base was installed, and to no other. `base` is the
base's card reference (`name@version`) when the adapter was installed from a card with a `base`,
which is how `zoo.load` finds the base by itself. Writes are atomic like every checkpoint's.

A model directory written by the `esft` stage (the whole fine-tuned model, which is what its
evaluation scores) embeds its adapter: the rows in `esft_experts.safetensors` and the selection,
scores and base identity under `config.json`'s `esft` entry; `embedded_expert_adapter` reads it out,
which is how installing an adapter card from a recipe output keeps only the adapter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from zoo.io.checkpoint import CheckpointError, atomic_directory_write, verify_checkpoint, write_manifest

ADAPTER_KIND = "expert_adapter"
ADAPTER_WEIGHTS = "experts.safetensors"
ADAPTER_CONFIG = "adapter.json"
EMBEDDED_WEIGHTS = "esft_experts.safetensors"  # in an `esft` stage's model directory
EMBEDDED_KEY = "esft"  # its `config.json` entry


@dataclass
class ExpertAdapter:
    """An expert adapter as read from disk.

    Attributes:
        experts: MoE layer index -> the expert ids whose rows the adapter holds, in row order.
        base_sha256: the `weights_identity` of the base checkpoint it was made from.
        tensors: `"<layer>/<param>"` -> rows `[len(experts[layer]), ...]`.
        base: the base's card reference (`name@version`), or None when it was not installed from a card.
        info: what made it (ESFT's metric, p, relevance scores, sizes, ...).
    """

    experts: dict[int, list[int]]
    base_sha256: str
    tensors: dict[str, torch.Tensor]
    base: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        """Bytes of expert weights it stores."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def is_expert_adapter(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds an expert adapter (by its `adapter.json`; not verified)."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("kind") == ADAPTER_KIND
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def write_expert_adapter(path: str | os.PathLike, adapter: ExpertAdapter, *,
                         extra_files: Mapping[str, bytes] | None = None, overwrite: bool = False) -> Path:
    """Write `adapter` as a checkpoint directory at `path` (atomic), with `extra_files` (e.g. a card)."""
    for layer, ids in adapter.experts.items():
        for name in {k.split("/", 1)[1] for k in adapter.tensors if k.split("/", 1)[0] == str(layer)}:
            rows = adapter.tensors[f"{layer}/{name}"]
            if rows.shape[0] != len(ids):
                raise ValueError(f"expert adapter: {layer}/{name} has {rows.shape[0]} rows for {len(ids)} experts {ids}")
    config = {"kind": ADAPTER_KIND, "experts": {str(k): list(v) for k, v in sorted(adapter.experts.items())},
              "base_sha256": adapter.base_sha256, "base": adapter.base, "info": adapter.info}

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in adapter.tensors.items()}, str(tmp / ADAPTER_WEIGHTS))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1), encoding="utf-8")
        for rel, data in (extra_files or {}).items():
            (tmp / rel).write_bytes(data)
        write_manifest(tmp, kind=ADAPTER_KIND)

    return atomic_directory_write(path, write, overwrite=overwrite)


def read_expert_adapter(directory: str | os.PathLike) -> ExpertAdapter:
    """Verify and read an expert adapter directory.

    Raises:
        CheckpointError: a file is missing, truncated or corrupted (named), or the directory is not
            an expert adapter.
    """
    verify_checkpoint(directory)
    root = Path(directory)
    if not is_expert_adapter(root):
        raise CheckpointError(f"{str(root)!r} is not an expert adapter (no {ADAPTER_CONFIG} of kind {ADAPTER_KIND!r})")
    config = json.loads((root / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return ExpertAdapter(experts={int(k): list(v) for k, v in config["experts"].items()},
                         base_sha256=config["base_sha256"], tensors=load_file(str(root / ADAPTER_WEIGHTS)),
                         base=config.get("base"), info=config.get("info") or {})


def embedded_expert_adapter(model_dir: str | os.PathLike) -> ExpertAdapter:
    """The expert adapter an `esft` stage's model directory embeds (verified).

    Raises:
        CheckpointError: the directory is corrupt, or holds no embedded adapter (it was not written
            by an `esft` stage).
    """
    manifest = verify_checkpoint(model_dir)
    root = Path(model_dir)
    config = json.loads((root / "config.json").read_text(encoding="utf-8")) if (root / "config.json").is_file() else {}
    info = config.get(EMBEDDED_KEY)
    if EMBEDDED_WEIGHTS not in manifest["files"] or not isinstance(info, Mapping):
        raise CheckpointError(f"{str(root)!r} holds no expert adapter: it is neither an adapter directory nor an esft "
                              f"stage output (no {EMBEDDED_WEIGHTS} and config entry {EMBEDDED_KEY!r})")
    rest = {k: v for k, v in info.items() if k not in ("experts", "base_sha256")}
    return ExpertAdapter(experts={int(k): list(v) for k, v in info["experts"].items()}, base_sha256=info["base_sha256"],
                         tensors=load_file(str(root / EMBEDDED_WEIGHTS)), info=rest)


__all__ = ["ADAPTER_CONFIG", "ADAPTER_KIND", "ADAPTER_WEIGHTS", "EMBEDDED_KEY", "EMBEDDED_WEIGHTS", "ExpertAdapter",
           "embedded_expert_adapter", "is_expert_adapter",
           "read_expert_adapter", "write_expert_adapter"]
