"""HF-native export of an `MoECausalLM`: a plain transformers `MixtralForCausalLM` or `Qwen2MoeForCausalLM`.

The exported directory loads with `AutoModelForCausalLM.from_pretrained(dir)` and no zoo import,
and gives the zoo model's logits. Which class holds a model is decided by the targets in
`HF_TARGETS` (`targets.py`); anything no target can represent (an o_proj bias, a non-top-k router,
non-SwiGLU or LoRA experts, experts of different widths, another attention variant) is refused
with every target's reasons. The weights are moved into the transformers model in memory and
written by its own `save_pretrained` (which in transformers 5 writes per-expert keys and fuses
them on load), and by default the export is checked by running both models on a probe sequence.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from zoo.io.checkpoint import atomic_directory_write, check_extra_name, copy_extra_file, write_manifest
from zoo.io.export.inspect import inspect_moe_lm
from zoo.io.export.targets import HF_TARGETS
from zoo.models.lm import MoECausalLM


class ExportError(ValueError):
    """The model cannot be written as the requested (or any) transformers MoE class."""


def _why_not(model: MoECausalLM, target: str, info) -> list[str]:
    try:
        adapter = HF_TARGETS.build(target)
    except ValueError as e:
        raise ExportError(f"unknown export target {target!r}; known targets: {HF_TARGETS.names()}") from e
    return adapter.reasons(model, info)


def hf_target(model: MoECausalLM) -> str:
    """The transformers class family that represents `model`: 'mixtral' if it can, else 'qwen2_moe'.

    Raises:
        ExportError: listing why each target cannot hold the model.
    """
    if not isinstance(model, MoECausalLM):
        raise ExportError(f"expected an MoECausalLM, got {type(model).__name__}")
    info = inspect_moe_lm(model)
    order = ["mixtral", "qwen2_moe"] + [t for t in HF_TARGETS.names() if t not in ("mixtral", "qwen2_moe")]
    why = {t: _why_not(model, t, info) for t in order}
    for t in order:
        if not why[t]:
            return t
    detail = "; ".join(f"{t}: " + ", ".join(dict.fromkeys(r)) for t, r in why.items())
    names = " nor ".join(HF_TARGETS.build(t).hf_class for t in order)
    raise ExportError(f"neither {names} can represent this model ({detail})")


def to_hf(model: MoECausalLM, target: str | None = None) -> nn.Module:
    """Build the transformers MoE model holding `model`'s weights (same device and dtype).

    Args:
        model: the zoo model.
        target: an `HF_TARGETS` name ('mixtral', 'qwen2_moe'); default: `hf_target(model)`.

    Returns:
        A `MixtralForCausalLM` or `Qwen2MoeForCausalLM` in eval mode.
    """
    from transformers import AutoModelForCausalLM

    if not isinstance(model, MoECausalLM):
        raise ExportError(f"expected an MoECausalLM, got {type(model).__name__}")
    target = target or hf_target(model)
    info = inspect_moe_lm(model)
    reasons = _why_not(model, target, info)
    if reasons:
        raise ExportError(f"cannot export as {target}: " + "; ".join(dict.fromkeys(reasons)))
    adapter = HF_TARGETS.build(target)
    param = next(model.parameters())
    with warnings.catch_warnings():  # a zero-width shared expert is intended
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        hf = AutoModelForCausalLM.from_config(adapter.config(model, info), dtype=param.dtype)
    state = adapter.state_dict(model, info)
    hf_keys = set(hf.state_dict())
    missing = [k for k in sorted(hf_keys - set(state)) if not adapter.optional_key(k, info)]
    unexpected = sorted(set(state) - hf_keys)
    if missing or unexpected:
        raise ExportError(
            f"weights do not map onto {type(hf).__name__}: missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    hf.load_state_dict(state, strict=False)
    return hf.to(param.device).eval()


def check_parity(model: MoECausalLM, hf: nn.Module, *, seq_len: int = 16, seed: int = 0) -> float:
    """Run both models on one random sequence; raise `ExportError` if the logits differ.

    Tolerance: 1e-4 relative to the logits' scale in float32/float64, 2e-2 in half precision
    (the two compute the same function with a different expert summation order).

    Returns:
        The largest absolute logit difference.
    """
    cfg = model.lm.config
    n = min(seq_len, getattr(cfg, "max_position_embeddings", seq_len))
    device = next(model.parameters()).device
    ids = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed)).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(ids).logits.float()
            got = hf(ids).logits.float()
    finally:
        model.train(was_training)
    diff = (ref - got).abs().max().item()
    dtype = next(model.parameters()).dtype
    rel = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    tol = rel * max(1.0, ref.abs().max().item())
    if not diff <= tol:
        raise ExportError(f"exported {type(hf).__name__} disagrees with the zoo model: max |logit diff| {diff:.3g} > {tol:.3g}")
    return diff


def export_hf(
    model: MoECausalLM,
    directory: str | os.PathLike,
    *,
    target: str | None = None,
    extra_files: Mapping[str, str | os.PathLike | bytes] | None = None,
    verify: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write `model` as a transformers MoE checkpoint directory, atomically.

    The directory holds `config.json`, `generation_config.json`, safetensors weights written by
    transformers' `save_pretrained`, the extra files (e.g. tokenizer files, `README.md`) and a
    `manifest.json` with the sha256 of every file (`zoo.checkpoint.verify_checkpoint` checks it;
    transformers ignores it).

    Args:
        model: the zoo model.
        directory: output path; must not exist unless `overwrite`.
        target: 'mixtral' or 'qwen2_moe'; default: the first that can represent the model.
        extra_files: relative name -> source path or bytes, copied into the directory.
        verify: compare the logits of both models on a probe sequence before writing.
        overwrite: replace an existing directory.

    Returns:
        The directory's path.
    """
    hf = to_hf(model, target)
    if verify:
        check_parity(model, hf)
    extras = {check_extra_name(n): s for n, s in (extra_files or {}).items()}

    def write(tmp: Path) -> None:
        hf.save_pretrained(tmp)
        for name, src in extras.items():
            if (tmp / name).exists():
                raise ExportError(f"extra file {name!r} would overwrite a file transformers wrote")
            copy_extra_file(tmp / name, src)
        write_manifest(tmp)

    return atomic_directory_write(directory, write, overwrite=overwrite)


__all__ = ["ExportError", "check_parity", "export_hf", "hf_target", "to_hf"]
