"""The multimodal model's checkpoint directory: what every stage writes and `zoo.load` reads.

A zoo checkpoint (`zoo.io.checkpoint`) whose `config.json` is `{"model": ModelConfig dict, ...}`
(plus whatever the writer records: stage, metrics, ...), whose extra files include the tokenizer
under `tokenizer/`, and whose weights are the `MultimodalMoE` state dict. `load_model_dir`
rebuilds the model from the config alone (`build_model`, adapters included) and loads the weights
strictly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from zoo.io.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint, load_strict, save_checkpoint

TOKENIZER_DIR = "tokenizer"


def save_model_dir(model, cfg, path: str | os.PathLike, tokenizer_dir: str | os.PathLike, *,
                   extra: Mapping[str, Any] | None = None,
                   extra_files: Mapping[str, str | os.PathLike | bytes] | None = None) -> Path:
    """Write a model, its `ModelConfig` and its tokenizer files as a zoo checkpoint (atomic, replaces).

    Args:
        model: the `MultimodalMoE`.
        cfg: its `ModelConfig` (what `build_model` rebuilds it from).
        path: the checkpoint directory.
        tokenizer_dir: a `save_pretrained` tokenizer directory; its files go to `tokenizer/`.
        extra: more `config.json` entries (stage name, metrics, ...).
        extra_files: more files by relative name.
    """
    files = {f"{TOKENIZER_DIR}/{p.name}": p for p in sorted(Path(tokenizer_dir).iterdir()) if p.is_file()}
    files.update(extra_files or {})
    config = {"model": cfg.to_dict(), **(extra or {})}
    return save_checkpoint(path, model.state_dict(), config, extra_files=files, overwrite=True)


def load_model_dir(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Rebuild a model from its checkpoint directory (verified against its manifest, strict load).

    Args:
        path: a directory written by `save_model_dir`.
        device: where to put the model.
        dtype: cast to this dtype after loading; by default the saved one (bit-exact weights).

    Returns:
        `(model, model_config, checkpoint)`: the model (train mode as built), its `ModelConfig`, and
        the `LoadedCheckpoint` (config dict and extra files' paths).

    Raises:
        CheckpointError: a file is missing or corrupt, the config is not a model config, or the
            weights do not match the model the config builds.
    """
    from zoo.models.builders import model_for_checkpoint

    root = Path(path)
    ckpt: LoadedCheckpoint = load_checkpoint(root)
    if not isinstance(ckpt.config.get("model"), dict):
        raise CheckpointError(
            f"checkpoint {str(root)!r}: config.json has no 'model' entry (a ModelConfig); this reads "
            "multimodal checkpoints such as the recipe outputs (for a bare MoECausalLM use zoo.io.load_moe_lm)"
        )
    model, cfg = model_for_checkpoint(ckpt.config)
    floating = {t.dtype for t in ckpt.state_dict.values() if t.is_floating_point()}
    if len(floating) == 1:
        model = model.to(dtype=floating.pop())
    model = load_strict(model, ckpt.state_dict, root).to(device=device)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model, cfg, ckpt


__all__ = ["TOKENIZER_DIR", "load_model_dir", "save_model_dir"]
