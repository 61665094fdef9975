"""A bare `MoECausalLM` as a zoo checkpoint: its transformers config, its `MoEConfig`, its weights.

For language-only use (`zoo.load` reads multimodal checkpoints, whose config is a `ModelConfig`).
The LM is rebuilt offline from its transformers config and upcycled with the saved `MoEConfig`;
the weights then load strictly, so the round trip is bit-exact.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from zoo.io.checkpoint import DEFAULT_MAX_SHARD_BYTES, CheckpointError, load_checkpoint, load_strict, save_checkpoint

MOE_CAUSAL_LM_KIND = "moe_causal_lm"


def save_moe_lm(
    model,
    directory: str | os.PathLike,
    *,
    extra_files: Mapping[str, str | os.PathLike | bytes] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Save a `zoo.models.MoECausalLM` so that `load_moe_lm` rebuilds it offline.

    The config records the transformers LM config (`lm.config.to_dict()`) and the `MoEConfig`;
    the state dict is the wrapper's (`lm.` prefixed keys).

    Args:
        model: the `MoECausalLM` (upcycled: it has an `MoEConfig`).
        directory: final checkpoint path.
        extra_files: as in `save_checkpoint` (tokenizer files, model card).
        max_shard_bytes: shard size limit.
        overwrite: replace an existing checkpoint.
    """
    from zoo.models.lm import MoECausalLM

    if not isinstance(model, MoECausalLM):
        raise TypeError(f"save_moe_lm: expected an MoECausalLM, got {type(model).__name__}")
    if model.moe_config is None:
        raise TypeError("save_moe_lm: the MoECausalLM has no MoEConfig (its MoE layers came from an adapter); "
                        "save the multimodal model with its ModelConfig instead")
    config = {"kind": MOE_CAUSAL_LM_KIND, "lm": model.lm.config.to_dict(), "moe": model.moe_config.to_dict(),
              "loss_coefs": dict(model.loss_coefs)}
    return save_checkpoint(directory, model.state_dict(), config, extra_files=extra_files,
                           max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def moe_lm_from_config(config: Mapping[str, Any], *, dtype: torch.dtype | None = None):
    """Build an `MoECausalLM` with fresh weights from a `save_moe_lm` config dict (offline).

    Args:
        config: `{"kind": "moe_causal_lm", "lm": <transformers config dict>, "moe": <MoEConfig dict>}`.
        dtype: parameter dtype (default: float32).
    """
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from zoo.moe.config import MoEConfig
    from zoo.transforms.upcycle import moe_skeleton

    if config.get("kind") != MOE_CAUSAL_LM_KIND:
        raise CheckpointError(f"config kind is {config.get('kind')!r}, expected {MOE_CAUSAL_LM_KIND!r}")
    lm_dict = dict(config["lm"])
    model_type = lm_dict.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"LM model_type {model_type!r} is not known to this transformers version")
    hf_config = CONFIG_MAPPING[model_type].from_dict(lm_dict)
    lm = AutoModelForCausalLM.from_config(hf_config, dtype=dtype or torch.float32)
    model = moe_skeleton(lm, MoEConfig.from_dict(dict(config["moe"])))
    model.loss_coefs = dict(config.get("loss_coefs", model.loss_coefs))
    return model


def load_moe_lm(directory: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a checkpoint written by `save_moe_lm`: verify, rebuild offline, load weights strictly.

    Args:
        directory: the checkpoint directory.
        device: where to put the model.
        dtype: cast the model to this dtype after loading; by default it keeps the saved dtype
            (so the round trip is bit-exact).

    Returns:
        `(model, paths)`: the `MoECausalLM` in eval mode and the extra files' paths.
    """
    state, config, paths = load_checkpoint(directory)
    floating = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(floating) > 1:
        raise CheckpointError(
            f"checkpoint {str(directory)!r} mixes floating dtypes {sorted(map(str, floating))}; save_moe_lm writes one dtype"
        )
    model = moe_lm_from_config(config, dtype=floating.pop() if floating else torch.float32)
    model = load_strict(model, state, directory).to(device=device)
    return (model.to(dtype=dtype) if dtype is not None else model).eval(), paths


__all__ = ["MOE_CAUSAL_LM_KIND", "load_moe_lm", "moe_lm_from_config", "save_moe_lm"]
