"""`zoo.load`: a card name -> a verified model and its processor, with no DeepSpeed and no training code."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from zoo.catalog.cards import ModelCard, get_card
from zoo.catalog.install import LoadError, base_card, build_command, install_dir, locate, read_card
from zoo.io.checkpoint import CheckpointError
from zoo.io.model_dir import TOKENIZER_DIR, load_model_dir


def _check_inner_card(root: Path, card: ModelCard | None) -> None:
    inner = read_card(root)
    if card is not None and inner is not None:
        if inner.get("name") != card.name or str(inner.get("version")) != str(card.version):
            raise LoadError(
                f"{str(root)!r} holds {inner.get('name')}@{inner.get('version')}, not {card.ref}; "
                f"rebuild it with `{build_command(card)} --force`"
            )


def _load_adapter(root: Path, base: str | os.PathLike | None, *, device, dtype):
    """An expert adapter directory -> its base model (loaded and verified) with the adapter applied."""
    from zoo.io.expert_adapter import read_expert_adapter
    from zoo.transforms.esft import apply_expert_adapter

    adapter = read_expert_adapter(root)
    if base is None:
        if adapter.base is None:
            raise LoadError(f"{str(root)!r} is an expert adapter that names no base card; pass the base checkpoint "
                            "directory (base=...)")
        base = locate(get_card(adapter.base))
    model, processor, cfg = load_directory(base, device=device)
    apply_expert_adapter(model, adapter, base)  # refuses another base, naming both hashes
    if dtype is not None:
        model.to(dtype=dtype)
    return model.eval(), processor, cfg


def load_directory(
    directory: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    card: ModelCard | None = None,
    base: str | os.PathLike | None = None,
):
    """Load a `MultimodalMoE` and its processor from a zoo checkpoint directory (verified).

    An expert adapter directory (`zoo.io.expert_adapter`) loads as its base model with the adapter
    applied: the base is `base` when given, else the card the adapter records (installed adapters
    do); the base must be the one the adapter was made from (`weights_identity`), else the error
    names both hashes.

    Args:
        directory: a model directory (`zoo.io.model_dir`) with `tokenizer/*` files, or an expert adapter.
        device: where to put the model.
        dtype: cast the model to this dtype; by default the saved dtype (bit-exact weights).
        card: when given, a card inside the checkpoint must name the same model and version.
        base: for an expert adapter: the base checkpoint directory (default: its recorded base card's).

    Returns:
        `(model, processor, model_config)`: the model in eval mode, its `MultimodalProcessor`,
        and the `ModelConfig`.
    """
    from zoo.io.expert_adapter import is_expert_adapter
    from zoo.processor import MultimodalProcessor
    from zoo.tokenizer import load_tokenizer

    root = Path(directory)
    _check_inner_card(root, card)
    if is_expert_adapter(root):
        return _load_adapter(root, base, device=device, dtype=dtype)
    # Every weight comes from the checkpoint: configured pretrained files are never read.
    model, cfg, ckpt = load_model_dir(root, device=device, dtype=dtype)
    if not any(rel.startswith(TOKENIZER_DIR + "/") for rel in ckpt.paths):
        raise CheckpointError(f"checkpoint {str(root)!r} has no {TOKENIZER_DIR}/ files; it cannot make a processor")
    processor = MultimodalProcessor.from_model(model, load_tokenizer(root / TOKENIZER_DIR))
    return model.eval(), processor, cfg


def load(
    name: str,
    version: str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    cards_dir: str | os.PathLike | None = None,
):
    """Load a catalogued model and its processor.

    Args:
        name: a model name (or `name@version-request`).
        version: None (newest release), an exact version "1.2.0", or a range "^1.0" / "~1.2".
        device: where to put the model.
        dtype: cast to this dtype (default: the saved one).
        cards_dir: the cards directory (default: `zoo.catalog.default_cards_dir()`).

    Returns:
        `(model, processor)`: a `MultimodalMoE` in eval mode and its `MultimodalProcessor`.

    Raises:
        zoo.catalog.CatalogError: unknown name or no version satisfies `version`.
        zoo.catalog.NotBuiltError: the card is built by a recipe that has not run; the message names the command.
        zoo.io.CheckpointError: a file is missing, truncated or corrupted (named).
        zoo.io.hub.HubError: the uri cannot be fetched or its sha256 differs.

    An expert adapter card (ESFT; a card with a `base`) loads its base card's model, checks it is the
    base the adapter was made from, and applies the adapter.
    """
    card = get_card(name, version, cards_dir=cards_dir)
    model, processor, _, _ = load_card(card, device=device, dtype=dtype)
    return model, processor


def load_card(card: ModelCard, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """`(model, processor, model_config, directory)` of a card (what `load` does after resolving the name).

    An expert adapter card (one with a `base`) loads its base card's model and applies the adapter.
    """
    path = locate(card)
    base = locate(base_card(card)) if card.base is not None else None
    try:
        model, processor, cfg = load_directory(path, device=device, dtype=dtype, card=card, base=base)
    except CheckpointError as e:
        fix = (f"rebuild it with `{build_command(card)} --force`" if card.recipe and path == install_dir(card)
               else f"remove {str(path)!r} so that it is fetched again" if path == install_dir(card)
               else "fix or replace that directory")
        raise CheckpointError(f"{card.ref}: {e}; {fix}") from e
    return model, processor, cfg, path


__all__ = ["load", "load_card", "load_directory"]
