"""Registry of the offline builders and `build_all`, which writes every family's shards."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import easy_vqa, emoji, fashion_mnist, speech, wordnet
from .corpus import write_corpus
from .schema import Sample
from .shards import write_dataset


@dataclass(frozen=True)
class Builder:
    """One task family's builder.

    Attributes:
        family: Task family name (also the output sub-directory).
        source: Where the data comes from (recorded in the manifest).
        build: ``build(max_per_split) -> {split: [Sample]}``.
    """

    family: str
    source: str
    build: Callable[[int | None], dict[str, list[Sample]]]


BUILDERS: dict[str, Builder] = {
    b.family: b
    for b in (
        Builder(fashion_mnist.TASK_FAMILY, "debian:dataset-fashion-mnist", fashion_mnist.build_fashion_vqa),
        Builder(emoji.TASK_FAMILY, "debian:fonts-noto-color-emoji", emoji.build_emoji_captions),
        Builder(speech.TASK_FAMILY, "debian:espeak-ng", speech.build_spoken_words),
        Builder(wordnet.TASK_FAMILY, "debian:wordnet", wordnet.build_wordnet_instructions),
        Builder(easy_vqa.TASK_FAMILY, f"pypi:{easy_vqa.PACKAGE}=={easy_vqa.VERSION}", easy_vqa.build_easy_vqa),
    )
}
CORPUS = "corpus"
FAMILIES = (*BUILDERS, CORPUS)


def build_family(family: str, out_dir: str | os.PathLike, max_per_split: int | None = None, max_per_shard: int = 1000,
                 options: dict | None = None) -> dict:
    """Build one family into ``<out_dir>/<family>`` (shards + manifest, or corpus text files).

    Returns:
        The manifest (for ``corpus``: ``{"files": {name: line count}}``).
    """
    out = Path(out_dir) / family
    if family == CORPUS:
        return {"files": write_corpus(out, max_per_split)}
    if family not in BUILDERS:
        raise KeyError(f"unknown family {family!r}; known: {FAMILIES}")
    b = BUILDERS[family]
    options = dict(options or {})
    splits = b.build(max_per_split, **options)
    return write_dataset(splits, out, task_family=b.family, source=b.source,
                         params={"max_per_split": max_per_split, **options}, max_per_shard=max_per_shard)


def build_all(out_dir: str | os.PathLike, max_per_split: int | None = None, families: tuple[str, ...] = FAMILIES,
              log: Callable[[str], None] = print, options: dict[str, dict] | None = None) -> dict[str, dict]:
    """Build the given families (default: all) into `out_dir`; returns ``{family: manifest}``.

    Args:
        options: family -> keyword arguments of its builder (e.g. ``{"text": {"question_types": ["choice"]}}``).
    """
    unknown = [f for f in [*families, *(options or {})] if f not in FAMILIES]
    if unknown:
        raise KeyError(f"unknown families {unknown}; known: {FAMILIES}")
    result = {}
    for family in families:
        t0 = time.perf_counter()
        result[family] = m = build_family(family, out_dir, max_per_split, options=(options or {}).get(family))
        counts = m["files"] if family == CORPUS else {s: v["count"] for s, v in m["splits"].items()}
        log(f"{family}: {counts} in {time.perf_counter() - t0:.1f}s -> {Path(out_dir) / family}")
    return result
