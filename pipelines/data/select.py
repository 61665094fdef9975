"""Pick which candidate samples a size-limited build materializes, deterministically."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from .schema import SPLITS, order_key

T = TypeVar("T")


def pick_per_split(candidates: Iterable[T], split: Callable[[T], str], key: Callable[[T], str], max_per_split: int | None) -> dict[str, list[T]]:
    """Group candidates by split and keep the first `max_per_split` of each in a stable hashed order.

    The hashed order (sha256 of the sample key) mixes classes, so a 20-sample CI build still
    covers many of them, and a smaller limit always gives a prefix of a larger one.

    Args:
        candidates: Cheap descriptions of every possible sample (no media rendered yet).
        split: Candidate -> split name.
        key: Candidate -> unique sample key.
        max_per_split: Cap per split; None keeps all.

    Returns:
        ``{split: [candidate, ...]}`` for every split in `SPLITS` (possibly empty lists).
    """
    if max_per_split is not None and max_per_split < 0:
        raise ValueError(f"max_per_split must be >= 0 or None, got {max_per_split}")
    groups: dict[str, list[T]] = {s: [] for s in SPLITS}
    for c in candidates:
        s = split(c)
        if s not in groups:
            raise ValueError(f"candidate {key(c)!r} has unknown split {s!r}")
        groups[s].append(c)
    for s, items in groups.items():
        items.sort(key=lambda c: (order_key(key(c)), key(c)))
        if max_per_split is not None:
            del items[max_per_split:]
    return groups
