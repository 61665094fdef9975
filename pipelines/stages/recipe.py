"""A recipe: the stages in order, the model they start from, the data they read, the evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo.config import ConfigError, ConfigTypeError, check_value, close_matches, config_from_dict, in_file, key_path, load_yaml, sub_config
from zoo.io.names import check_name
from zoo.models.config import ModelConfig
from zoo.pipelines.stages.base import StageConfig


@dataclass
class EvalSpec:
    """Held-out evaluation written into each evaluated output (and so into its model card).

    Attributes:
        limit: test samples per family (None: all).
        max_new_tokens: greedy generation length.
        metrics: task family -> metric name (`zoo.pipelines.eval.SCORERS`) instead of the family's
            default (e.g. `{asr: wer}`).
        bootstrap: resamples of the test items for each figure's 95% percentile bootstrap interval
            (0: none).
        perplexity: held-out English lines (the corpus' validation split) on which each evaluated
            output's perplexity is measured, next to the pretrained LM's own when the model starts
            from one: what the multimodal training cost the LM (0: not measured).
    """

    limit: int | None = 200
    max_new_tokens: int = 12
    metrics: dict[str, str] = field(default_factory=dict)
    bootstrap: int = 0
    perplexity: int = 0

    def __post_init__(self) -> None:
        from zoo.pipelines.eval import METRIC_OF_FAMILY, SCORERS

        for family, metric in self.metrics.items():
            if family not in METRIC_OF_FAMILY:
                raise ValueError(f"eval.metrics: unknown task family {family!r}; known: {sorted(METRIC_OF_FAMILY)}")
            if metric not in SCORERS:
                raise ValueError(f"eval.metrics.{family}: unknown metric {metric!r}; known: {sorted(SCORERS)}")
        if self.bootstrap < 0 or self.perplexity < 0:
            raise ValueError(f"eval: bootstrap and perplexity must be >= 0, got {self.bootstrap} and {self.perplexity}")


DATA_KEYS = {"max_per_split": int | None, "options": dict[str, dict[str, Any]]}


def check_data_block(data: Any) -> None:
    """A recipe's `data:` block: only `max_per_split` (an integer >= 1, or null) and `options`
    (task family -> builder keywords); a misspelled key is named with its close matches.

    Raises:
        ConfigError: at the key path below `data`.
    """
    check_value(data, dict[str, Any])
    for key, value in data.items():
        if key not in DATA_KEYS:
            raise ConfigError(f"unknown data key {key!r}{close_matches(key, DATA_KEYS)}; known keys are {sorted(DATA_KEYS)}",
                              (str(key),))
        check_value(value, DATA_KEYS[key], (key,))
    n = data.get("max_per_split")
    if n is not None and n < 1:
        raise ConfigError(f"must be an integer >= 1 (or null for all samples), got {n}", ("max_per_split",))


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
        with key_path("name"):
            check_name(self.name, "recipe name")
        if isinstance(self.eval, dict):
            self.eval = sub_config(EvalSpec, self.eval, "eval")
        with key_path("data"):
            check_data_block(self.data)
        if isinstance(self.model, (str, Path)):
            self.model = ModelConfig.load(str(self.model))
        elif isinstance(self.model, dict):
            self.model = sub_config(ModelConfig, self.model, "model")
        elif not isinstance(self.model, ModelConfig):
            raise ConfigTypeError(f"expected a model config (a mapping) or the path of a model YAML file, got "
                                  f"{type(self.model).__name__}", ("model",))
        if not isinstance(self.stages, list) or not self.stages:
            raise ConfigError(f"recipe {self.name!r}: `stages` must be a non-empty list", ("stages",))
        self.stages = [sub_config(StageConfig, s, f"stages[{i}]") for i, s in enumerate(self.stages)]
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
            raise FileNotFoundError(f"recipe {str(path)!r} does not exist (give a recipe YAML file or a shipped recipe name)")
        data = load_yaml(p)
        if not isinstance(data, dict):
            raise ConfigError(f"a recipe must be a YAML mapping (name, model, stages, ...), got {type(data).__name__}", file=p)
        if isinstance(data.get("model"), str) and not Path(data["model"]).is_absolute():
            data["model"] = str((p.parent / data["model"]).resolve())
        with in_file(p):
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


__all__ = ["DATA_KEYS", "EvalSpec", "RecipeConfig", "check_data_block"]
