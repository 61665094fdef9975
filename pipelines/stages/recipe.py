"""A recipe: the stages in order, the model they start from, the data they read, the evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zoo.config import config_from_dict, sub_config
from zoo.models.config import ModelConfig
from zoo.pipelines.stages.base import StageConfig


@dataclass
class EvalSpec:
    """Held-out evaluation written into each evaluated output (and so into its model card).

    Attributes:
        limit: test samples per family (None: all).
        max_new_tokens: greedy generation length.
    """

    limit: int | None = 200
    max_new_tokens: int = 12


@dataclass
class RecipeConfig:
    """Stages in order, the model they start from and the data they read.

    Attributes:
        name: recipe name.
        model: the model config (a dict, or a path to a YAML file; relative paths are relative to
            the recipe file).
        stages: the stages, in order.
        data: data builder settings: `max_per_split`, and `options` (family -> builder keywords).
            Data already built in the run directory is reused as it is.
        tokenizer_vocab: BPE vocabulary size (must equal the LM's `vocab_size`).
        seed: base seed of data order.
        eval: evaluate the outputs of evaluating stages (moe-tune, lora) on the test splits
            (None: no eval).
    """

    name: str
    model: Any
    stages: list[StageConfig]
    data: dict[str, Any] = field(default_factory=dict)
    tokenizer_vocab: int = 1024
    seed: int = 0
    eval: EvalSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.eval, dict):
            self.eval = config_from_dict(EvalSpec, self.eval)
        if isinstance(self.model, (str, Path)):
            self.model = ModelConfig.load(str(self.model))
        elif isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        if not isinstance(self.stages, list) or not self.stages:
            raise ValueError(f"recipe {self.name!r}: `stages` must be a non-empty list")
        self.stages = [sub_config(StageConfig, s, f"recipe {self.name!r}: stages[{i}]"
                                  + (f" ({s.get('name')!r})" if isinstance(s, dict) and s.get("name") else ""))
                       for i, s in enumerate(self.stages)]
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"recipe {self.name!r}: duplicate stage names in {names}")
        forks = [s.stage().forks for s in self.stages]
        for i, s in enumerate(self.stages):
            if s.start_from is not None:
                earlier = {p.name: f for p, f in zip(self.stages[:i], forks[:i])}
                if s.start_from not in earlier:
                    raise ValueError(f"recipe {self.name!r}: stage {s.name!r} starts from {s.start_from!r}, which is not an "
                                     f"earlier stage (earlier: {list(earlier)})")
                if earlier[s.start_from]:
                    raise ValueError(f"recipe {self.name!r}: stage {s.name!r} cannot start from the per-family outputs "
                                     f"of stage {s.start_from!r}")
            elif i and not forks[i] and forks[i - 1]:
                prev = self.stages[i - 1]
                raise ValueError(
                    f"recipe {self.name!r}: stage {s.name!r} cannot start from the per-family outputs of "
                    f"{prev.kind} stage {prev.name!r}; put it before {prev.name!r} or give it `start_from:`"
                )

    @classmethod
    def load(cls, path: str | Path) -> RecipeConfig:
        """Read a recipe YAML file, or a shipped recipe by name (`configs/recipes/<name>.yaml`)."""
        from zoo.resources import config_path

        p = Path(path)
        if not p.is_file() and p.suffix == "" and len(p.parts) == 1:
            p = config_path("recipes", str(path), ".yaml")
        if not p.is_file():
            raise FileNotFoundError(f"recipe {str(path)!r} does not exist")
        data = yaml.safe_load(p.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"recipe {str(p)!r} must be a YAML mapping")
        if isinstance(data.get("model"), str) and not Path(data["model"]).is_absolute():
            data["model"] = str((p.parent / data["model"]).resolve())
        return config_from_dict(cls, data)

    def outputs(self) -> list[str]:
        """Names of the checkpoints the recipe writes (each stage's branches)."""
        return [b.output for s in self.stages for b in s.stage().branches(s)]

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise ValueError(f"recipe {self.name!r} has no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def start_of(self, index: int) -> StageConfig | None:
        """The stage whose output stage `index` starts from (None: the model config).

        Its `start_from` if set; else the previous stage, or for a forking stage the nearest
        earlier stage that does not fork.
        """
        stage = self.stages[index]
        if stage.start_from is not None:
            return self.stage(stage.start_from)
        forks = stage.stage().forks
        for prev in reversed(self.stages[:index]):
            if not (forks and prev.stage().forks):
                return prev
        return None


__all__ = ["EvalSpec", "RecipeConfig"]
