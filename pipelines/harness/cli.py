"""`python -m zoo.pipelines.harness` (and `zoo harness`): run the field's harnesses on zoo models.

    python -m zoo.pipelines.harness lm-eval --model zoo --model_args name=tiny-zoo-text \\
        --include_path tasks/ --tasks zoo_text --apply_chat_template
    python -m zoo.pipelines.harness lmms-eval eval --model zoo --model_args name=tiny-zoo-vqa \\
        --include_path tasks/ --tasks zoo_vqa
    python -m zoo.pipelines.harness tasks --data RUN/data --family text --family vqa --out tasks/

`lm-eval` / `lmms-eval` register the model `zoo` and hand every other argument to the harness's own
command line unchanged (lm-eval discovers no third-party model by itself; lmms-eval also finds it
through its entry point, so plain `lmms-eval eval --model zoo ...` works too). `tasks` writes local
task folders from built data (`zoo.pipelines.harness.tasks`). Bad input ends with one line
`zoo harness: error: <cause>`; `ZOO_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys

from zoo.pipelines.harness import HarnessError, require

PROG = "zoo harness"
USAGE = f"{PROG} {{lm-eval,lmms-eval}} HARNESS-ARGS... | {PROG} tasks --data DIR --family F --out DIR"


def run_lm_eval(argv: list[str]) -> int:
    """lm-eval's command line with the model `zoo` registered."""
    require("lm_eval")
    import zoo.pipelines.harness.lm_eval_model  # noqa: F401  (registers "zoo")
    from lm_eval.__main__ import cli_evaluate

    return _as_harness("lm-eval", argv, cli_evaluate)


def run_lmms_eval(argv: list[str]) -> int:
    """lmms-eval's command line (the model `zoo` comes from the entry point, or is registered here)."""
    require("lmms_eval")
    from zoo.pipelines.harness.lmms_entry import filelock_compat

    filelock_compat()
    import lmms_eval.models as models
    from lmms_eval.cli.dispatch import main as lmms_main

    if "zoo" not in models.MODEL_REGISTRY_V2.list_model_names():  # not installed with its entry points (a source tree)
        from zoo.pipelines.harness.lmms_entry import manifest

        models.MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
    return _as_harness("lmms-eval", argv, lmms_main)


def _as_harness(prog: str, argv: list[str], entry) -> int:
    saved = sys.argv
    sys.argv = [prog, *argv]
    try:
        status = entry()
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return int(status or 0)


def run_tasks(argv: list[str]) -> int:
    from zoo.pipelines.harness.tasks import HARNESSES, write_corpus_task, write_family_tasks

    p = argparse.ArgumentParser(prog=f"{PROG} tasks", description="write local harness tasks from built data")
    p.add_argument("--data", help="built data directory (a run's data/)")
    p.add_argument("--family", action="append", default=[], help="task family (repeatable; 'corpus': a perplexity task)")
    p.add_argument("--out", required=True, help="folder for the task folders (give it to the harness as --include_path)")
    p.add_argument("--harness", choices=HARNESSES, help="default: lmms-eval for families with media, else lm-eval")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="at most this many (scored-kind) samples per family")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--metric", default=None, help="scorer instead of each family's own (exact_match, token_f1, wer, ...)")
    p.add_argument("--text", action="append", default=[],
                   help="a plain-text file to score by perplexity (one document per blank-line-separated paragraph)")
    a = p.parse_args(argv)
    if not a.family and not a.text:
        raise HarnessError(f"{PROG} tasks needs --family (with --data) or --text FILE")
    if a.family and not a.data:
        raise HarnessError(f"{PROG} tasks: --family needs --data (the built data of a run)")
    written = write_family_tasks(a.data, a.family, a.out, harness=a.harness, split=a.split, limit=a.limit,
                                 max_new_tokens=a.max_new_tokens, metric=a.metric) if a.family else []
    from pathlib import Path

    for i, path in enumerate(a.text):
        docs = [d.strip() for d in Path(path).read_text(encoding="utf-8").split("\n\n") if d.strip()]
        written.append(write_corpus_task(docs, a.out, name=f"zoo_text_{Path(path).stem}" if len(a.text) > 1 else "zoo_text_corpus"))
    for folder in written:
        print(f"wrote task {folder.name} at {folder}")
    return 0


COMMANDS = {"lm-eval": run_lm_eval, "lm_eval": run_lm_eval, "lmms-eval": run_lmms_eval, "lmms_eval": run_lmms_eval,
            "tasks": run_tasks}


def main(argv: list[str] | None = None) -> int:
    from zoo.cli import ERRORS
    from zoo.errors import report_errors

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {USAGE}\n\n{__doc__}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"{PROG}: error: unknown command {command!r}; choose from lm-eval, lmms-eval, tasks", file=sys.stderr)
        return 2
    return report_errors(PROG, lambda: COMMANDS[command](rest), (*ERRORS, HarnessError, ImportError, FileExistsError),
                         f"{PROG} {command}")


def add_harness_command(sub) -> None:
    """`zoo harness ...` on the `zoo` command's subparsers (everything after `harness` is passed on)."""
    s = sub.add_parser("harness", help="run lm-evaluation-harness / lmms-eval on zoo models, or write local tasks",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("harness_args", nargs=argparse.REMAINDER, metavar="{lm-eval,lmms-eval,tasks} ...",
                   help="the harness command and its own arguments, passed on unchanged")
    s.set_defaults(func=lambda args: main(args.harness_args))


__all__ = ["add_harness_command", "main", "run_lm_eval", "run_lmms_eval", "run_tasks"]
