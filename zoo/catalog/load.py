"""`zoo.load`: a card name -> a verified model and its processor, with no DeepSpeed and no training code."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from zoo.catalog.cards import ModelCard, get_card
from zoo.catalog.install import LoadError, build_command, install_dir, locate, read_card
from zoo.io.checkpoint import CheckpointError
from zoo.io.model_dir import TOKENIZER_DIR, load_model_dir


def load_directory(
    directory: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    card: ModelCard | None = None,
):
    """Load a `MultimodalMoE` and its processor from a zoo checkpoint directory (verified).

    Args:
        directory: a model directory (`zoo.io.model_dir`) with `tokenizer/*` files.
        device: where to put the model.
        dtype: cast the model to this dtype; by default the saved dtype (bit-exact weights).
        card: when given, a card inside the checkpoint must name the same model and version.

    Returns:
        `(model, processor, model_config)`: the model in eval mode, its `MultimodalProcessor`,
        and the `ModelConfig`.
    """
    from zoo.processor import MultimodalProcessor
    from zoo.tokenizer import load_tokenizer

    root = Path(directory)
    # Every weight comes from the checkpoint: configured pretrained files are never read.
    model, cfg, ckpt = load_model_dir(root, device=device, dtype=dtype)
    inner = read_card(root)
    if card is not None and inner is not None:
        if inner.get("name") != card.name or str(inner.get("version")) != str(card.version):
            raise LoadError(
                f"{str(root)!r} holds {inner.get('name')}@{inner.get('version')}, not {card.ref}; "
                f"rebuild it with `{build_command(card)} --force`"
            )
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
    """
    card = get_card(name, version, cards_dir=cards_dir)
    path = locate(card)
    try:
        model, processor, _ = load_directory(path, device=device, dtype=dtype, card=card)
    except CheckpointError as e:
        fix = (f"rebuild it with `{build_command(card)} --force`" if card.recipe and path == install_dir(card)
               else f"remove {str(path)!r} so that it is fetched again" if path == install_dir(card)
               else "fix or replace that directory")
        raise CheckpointError(f"{card.ref}: {e}; {fix}") from e
    return model, processor


__all__ = ["load", "load_directory"]
