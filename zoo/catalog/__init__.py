"""The catalogue: model cards (name@version -> config, uri, sha256, task family), installs, `zoo.load`."""

from zoo.catalog.cards import (
    Catalog,
    CatalogError,
    Metric,
    ModelCard,
    Version,
    VersionSpec,
    default_cards_dir,
    get_card,
    list_models,
    parse_card,
)
from zoo.catalog.install import LoadError, NotBuiltError, install, install_dir, is_installed, locate, read_card
from zoo.catalog.load import load, load_directory

__all__ = [
    "Catalog",
    "CatalogError",
    "LoadError",
    "Metric",
    "ModelCard",
    "NotBuiltError",
    "Version",
    "VersionSpec",
    "default_cards_dir",
    "get_card",
    "install",
    "install_dir",
    "is_installed",
    "list_models",
    "load",
    "load_directory",
    "locate",
    "parse_card",
    "read_card",
]
