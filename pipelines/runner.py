"""Run recipes: a loop over stages that calls each stage kind's hooks (`pipelines/stages/`).

For each stage: start from the previous stage's output (or build the model config for the first),
then per branch (one output, or one per task family): the kind's `before_training`, training on
an engine (one-process PyTorch, or DeepSpeed under `pipelines/launch/*.sh`), `after_training`,
the expert-load plot, held-out evaluation if the kind evaluates, and the output checkpoint at
`OUT/<branch path>/model`. There is no branch on the stage kind here.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
from pathlib import Path

import torch

from zoo.io.locks import hold_lock, remove_stale_temporaries
from zoo.io.model_dir import load_model_dir, save_model_dir
from zoo.models.builders import build_model
from zoo.models.pretrained import resolve_pretrained
from zoo.pipelines.disk import check_disk
from zoo.pipelines.collate import MixedBatches, frozen_encoder_caches
from zoo.pipelines.datasets import prepare
from zoo.pipelines.engines import EngineSpec, make_engine
from zoo.pipelines.eval import evaluate_outputs
from zoo.pipelines.routing_plot import plot_stage_routing
from zoo.pipelines.stages import RecipeConfig, StageConfig, StageContext
from zoo.pipelines.train import train


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def set_trainable(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Train exactly the parameters whose names match one of `patterns`; return their names."""
    names = []
    for name, p in model.named_parameters():
        p.requires_grad = any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        if p.requires_grad:
            names.append(name)
    if not names:
        raise ValueError(f"no parameter matches the trainable patterns {patterns}")
    return names


def train_model(ctx: StageContext, model, stage: StageConfig, out: Path, name: str):
    """Train `model` on `stage`'s data mix, patterns and loop (the stage context's engine and resume).

    Returns:
        `(TrainResult, names of the trained parameters)`.
    """
    trainable = set_trainable(model, stage.trains)
    caches = frozen_encoder_caches(model, ctx.processor, ctx.feature_dir)
    mixed = MixedBatches(ctx.datasets, stage.data, ctx.processor, stage.batch_size, ctx.seed, feature_caches=caches,
                         sample_types=stage.sample_types, group_by_length=stage.group_by_length)
    engine = make_engine(ctx.engine, model, stage.train.optim, stage.train.steps)
    result = train(engine, engine.rank_batches(mixed), stage.train, out, resume=ctx.resume, name=name)
    engine.consolidate()  # every rank holds the whole trained model in `model` again; rank 0 saves it
    return result, trainable


def _start(recipe: RecipeConfig, index: int, out_dir: Path):
    """(model, model config, start checkpoint or None) for stage `index`."""
    start = recipe.start_of(index)
    if start is None:
        cfg, _ = resolve_pretrained(copy.deepcopy(recipe.model))  # a pretrained LM's placeholders and vocabulary
        torch.manual_seed(recipe.seed)
        return build_model(cfg), cfg, None
    path = out_dir / start.name / "model"
    stage = recipe.stages[index]
    if not path.is_dir():
        raise FileNotFoundError(
            f"stage {stage.name!r} starts from stage {start.name!r}'s output {path}, which does not exist: "
            f"run stage {start.name!r} first"
        )
    model, cfg, _ = load_model_dir(path)
    return model, cfg, path


def run_stage(
    recipe: RecipeConfig,
    stage_cfg: StageConfig,
    out_dir: Path,
    datasets,
    processor,
    *,
    resume: bool = False,
    engine: EngineSpec | None = None,
) -> dict[str, Path]:
    """Run one stage from the output it starts from (or the model config for the first).

    Returns:
        output name -> checkpoint path, one per branch (`{stage.name: path}`, or `<stage>-<family>`
        per task family for a forking stage).
    """
    out_dir = Path(out_dir)
    index = recipe.stages.index(stage_cfg)
    model, cfg, start_dir = _start(recipe, index, out_dir)
    stage = stage_cfg.stage()
    ctx = StageContext(recipe, stage_cfg, index, out_dir, datasets, processor, engine or EngineSpec(), resume, start_dir)
    branches = stage.branches(stage_cfg)
    outputs = {}
    for branch in branches:
        m, c = (model, cfg) if len(branches) == 1 else (copy.deepcopy(model), copy.deepcopy(cfg))
        m, c = stage.before_training(ctx, m, c, branch)
        patterns = stage_cfg.trains or stage.trainable(m, branch)
        run_cfg = dataclasses.replace(stage_cfg, data=branch.data, trains=patterns)
        result, trained = ctx.train(m, run_cfg, out_dir / branch.path / "train", branch.title)
        m, c, extra, files = stage.after_training(ctx, m, c, branch)
        path = out_dir / branch.path / "model"
        if _is_main():
            plot_stage_routing(m, processor, {f: datasets[f] for f in branch.data}, out_dir / branch.path / "expert_load.png",
                               branch.title)
            metrics = evaluate_outputs(recipe, m, processor, datasets, branch.data, f"{branch.path}/model") if stage.evaluates else {}
            save_model_dir(m, c, path, out_dir / "tokenizer", extra_files=files, extra={
                "stage": stage_cfg.name, **extra, "trained": trained, "final_loss": result.final_loss, "metrics": metrics})
        _barrier()
        outputs[branch.output] = path
    return outputs


def run_recipe(
    recipe: RecipeConfig,
    out_dir: str | Path,
    *,
    only: list[str] | None = None,
    resume: bool = False,
    data_dir: str | Path | None = None,
    engine: EngineSpec | None = None,
    wait: bool = False,
) -> dict[str, Path]:
    """Run the recipe's stages in order (or only the named ones), each from the one before.

    The process holds `out_dir`'s lock (`zoo.io.locks`) while it runs: a second process training
    into the same directory is refused with the holder's pid (or waits, with `wait=True`), so no
    run replaces another's outputs underneath it. Temporaries a killed run left are removed first.

    Args:
        recipe: the recipe.
        out_dir: run directory: `data/`, `tokenizer/`, `features/`, and `<stage>/` per stage.
        only: stage names to run (each needs the output it starts from on disk).
        resume: continue each stage from its newest training checkpoint.
        data_dir: read (or build) the data here instead of `out_dir/data`.
        engine: the engine (default: one-process PyTorch).
        wait: if another process holds the run directory, wait for it instead of refusing.

    Returns:
        output name -> checkpoint directory, for every stage run.

    Raises:
        zoo.io.locks.DirectoryBusy: another live process is training into `out_dir`.
    """
    engine = engine or EngineSpec()
    out_dir = Path(out_dir)
    for name in only or []:
        recipe.stage(name)  # names an unknown stage
    engine.init_distributed()
    if not _is_main():  # rank 0 holds the lock for the whole job
        return _run_locked(recipe, out_dir, only, resume, data_dir, engine)
    with hold_lock(out_dir, f"run directory {str(out_dir)!r}", wait=wait,
                   hint="wait for it to end (or pass --wait), or train into another --out"):
        remove_stale_temporaries(out_dir)
        return _run_locked(recipe, out_dir, only, resume, data_dir, engine)


def _run_locked(recipe: RecipeConfig, out_dir: Path, only, resume: bool, data_dir, engine: EngineSpec) -> dict[str, Path]:
    if not _is_main():
        _barrier()  # rank 0 builds the data and the tokenizer first
    datasets, processor = prepare(recipe, out_dir, data_dir)
    if _is_main():
        _barrier()
    check_data(recipe, datasets, only)
    if _is_main():
        check_disk(recipe, out_dir, only)  # before hours of training, not at the first write that fails
    outputs = {}
    for stage in recipe.stages:
        if only and stage.name not in only:
            continue
        outputs.update(run_stage(recipe, stage, out_dir, datasets, processor, resume=resume, engine=engine))
    return outputs


def check_data(recipe: RecipeConfig, datasets, only: list[str] | None = None) -> None:
    """Before any training: every stage to run draws only from task families with training samples.

    Raises:
        ValueError: naming the stage, the family and what the data directory holds.
    """
    for stage in recipe.stages:
        if only and stage.name not in only:
            continue
        for family in stage.data:
            if not datasets.get(family):
                have = sorted(f for f, d in datasets.items() if d)
                raise ValueError(f"stage {stage.name!r}: task family {family!r} has no training samples in the data "
                                 f"(families with samples: {have})")


def load_model(path: Path):
    """A stage output's `(model, ModelConfig)` (verified, strict): `zoo.io.load_model_dir` without the checkpoint."""
    model, cfg, _ = load_model_dir(path)
    return model, cfg


__all__ = ["check_data", "load_model", "run_recipe", "run_stage", "set_trainable", "train_model"]
