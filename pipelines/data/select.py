"""Pick which candidate samples a size-limited build materializes, deterministically."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from zoo.progress import progress

from .schema import SPLITS, Sample, order_key

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


def materialize(picked: dict[str, list[T]], make: Callable[[T, str], Sample], desc: str) -> dict[str, list[Sample]]:
    """Render every picked candidate into a sample (media encoded), with one progress bar for the family.

    Args:
        picked: ``{split: [candidate, ...]}`` from `pick_per_split`.
        make: ``(candidate, split) -> sample`` (the slow part: drawing, synthesizing, encoding media).
        desc: The bar's label (the task family); see `zoo.progress.progress` for when it shows.

    Returns:
        ``{split: [sample, ...]}`` in the candidates' order.
    """
    out: dict[str, list[Sample]] = {}
    with progress(total=sum(len(c) for c in picked.values()), desc=desc, unit="sample") as bar:
        for split, cands in picked.items():
            out[split] = []
            for c in cands:
                out[split].append(make(c, split))
                bar.update()
    return out
