"""Run a recipe, or some of its stages: `python -m zoo.pipelines.run --recipe R --out OUT [--stage S ...]`.

The same as `zoo train R --out OUT ...` (kept for the launch scripts, which start it per rank).
"""

from __future__ import annotations

import sys

from zoo.pipelines.cli import main as zoo_main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--recipe" in argv:  # --recipe R -> positional R
        i = argv.index("--recipe")
        argv = [argv[i + 1], *argv[:i], *argv[i + 2:]]
    return zoo_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
