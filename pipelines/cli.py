"""The installed `zoo` command: the library's `list | load | export | publish` plus `build | train | eval | experiment`.

    zoo build NAME[@VERSION] [--force] [--resume]
    zoo train RECIPE [--out DIR] [--stage S ...] [--resume] [--data-dir D] [--engine torch|deepspeed|fsdp] ...
    zoo eval CHECKPOINT|NAME --family F [--family G] [--data DIR] [--split test] [--limit N]
    zoo experiment EXPERIMENT [EXPERIMENT ...] [--out ROOT] [--store DIR] [--variant V ...] [--seeds 0,1,2] [--dry-run]
    zoo report RESULTS [RESULTS ...] [--readme README.md] [--results bench/RESULTS.md] [--cards model_cards]
    zoo harness lm-eval|lmms-eval HARNESS-ARGS... | zoo harness tasks --data DIR --family F --out DIR

RECIPE is a recipe file or the name of a shipped one (`tiny-zoo`, `micro`). CHECKPOINT is a model
directory (a recipe output, an installed checkpoint) or a card name. Bad input ends with one line
`zoo: error: <cause>` and status 1; `ZOO_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from zoo.cli import ERRORS as LIBRARY_ERRORS
from zoo.cli import local_dir, make_parser, run_cli
from zoo.pipelines.data.shards import CorruptShardError
from zoo.io.locks import DirectoryBusy
from zoo.pipelines.engines import NonFiniteError

# What bad input raises on the training side too: a corrupt shard, a NaN loss, a missing key.
ERRORS = (*LIBRARY_ERRORS, CorruptShardError, NonFiniteError, DirectoryBusy, KeyError)


def cmd_build(args: argparse.Namespace) -> int:
    from zoo.catalog.cards import Catalog
    from zoo.catalog.install import install_dir, is_installed
    from zoo.pipelines.build import build

    card = Catalog.from_dir(args.cards_dir).get(args.name, args.version)
    if is_installed(card) and not args.force:
        print(f"{card.ref} is already built at {install_dir(card)} (pass --force to rebuild)")
        return 0
    installed = build(card.name, str(card.version), force=args.force, resume=args.resume, cards_dir=args.cards_dir,
                      wait=args.wait)
    for ref, path in installed.items():
        print(f"installed {ref} at {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from zoo.io.hub import zoo_home
    from zoo.pipelines.engines import EngineSpec
    from zoo.pipelines.runner import run_recipe
    from zoo.pipelines.stages import RecipeConfig

    if args.ep_size < 1:
        raise ValueError(f"--ep-size must be >= 1, got {args.ep_size}")
    recipe = RecipeConfig.load(args.recipe)
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise FileNotFoundError(f"--data-dir {args.data_dir!r} is not a directory (leave it out to build the data into OUT/data)")
    out = Path(args.out) if args.out else zoo_home() / "runs" / recipe.name
    outputs = run_recipe(recipe, out, only=args.stage, resume=args.resume, data_dir=args.data_dir,
                         engine=EngineSpec(args.engine, args.ds_config, args.ep_size), wait=args.wait)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        for name, path in outputs.items():
            print(f"{name}: {path}")
    return 0


def _checkpoint_dir(target: str, cards_dir) -> tuple[Path, Path | None]:
    """(model directory, default data directory) for a directory or a card name."""
    path = local_dir(target, None, cards_dir)
    if path is not None:
        return path, None
    from zoo.catalog.cards import Catalog
    from zoo.catalog.install import locate
    from zoo.io.hub import zoo_home

    card = Catalog.from_dir(cards_dir).get(target)
    data = zoo_home() / "runs" / Path(card.recipe).stem / "data" if card.recipe else None
    return locate(card), data if data is not None and data.is_dir() else None


def cmd_eval(args: argparse.Namespace) -> int:
    from zoo.pipelines.eval import evaluate_checkpoint

    if not args.family and not args.perplexity:
        raise ValueError("zoo eval needs --family (repeatable) or --perplexity N")
    for flag, value, low in (("--limit", args.limit, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--bootstrap", args.bootstrap, 0), ("--perplexity", args.perplexity, 0)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.data is not None and not Path(args.data).is_dir():
        raise FileNotFoundError(f"--data {args.data!r} is not a directory of built data")
    checkpoint, data = _checkpoint_dir(args.checkpoint, args.cards_dir)
    for r in evaluate_checkpoint(checkpoint, args.family or [], data_dir=args.data or data, split=args.split,
                                 limit=args.limit, max_new_tokens=args.max_new_tokens, quiet=args.quiet or None,
                                 metric=args.metric, bootstrap=args.bootstrap, perplexity_lines=args.perplexity):
        print(json.dumps(r))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from zoo.io.hub import zoo_home
    from zoo.pipelines.experiment import ExperimentConfig, plan, plan_budget, run_experiments

    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    exps = [ExperimentConfig.load(e) for e in args.experiment]
    seeds = None
    if args.seeds is not None:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if args.variant and len(exps) > 1:
        raise ValueError("--variant names variants of one experiment; give one experiment with it")
    root = Path(args.out) if args.out else zoo_home() / "experiments"
    store = Path(args.store) if args.store else root / "store"
    plans = {e.name: plan(e, variants=args.variant, seeds=seeds) for e in exps}  # every config's errors first
    if args.dry_run:
        limits = {e.name: e.eval.limit for e in exps}
        for e in exps:
            b = plan_budget({e.name: plans[e.name]}, store, limits)
            print(f"{e.name}: {len(plans[e.name])} runs, {b['stages']} stages ({b['stages_done']} done), "
                  f"{b['steps']} steps to train, {b['measurements']} measurements (<= {b['answers']} answers)")
        if len(exps) > 1:
            b = plan_budget(plans, store, limits)
            print(f"all, sharing {store}: {b['stages']} stages ({b['stages_done']} done), {b['steps']} steps to train, "
                  f"{b['measurements']} measurements (<= {b['answers']} answers)")
        return 0
    failed = 0
    for e, report in zip(exps, run_experiments(exps, root, store=store, jobs=args.jobs, variants=args.variant, seeds=seeds,
                                                 quiet=True if args.quiet else None)):
        print(f"{root / e.name / 'results.md'} ({report['executed_stages']} stages run, {report['reused_stages']} reused)")
        for f in report["failures"]:
            print(f"zoo: error: {e.name}: run {f['variant']} seed {f['seed']} failed: {f['error']}", file=sys.stderr)
        failed += bool(report["failures"])
    return 1 if failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from zoo.pipelines.experiment_publish import cards_markdown, claims_markdown, load_reports, publish_cards, replace_section, studies_markdown

    reports = load_reports(args.results)
    flags = "".join(f" --{k} {v}" for k, v in (("readme", args.readme), ("results", args.results_md), ("cards", args.cards)) if v)
    command = f"zoo report {' '.join(args.results)}{flags}"
    claims = claims_markdown(reports, command)
    if not (args.readme or args.results_md or args.cards):
        print(claims, end="")
    if args.readme:
        print(f"{args.readme}: claims section {'rewritten' if replace_section(args.readme, 'claims', claims) else 'unchanged'}")
    if args.results_md:
        changed = replace_section(args.results_md, "studies", studies_markdown(reports, command))
        print(f"{args.results_md}: studies section {'rewritten' if changed else 'unchanged'}")
    if args.cards:
        for path in publish_cards(reports, args.cards):
            print(f"{path}: figures over seeds written")
        if args.readme:
            changed = replace_section(args.readme, "cards", cards_markdown(args.cards, command))
            print(f"{args.readme}: cards section {'rewritten' if changed else 'unchanged'}")
    return 0


def add_training_commands(sub) -> None:
    """Add `build`, `train`, `eval` and `experiment` to the `zoo` subparsers."""
    s = sub.add_parser("build", help="run a card's recipe and install its checkpoint under $ZOO_HOME/models")
    s.add_argument("name", help="NAME or NAME@VERSION")
    s.add_argument("--version", help="exact version or range")
    s.add_argument("--force", action="store_true", help="rebuild even if installed")
    s.add_argument("--resume", action="store_true", help="continue the recipe's stages from their last checkpoints")
    s.add_argument("--wait", action="store_true", help="if another process is training into the run directory, wait for it")
    s.add_argument("--quiet", action="store_true", help="no progress bars (also ZOO_QUIET=1)")
    s.set_defaults(func=cmd_build)

    s = sub.add_parser("train", help="run a recipe's stages (all, or --stage ones) into a run directory")
    s.add_argument("recipe", help="a recipe YAML file or a shipped recipe name (tiny-zoo, micro)")
    s.add_argument("--out", help="run directory (default: $ZOO_HOME/runs/<recipe name>)")
    s.add_argument("--stage", action="append", help="run only this stage (repeatable); what it starts from must exist")
    s.add_argument("--data-dir", help="built data to read (default: OUT/data, built if absent)")
    s.add_argument("--resume", action="store_true", help="continue stages from their newest checkpoints")
    s.add_argument("--engine", choices=["torch", "deepspeed", "fsdp"], default="torch",
                   help="torch: one process; deepspeed (ZeRO 0-2) or fsdp (FSDP2): under torchrun or pipelines/launch/*.sh")
    s.add_argument("--ds-config", default="zero2", help="configs/deepspeed/<name>.json or a path (deepspeed engine)")
    s.add_argument("--ep-size", type=int, default=1, help="expert-parallel group size (deepspeed and fsdp engines)")
    s.add_argument("--wait", action="store_true",
                   help="if another process is training into --out, wait for it to end (default: refuse, naming its pid)")
    s.add_argument("--quiet", action="store_true", help="no progress bars (also ZOO_QUIET=1)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="score a checkpoint on task families' held-out splits (greedy generation)")
    s.add_argument("checkpoint", help="a model directory (recipe output, installed checkpoint) or a card name")
    s.add_argument("--family", action="append", help="task family (repeatable)")
    s.add_argument("--data", help="built data directory (default: the data of the checkpoint's run)")
    s.add_argument("--split", default="test")
    s.add_argument("--limit", type=int, default=None, help="score at most this many (scored-kind) samples")
    s.add_argument("--max-new-tokens", type=int, default=12)
    s.add_argument("--metric", default=None, help="score with this metric instead of each family's own (e.g. wer)")
    s.add_argument("--bootstrap", type=int, default=0, help="resamples for a 95%% bootstrap interval over test items")
    s.add_argument("--perplexity", type=int, default=0,
                   help="also measure held-out English perplexity on N corpus validation lines (and the pretrained LM's)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("experiment", help="run recipes' variants x seeds and report means with 95%% intervals")
    s.add_argument("experiment", nargs="+", help="experiment YAML files or shipped experiment names (configs/experiments/)")
    s.add_argument("--out", help="experiments root: OUT/<name>/results.md (default: $ZOO_HOME/experiments)")
    s.add_argument("--store", help="stage store the experiments share (default: OUT/store)")
    s.add_argument("--variant", action="append", help="run only this variant (repeatable)")
    s.add_argument("--seeds", help="run only these seeds (comma-separated)")
    s.add_argument("--jobs", type=int, default=1,
                   help="processes sharing the store, each at torch's thread count (OMP_NUM_THREADS); results do not depend on it")
    s.add_argument("--dry-run", action="store_true", help="print the runs, stages and steps to train; train nothing")
    s.add_argument("--quiet", action="store_true", help="no progress bars (also ZOO_QUIET=1)")
    s.set_defaults(func=cmd_experiment)

    s = sub.add_parser("report", help="publish experiments: the README's claims, RESULTS.md's tables, card figures over seeds")
    s.add_argument("results", nargs="+", help="results.json files or folders holding <study>/results.json")
    s.add_argument("--readme", help="rewrite this file's `<!-- zoo report: claims begin/end -->` section")
    s.add_argument("--results", dest="results_md", help="rewrite this file's `<!-- zoo report: studies begin/end -->` section")
    s.add_argument("--cards", help="write mean and interval into the cards (in this folder) the experiments measured")
    s.set_defaults(func=cmd_report)


def make_full_parser() -> argparse.ArgumentParser:
    from zoo.pipelines.harness.cli import add_harness_command

    parser, sub = make_parser()
    add_training_commands(sub)
    add_harness_command(sub)  # zoo harness lm-eval|lmms-eval|tasks ... (zoo.pipelines.harness)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `zoo` console script; returns the exit status (0 ok, 1 error, 2 usage)."""
    return run_cli(make_full_parser(), argv, ERRORS)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ERRORS", "add_training_commands", "cmd_experiment", "main", "make_full_parser"]
