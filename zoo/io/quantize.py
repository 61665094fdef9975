"""A quantized copy of a model checkpoint directory (`zoo quantize`): load, `quantize_experts`, save.

An io operation over the pure transform `zoo.transforms.quantize` (which knows nothing of
directories), so the transform layer never imports the checkpoint format.
"""

from __future__ import annotations

from pathlib import Path

from zoo.io.checkpoint import CheckpointError, weights_identity
from zoo.io.model_dir import TOKENIZER_DIR, load_model_dir, save_model_dir
from zoo.moe.quantized import QuantizationConfig
from zoo.transforms.quantize import expert_weight_bytes, quantize_experts


def quantize_model_dir(src, out, config: QuantizationConfig | dict | None = None, *, overwrite: bool = False, **kwargs):
    """Quantize the experts of a model checkpoint directory into a new checkpoint directory.

    The output is a zoo model directory like any other (`zoo.io.model_dir`: safetensors with the
    codes and scales, `config.json` whose `model.quantization` records bits and every group size,
    the tokenizer files, a manifest with every file's sha256), so `zoo.load` / `load_directory`
    rebuild it and load it strictly. The source's card and metrics are not carried over (they
    describe the float model); `config.json` records `quantized_from` (the source path and its
    weights' identity).

    Args:
        src: a model directory (`save_model_dir` output; not an expert adapter).
        out: the new directory; must not exist unless `overwrite`.
        config: a `QuantizationConfig` or dict; else `**kwargs` (`bits`, `group_size`, `adaptive`).
        overwrite: replace an existing `out`.

    Returns:
        `(out path, resolved QuantizationConfig, expert_weight_bytes before, after)`.
    """
    src, out = Path(src), Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{str(out)!r} already exists; pass overwrite=True (--overwrite) to replace it")
    if out.resolve() == src.resolve():
        raise CheckpointError(f"quantize: the output {str(out)!r} is the source directory")
    model, cfg, ckpt = load_model_dir(src)
    if cfg.quantization is not None:
        raise ValueError(f"quantize: {str(src)!r} is already quantized ({cfg.quantization.bits}-bit experts)")
    if not (src / TOKENIZER_DIR).is_dir():
        raise CheckpointError(f"quantize: {str(src)!r} has no {TOKENIZER_DIR}/ files to carry over")
    before = expert_weight_bytes(model)
    cfg.quantization = quantize_experts(model, config, **kwargs)
    after = expert_weight_bytes(model)
    source = {"path": str(src.resolve()), "weights_sha256": weights_identity(src)}
    path = save_model_dir(model, cfg, out, src / TOKENIZER_DIR, extra={"quantized_from": source})
    return path, cfg.quantization, before, after


__all__ = ["quantize_model_dir"]
