"""Registry-driven: every card in `model_cards/` is valid, its config builds, its recipe writes its output."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch

from zoo.models import ModelConfig, build_model
from zoo.catalog.cards import Catalog, Version, parse_card
from zoo.pipelines.cli import make_full_parser

ROOT = Path(__file__).resolve().parents[1]
CARD_PATHS = sorted(p for p in (ROOT / "model_cards").glob("*.md") if p.name.lower() != "readme.md")


def test_the_zoo_has_cards_and_they_index_without_duplicates():
    assert CARD_PATHS, "model_cards/ holds no cards"
    catalog = Catalog.from_dir(ROOT / "model_cards")
    assert len(catalog.names()) == len({parse_card(p).name for p in CARD_PATHS})


@pytest.mark.parametrize("path", CARD_PATHS, ids=[p.stem for p in CARD_PATHS])
def test_card(path):
    card = parse_card(path)
    assert path.stem == card.name, f"{path.name}: the file is named after the model ({card.name}.md)"
    assert str(Version.parse(str(card.version))) == str(card.version)
    assert card.body.strip().startswith(f"# {card.name}"), "the prose starts with the model's name as its title"
    for m in card.metrics:
        assert m.command.strip()
        for part in m.command.split("&&"):  # every command a card cites is a real `zoo` subcommand
            argv = shlex.split(part)
            assert argv[0] == "zoo", f"metric {m.name}: {part!r} is not a zoo command"
            make_full_parser().parse_args(argv[1:])
    if isinstance(card.config, str):
        config_path = card.resolve_path(card.config)
        assert config_path.is_file(), f"config {card.config} does not exist"
        cfg = ModelConfig.load(str(config_path))
    else:
        cfg = ModelConfig.from_dict(card.config)
    config_as_written = cfg.to_dict()
    with torch.device("meta"):  # shapes only: no memory, no pretrained weights read
        cfg.lm.weights = None
        for enc in cfg.encoders.values():
            enc.weights = None
        model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert card.uri is not None or card.recipe is not None
    if card.recipe is not None:
        from zoo.pipelines.stages import RecipeConfig

        recipe_path = card.resolve_path(card.recipe)
        assert recipe_path.is_file(), f"recipe {card.recipe} does not exist"
        recipe = RecipeConfig.load(recipe_path)
        assert card.output in recipe.outputs(), f"{card.recipe} writes {recipe.outputs()}, not {card.output!r}"
        if card.output.startswith("lora-"):
            assert card.task_family == card.output.removeprefix("lora-"), "a LoRA card's task family is its LoRA's"
        assert recipe.model.to_dict() == config_as_written, "the card's config is the one its recipe starts from"
