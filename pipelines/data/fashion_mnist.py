"""Fashion-MNIST (Debian ``dataset-fashion-mnist``) -> visual question answering samples."""

from __future__ import annotations

import gzip
import io
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .schema import Media, Sample, hash_unit, split_of
from .select import materialize, pick_per_split

ROOT = Path("/usr/share/datasets/fashion-mnist")
TASK_FAMILY = "vqa"
CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
QUESTION_TYPES = ("what", "yesno")
WHAT = "What is shown in this image?"


def _read_idx(path: Path, magic: int) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: install the Debian package dataset-fashion-mnist (make setup)")
    raw = gzip.decompress(path.read_bytes())
    got, = struct.unpack(">i", raw[:4])
    if got != magic:
        raise ValueError(f"{path}: IDX magic {got}, expected {magic}")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@lru_cache(maxsize=2)
def load_fashion_mnist(root: str | os.PathLike = ROOT) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read the IDX files: ``{"train": (images [60000, 28, 28] uint8, labels [60000]), "test": ...}``."""
    root = Path(root)
    out = {}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 2051)
        labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 2049)
        if len(images) != len(labels):
            raise ValueError(f"{root}: {len(images)} {prefix} images but {len(labels)} labels")
        out[part] = (images, labels)
    return out


def png_bytes(image: Image.Image) -> bytes:
    """Encode a PIL image as PNG (deterministic for the same pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


@dataclass(frozen=True)
class _Candidate:
    part: str  # official part: train | test
    index: int
    question: str
    split: str

    @property
    def key(self) -> str:
        return f"fmnist-{self.part}-{self.index:05d}-{self.question}"


def build_fashion_vqa(
    max_per_split: int | None = None,
    *,
    root: str | os.PathLike = ROOT,
    question_types: tuple[str, ...] = QUESTION_TYPES,
    val_fraction: float = 0.1,
) -> dict[str, list[Sample]]:
    """Fashion-MNIST images as VQA samples.

    Question types: ``what`` ("What is shown in this image?" -> class name) and ``yesno``
    ("Is this a <class>?" -> yes/no, balanced; the asked class is chosen by hash). The official
    test part is the ``test`` split; the official train part is split into train/val by the hash
    of the image key, so both questions about one image share a split.

    Args:
        max_per_split: Cap on samples per split (None: all, 60k train-part images x question types).
        root: Directory with the IDX ``.gz`` files.
        question_types: Subset of ``("what", "yesno")``.
        val_fraction: Share of the official train part that becomes ``val``.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` of 28x28 grayscale PNG samples.
    """
    unknown = set(question_types) - set(QUESTION_TYPES)
    if unknown or not question_types:
        raise ValueError(f"question_types must be a non-empty subset of {QUESTION_TYPES}, got {question_types}")
    data = load_fashion_mnist(str(root))

    def candidates():
        for part, (images, _) in data.items():
            for i in range(len(images)):
                group = f"fmnist-{part}-{i:05d}"
                split = "test" if part == "test" else split_of(group, val_fraction=val_fraction, test_fraction=0.0)
                for q in question_types:
                    yield _Candidate(part, i, q, split)

    picked = pick_per_split(candidates(), lambda c: c.split, lambda c: c.key, max_per_split)
    return materialize(picked, lambda c, _: _make(c, data), TASK_FAMILY)


def _make(c: _Candidate, data) -> Sample:
    images, labels = data[c.part]
    label = CLASSES[int(labels[c.index])]
    media = (Media("image", png_bytes(Image.fromarray(images[c.index], mode="L"))),)
    if c.question == "what":
        return Sample(c.key, TASK_FAMILY, c.split, WHAT, label, media)
    u = hash_unit(c.key, "yesno")
    if u < 0.5:
        asked, answer = label, "yes"
    else:
        others = [x for x in CLASSES if x != label]
        asked, answer = others[int((u - 0.5) * 2 * len(others))], "no"
    article = "an" if asked[0] in "aeiou" else "a"
    return Sample(c.key, TASK_FAMILY, c.split, f"Is this {article} {asked}?", answer, media)
