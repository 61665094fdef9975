"""Progress bars for long work: one helper, shown only to someone watching a terminal.

Training, data builds, downloads, feature-cache fills and evaluation all report progress through
`progress`, a `tqdm` bar on stderr. Whether a bar shows is decided in one place (`is_quiet`):

* `quiet=True` (a caller's `--quiet`) or `ZOO_QUIET=1` in the environment: no bar;
* otherwise a bar only when stderr is a terminal, so logs of non-interactive runs (CI, `nohup`,
  a launcher's per-rank output) are not filled with redrawn bars;
* `quiet=False` forces the bar even when stderr is not a terminal (tests, a caller who knows).

The CLIs' `--quiet` sets `ZOO_QUIET=1` for the command's duration (`quiet_while`), so the work
they start, worker processes included, is quiet too; it (and `ZOO_QUIET=1` itself) also turns off
transformers' and huggingface_hub's own bars (loading weights, downloads). A disabled bar still iterates and counts:
callers never branch on quietness.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

QUIET_ENV = "ZOO_QUIET"
_TRUE = ("1", "true", "yes", "on")


def is_quiet(quiet: bool | None = None) -> bool:
    """Whether progress bars are off: `quiet` if given, else `ZOO_QUIET` or a stderr that is no terminal."""
    if quiet is not None:
        return bool(quiet)
    if os.environ.get(QUIET_ENV, "").strip().lower() in _TRUE:
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    return not (isatty is not None and isatty())


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | float | None = None,
    desc: str | None = None,
    unit: str = "it",
    quiet: bool | None = None,
    **options,
) -> tqdm:
    """A tqdm bar on stderr over `iterable` (or updated by hand with `.update(n)`), off when quiet.

    Args:
        iterable: what to iterate; None for a bar advanced by `.update(n)` (e.g. bytes received).
        total: the expected count (default `len(iterable)` when it has one).
        desc: the bar's label (a stage, a task family, a file name).
        unit: what is counted ("it", "sample", "batch", "B"; "B" counts bytes in KiB/MiB: "97.7k/256k").
        quiet: True: no bar; False: a bar even without a terminal; None: see `is_quiet`.
        **options: other `tqdm` arguments (`initial`, `leave`, `postfix`, ...).

    Returns:
        The `tqdm` object; use it as the iterable or a context manager.
    """
    if unit == "B":
        options = {"unit_scale": True, "unit_divisor": 1024, **options}
    options.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=is_quiet(quiet), file=sys.stderr, **options)


# The libraries' own switches: huggingface_hub's (which transformers follows when it is imported
# later) for child processes and later imports, and tqdm's environment default.
_LIBRARY_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


def silence_libraries() -> None:
    """Turn off the progress bars of transformers and huggingface_hub (weights loading, downloads).

    Sets their environment switches (for imports still to come and child processes) and, where they
    are already imported, their runtime switches.
    """
    os.environ.update(_LIBRARY_ENV)
    if "huggingface_hub" in sys.modules:
        try:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        except ImportError:  # pragma: no cover - an old huggingface_hub
            pass
    if "transformers" in sys.modules:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass


def _restore_libraries(before: dict[str, str | None]) -> None:
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().lower() in _TRUE:
        return
    if "huggingface_hub" in sys.modules:
        try:
            from huggingface_hub.utils import enable_progress_bars

            enable_progress_bars()
        except ImportError:  # pragma: no cover
            pass
    if "transformers" in sys.modules:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.enable_progress_bar()
        except ImportError:  # pragma: no cover
            pass


@contextmanager
def quiet_while(quiet: bool) -> Iterator[None]:
    """Inside the block, with `quiet` (or `ZOO_QUIET=1` already set), no progress bar at all.

    Sets `ZOO_QUIET=1` (child processes inherit it) and silences transformers' and
    huggingface_hub's own bars (`silence_libraries`); everything is restored after. What a CLI's
    `--quiet` does: the bars deep in the work it starts need no argument threaded down.
    """
    if not quiet and os.environ.get(QUIET_ENV, "").strip().lower() not in _TRUE:
        yield
        return
    before = {k: os.environ.get(k) for k in (QUIET_ENV, *_LIBRARY_ENV)}
    os.environ[QUIET_ENV] = "1"
    silence_libraries()
    try:
        yield
    finally:
        _restore_libraries(before)


__all__ = ["QUIET_ENV", "is_quiet", "progress", "quiet_while", "silence_libraries"]
