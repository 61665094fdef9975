"""What a stage is: its config in a recipe, the `Stage` contract, the `STAGES` registry, the context it runs in.

A recipe lists stages; each stage is data (`StageConfig`): what trains (parameter-name patterns;
everything else is frozen and stays bit-identical), its data mix over task families, its loop
settings, and its kind's options. A stage kind is a class registered in `STAGES` with an options
dataclass, default trainable patterns, and hooks; the runner (`pipelines/runner.py`) is one loop
over stages that calls them and never branches on the kind:

    for branch in stage.branches(cfg):          # one output; or one per task family (lora)
        model, model_cfg = stage.before_training(ctx, model, model_cfg, branch)
        train(model, patterns = cfg.trains or stage.trainable(model, branch))
        model, model_cfg, extra, files = stage.after_training(ctx, model, model_cfg, branch)
        save OUT/<branch.path>/model, evaluated on the test split if `stage.evaluates`

A stage starts from the previous stage's output (or the earlier stage its `start_from` names); a
stage that `forks` (one output per family) cannot be started from, so a stage right after it needs
`start_from`, and a forking stage after another forking stage starts from the last non-forking one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

from zoo.config import ConfigError, key_path, rewrap
from zoo.io.names import check_name
from zoo.pipelines.train import TrainConfig
from zoo.registry import Registry

STAGES: Registry = Registry("stage kind")


def check_data_mix(data: Mapping[str, float]) -> None:
    """A stage's data mix: at least one task family, each weight a finite number > 0.

    Raises:
        ConfigError: naming the family and its weight.
    """
    if not isinstance(data, Mapping) or not data:
        raise ConfigError("`data` must name at least one task family with its sampling weight, e.g. {vqa: 1.0}")
    for family, weight in data.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"the weight of task family {family!r} must be a finite number > 0, got {weight!r}", (str(family),))


@dataclass
class StageConfig:
    """One stage of a recipe.

    Attributes:
        name: the stage's name (its output goes to `OUT/<name>/model`).
        kind: a registered stage kind (`STAGES`).
        data: task family -> sampling weight.
        train: loop settings (steps, optimizer, checkpoints).
        batch_size: samples per micro-batch.
        trains: parameter-name patterns (fnmatch) that train; None = the kind's default.
        options: the kind's options (validated against its options dataclass; an unknown key is
            named with the accepted ones).
        sample_types: task family -> sample type id, handed to the routers per token (LoRAMoE's
            localized balancing: e.g. `{text: 0, vqa: 1}` for world-knowledge vs task samples).
        start_from: the earlier stage whose output this one starts from (default: the previous
            one, or for a per-family stage the nearest earlier stage that is not per-family).
        group_by_length: micro-batches drawn together and cut by media and length so padding
            shrinks (`MixedBatches`); 0: no grouping.
    """

    name: str
    kind: str
    data: dict[str, float]
    train: TrainConfig = field(default_factory=TrainConfig)
    batch_size: int = 8
    trains: list[str] | None = None
    options: Any = field(default_factory=dict)
    sample_types: dict[str, int] | None = None
    start_from: str | None = None
    group_by_length: int = 0
    config_label: ClassVar[str] = "stage"  # errors name the stage: `stages[2]: stage 'lora': ...`

    def __post_init__(self) -> None:
        try:
            with key_path("name"):
                check_name(self.name, "stage name")
            with key_path("kind"):
                STAGES.entry(self.kind)
            with key_path("train"):
                if isinstance(self.train, Mapping):
                    self.train = TrainConfig.from_dict(dict(self.train))
            with key_path("options"):
                self.options = STAGES.options(self.kind, self.options)
            with key_path("data"):
                check_data_mix(self.data)
            if self.group_by_length < 0:
                raise ConfigError(f"must be >= 0 (0: no grouping), got {self.group_by_length}", ("group_by_length",))
        except (TypeError, ValueError) as e:
            raise rewrap(e, f"stage {self.name!r}") from None
        if self.sample_types is not None:
            missing = sorted(set(self.data) - set(self.sample_types))
            if missing:
                raise ValueError(f"stage {self.name!r}: sample_types has no type for task families {missing}")

    def stage(self) -> Stage:
        """The stage object of this config's kind, holding its options."""
        return STAGES.build(self.kind, self.options)


@dataclass(frozen=True)
class Branch:
    """One output of a stage: its name, its data mix, and where it is written (relative to OUT).

    Attributes:
        output: the output's name (`<stage>`, or `<stage>-<family>`).
        data: task family -> weight for this output's training.
        path: its directory relative to the run directory (`<stage>` or `<stage>/<family>`).
        title: progress-bar and plot title.
        family: the task family of a per-family output, else None.
    """

    output: str
    data: dict[str, float]
    path: str
    title: str
    family: str | None = None


def single_branch(cfg: StageConfig) -> list[Branch]:
    """The one output of a stage that does not fork."""
    return [Branch(cfg.name, dict(cfg.data), cfg.name, cfg.name)]


class Stage(Protocol):
    """What the runner needs from a stage kind (an instance holds the validated `options`).

    Attributes:
        default_trains: parameter patterns trained when the stage config gives no `trains`.
        forks: writes one output per task family; later stages cannot start from it (may depend
            on the options).
        evaluates: score each output on its families' test splits before saving it.
    """

    options: Any
    default_trains: ClassVar[list[str]]
    forks: bool
    evaluates: ClassVar[bool]

    def branches(self, cfg: StageConfig) -> list[Branch]: ...

    def before_training(self, ctx: StageContext, model, model_cfg, branch: Branch): ...

    def trainable(self, model, branch: Branch) -> list[str]: ...

    def after_training(self, ctx: StageContext, model, model_cfg, branch: Branch): ...


@dataclass
class StageContext:
    """What a stage's hooks may read: the recipe, where it runs, the data and the processor.

    Attributes:
        recipe: the `RecipeConfig`.
        cfg: this stage's `StageConfig`.
        index: its position in the recipe.
        out_dir: the run directory.
        datasets: task family -> training samples (`.test` beside it).
        processor: the `MultimodalProcessor`.
        engine: the `EngineSpec`.
        resume: continue training from the newest checkpoints.
        start_dir: the checkpoint this stage started from (None for the first stage).
    """

    recipe: Any
    cfg: StageConfig
    index: int
    out_dir: Path
    datasets: Any
    processor: Any
    engine: Any
    resume: bool = False
    start_dir: Path | None = None

    @property
    def seed(self) -> int:
        """The stage's data-order seed (`recipe.seed + index`)."""
        return self.recipe.seed + self.index

    @property
    def feature_dir(self) -> Path:
        """The run's frozen-encoder feature cache."""
        return self.out_dir / "features"

    def train(self, model, stage: StageConfig, out: Path, name: str):
        """Train `model` as `stage` says (its `trains`, data, batch size, loop): see `runner.train_model`."""
        from zoo.pipelines.runner import train_model

        return train_model(self, model, stage, out, name)


def sample_batches(ctx: StageContext, families, per_family: int, batch_size: int | None = None) -> list[dict]:
    """Model inputs for the first `per_family` training samples of each of `families`, collated in
    batches of `batch_size` (None: one batch); what stages score or calibrate on before training."""
    from zoo.pipelines.collate import collate

    samples = [s for f in sorted(families) for s in list(ctx.datasets[f][:per_family])]
    size = batch_size or max(len(samples), 1)
    return [collate(samples[i : i + size], ctx.processor) for i in range(0, len(samples), size)]


def keep(self, ctx: StageContext, model, model_cfg, branch: Branch):
    """A `before_training` hook that changes nothing."""
    return model, model_cfg


def nothing_after(self, ctx: StageContext, model, model_cfg, branch: Branch):
    """An `after_training` hook that adds nothing to the output."""
    return model, model_cfg, {}, {}


def default_trainable(self, model, branch: Branch) -> list[str]:
    """A `trainable` hook: the kind's `default_trains`."""
    return list(self.default_trains)


@dataclass
class NoOptions:
    """Options of a stage kind that has none."""


def train_only_stage(default_trains: list[str], doc: str) -> type:
    """A stage kind with no options and no hooks: it trains `default_trains` on its data mix."""

    class TrainOnly:
        __doc__ = doc
        forks = False
        evaluates = False

        def __init__(self) -> None:
            self.options = NoOptions()

        def branches(self, cfg):
            return single_branch(cfg)

        before_training = keep
        trainable = default_trainable
        after_training = nothing_after

    TrainOnly.default_trains = list(default_trains)
    return TrainOnly


__all__ = ["check_data_mix", "NoOptions", "default_trainable", "keep", "nothing_after", "train_only_stage", "Branch", "STAGES", "Stage", "StageConfig", "StageContext", "single_branch"]
