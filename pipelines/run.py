"""Run a recipe, or some of its stages: `python -m zoo.pipelines.run --recipe R [--stage S ...]`."""

from __future__ import annotations

import argparse
import sys

import torch

from zoo.checkpoint import CheckpointError
from zoo.cli import report_errors
from zoo.pipelines.data.shards import CorruptShardError
from zoo.pipelines.engine import NonFiniteError
from zoo.pipelines.runner import EngineSpec, run_recipe
from zoo.pipelines.stages import RecipeConfig


# Bad input (a wrong recipe key, a missing file, a corrupt shard, a NaN loss) is reported in one
# line that names the cause; ZOO_DEBUG=1 shows the traceback.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, CheckpointError, CorruptShardError, NonFiniteError)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--recipe", required=True, help="configs/recipes/*.yaml")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--stage", action="append", help="run only this stage (repeatable); its previous stage must have run")
    p.add_argument("--data-dir", help="built data to read (default: OUT/data, built if absent)")
    p.add_argument("--resume", action="store_true", help="continue stages from their newest checkpoints")
    p.add_argument("--engine", choices=["torch", "deepspeed"], default="torch")
    p.add_argument("--ds-config", default="zero2", help="configs/deepspeed/<name>.json or a path (deepspeed engine)")
    p.add_argument("--ep-size", type=int, default=1, help="expert-parallel group size (deepspeed engine)")
    a = p.parse_args(argv)
    engine = EngineSpec(a.engine, a.ds_config, a.ep_size)
    outputs = run_recipe(RecipeConfig.load(a.recipe), a.out, only=a.stage, resume=a.resume, data_dir=a.data_dir,
                         engine=engine)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        for name, path in outputs.items():
            print(f"{name}: {path}")


if __name__ == "__main__":
    sys.exit(report_errors("zoo.pipelines.run", main, USER_ERRORS))
