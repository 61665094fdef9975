"""CLI: ``python -m zoo.pipelines.data build|import-llava|show ...``."""

from __future__ import annotations

import argparse
import sys

from zoo.errors import report_errors
from zoo.progress import quiet_while

from .build import FAMILIES, build_all
from .llava import import_llava
from .shards import iter_split, read_manifest, write_dataset


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m zoo.pipelines.data", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build shards for the offline task families")
    b.add_argument("--out", required=True, help="output directory (one sub-directory per family)")
    b.add_argument("--max-per-split", type=int, default=None, help="cap on samples per split (default: all)")
    b.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES, help="families to build (default: all)")
    b.add_argument("--quiet", action="store_true", help="no progress bars (also ZOO_QUIET=1)")
    li = sub.add_parser("import-llava", help="convert LLaVA-format JSON + images into shards")
    li.add_argument("--json", required=True)
    li.add_argument("--image-root", required=True)
    li.add_argument("--out", required=True, help="family directory to write")
    li.add_argument("--task-family", default="vqa")
    li.add_argument("--max-per-split", type=int, default=None)
    li.add_argument("--image-size", type=int, default=None, help="resize images to this square size")
    li.add_argument("--quiet", action="store_true", help="no progress bar (also ZOO_QUIET=1)")
    s = sub.add_parser("show", help="print a few samples of a built family directory")
    s.add_argument("dir")
    s.add_argument("--split", default="train")
    s.add_argument("-n", type=int, default=5)
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    with quiet_while(getattr(args, "quiet", False)):  # every bar of the work below (zoo.progress)
        # bad input ends in one line `python -m zoo.pipelines.data: error: <cause>`, status 1 (ZOO_DEBUG=1: traceback)
        return report_errors(p.prog, lambda: _run(args), command=f"{p.prog} {args.cmd}")


def _at_least(name: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _run(args: argparse.Namespace) -> int:
    for flag in ("max_per_split", "image_size"):
        _at_least("--" + flag.replace("_", "-"), getattr(args, flag, None), 1)
    _at_least("-n", getattr(args, "n", None), 0)
    if args.cmd == "build":
        build_all(args.out, args.max_per_split, tuple(args.families))
    elif args.cmd == "import-llava":
        splits = import_llava(args.json, args.image_root, task_family=args.task_family, max_per_split=args.max_per_split, image_size=args.image_size)
        m = write_dataset(splits, args.out, task_family=args.task_family, source=f"llava:{args.json}", params={"max_per_split": args.max_per_split})
        print({k: v["count"] for k, v in m["splits"].items()})
    else:
        splits = read_manifest(args.dir)["splits"]
        if args.split not in splits:
            raise ValueError(f"{args.dir} has no split {args.split!r}; it has {sorted(splits)}")
        print(splits[args.split]["count"], "samples in", args.split)
        for i, smp in enumerate(iter_split(args.dir, args.split)):
            if i >= args.n:
                break
            kinds = ",".join(m.kind for m in smp.media) or "-"
            print(f"{smp.key} [{kinds}] {smp.instruction!r} -> {smp.answer!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
