"""IO: the checkpoint format, model directories, downloads, and export to plain transformers."""

from zoo.io.checkpoint import CheckpointError, load_checkpoint, load_strict, save_checkpoint, verify_checkpoint
from zoo.io.model_dir import load_model_dir, save_model_dir
from zoo.io.moe_lm import load_moe_lm, save_moe_lm

__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "load_model_dir",
    "load_moe_lm",
    "load_strict",
    "save_checkpoint",
    "save_model_dir",
    "save_moe_lm",
    "verify_checkpoint",
]
