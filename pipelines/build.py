"""`zoo build`: run a card's recipe and install its outputs (the training side of the catalogue)."""

from __future__ import annotations

import os
from pathlib import Path

from zoo.catalog.cards import Catalog
from zoo.catalog.install import LoadError, install, install_dir, is_installed
from zoo.io.hub import zoo_home
from zoo.pipelines.runner import run_recipe
from zoo.pipelines.stages import RecipeConfig


def build(
    name: str,
    version: str | None = None,
    *,
    force: bool = False,
    resume: bool = False,
    cards_dir: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None,
    wait: bool = False,
) -> dict[str, Path]:
    """Run a card's recipe into the cache and install its output (and its siblings').

    Every card naming the same recipe file has its output installed from the same run, so one
    `zoo build` of the tiny zoo installs all of it.

    Args:
        name: model name (or `name@version-request`).
        version: version request.
        force: re-run the recipe and replace installed copies even if already built.
        resume: continue the recipe's stages from their newest training checkpoints.
        cards_dir: the cards directory.
        run_dir: the recipe's run directory (default `$ZOO_HOME/runs/<recipe file stem>`).
        wait: wait for another process training into the run directory instead of refusing.

    Returns:
        `name@version` -> installed directory, for every card installed (just the requested
        one when it was already built and `force` is off).
    """
    catalog = Catalog.from_dir(cards_dir)
    card = catalog.get(name, version)
    if card.recipe is None:
        raise LoadError(f"{card.ref} has no recipe to build it; it is fetched from {card.uri} by zoo.load / `zoo load`")
    if is_installed(card) and not force:
        return {card.ref: install_dir(card)}
    recipe_path = card.resolve_path(card.recipe)
    if not recipe_path.is_file():
        raise LoadError(f"{card.ref}: its recipe {card.recipe!r} does not exist (looked at {str(recipe_path)!r})")

    recipe = RecipeConfig.load(recipe_path)
    names = recipe.outputs()
    if card.output not in names:
        raise LoadError(f"{card.ref}: output {card.output!r} is not one the recipe {card.recipe} writes: {names}")
    run_dir = Path(run_dir) if run_dir is not None else zoo_home() / "runs" / recipe_path.stem
    outputs = run_recipe(recipe, run_dir, resume=resume, wait=wait)
    siblings = [c for n in catalog.names() for c in catalog.list(n, all_versions=True)
                if c.recipe is not None and c.resolve_path(c.recipe).resolve() == recipe_path.resolve()]
    installed = {}
    for sib in siblings:
        if sib.output in outputs:  # the run just retrained it: replace any older install
            installed[sib.ref] = install(sib, outputs[sib.output], overwrite=True)
    if card.ref not in installed:
        raise LoadError(f"{card.ref}: the recipe run returned {sorted(outputs)}, without {card.output!r}")
    return installed


__all__ = ["build"]
