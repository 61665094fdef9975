"""Run a recipe, or some of its stages: `python -m zoo.pipelines.run --recipe R [--stage S ...]`."""

from __future__ import annotations

import argparse

from zoo.pipelines.stages import RecipeConfig, run_recipe


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--recipe", required=True, help="configs/recipes/*.yaml")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--stage", action="append", help="run only this stage (repeatable); its previous stage must have run")
    p.add_argument("--data-dir", help="built data to read (default: OUT/data, built if absent)")
    p.add_argument("--resume", action="store_true", help="continue stages from their newest checkpoints")
    a = p.parse_args(argv)
    outputs = run_recipe(RecipeConfig.load(a.recipe), a.out, only=a.stage, resume=a.resume, data_dir=a.data_dir)
    for name, path in outputs.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
