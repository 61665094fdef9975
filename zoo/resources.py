"""Data shipped with the package: model cards and configs (models, recipes, DeepSpeed).

In a wheel they are package data inside `zoo/` (`zoo/model_cards/`, `zoo/configs/`); in a source
tree or an editable install they are the repository's top-level `model_cards/` and `configs/`.
Either way they are found from the installed `zoo` package, never from the working directory.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
DATA_DIRS = ("model_cards", "configs")


def data_root() -> Path:
    """The directory that holds `model_cards/` and `configs/` (the package in a wheel, else the repository)."""
    if (_PACKAGE / "model_cards").is_dir():
        return _PACKAGE
    return _PACKAGE.parent


def resource_dir(name: str) -> Path:
    """`model_cards` or `configs`, or a folder inside them (`configs/recipes`).

    Raises:
        FileNotFoundError: the folder is not part of this installation.
    """
    if name.split("/")[0] not in DATA_DIRS:
        raise ValueError(f"unknown resource folder {name!r}; shipped: {list(DATA_DIRS)}")
    path = data_root() / name
    if not path.is_dir():
        raise FileNotFoundError(f"{name}/ is missing from this moe-zoo installation (looked at {path})")
    return path


def config_path(kind: str, name: str, suffix: str) -> Path:
    """A shipped config by name: `config_path("recipes", "tiny-zoo", ".yaml")`.

    Raises:
        FileNotFoundError: no such config; the message lists the shipped ones.
    """
    folder = resource_dir(f"configs/{kind}")
    path = folder / f"{name}{suffix}"
    if path.is_file():
        return path
    shipped = sorted(p.stem for p in folder.glob(f"*{suffix}"))
    from zoo.config import close_matches

    raise FileNotFoundError(f"no shipped {kind} config {name!r}{close_matches(name, shipped)}; shipped: {shipped}")


__all__ = ["DATA_DIRS", "config_path", "data_root", "resource_dir"]
