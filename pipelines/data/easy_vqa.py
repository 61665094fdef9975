"""easy-VQA (PyPI ``easy-vqa==1.0``, MIT) -> visual question answering samples with question types.

The package ships 64x64 RGB PNG images of one coloured shape (4000 train, 1000 test) and
questions as ``[[text, answer, image_id], ...]`` JSON (38,575 train, 9,673 test), with 13
answers: yes/no, 3 shapes, 8 colours. It is read from its installed folder, never imported
(``easy_vqa/__init__`` is harmless, but the data is all we need). The JSON has no question type;
it follows from the answer, since the three answer sets are disjoint: ``yesno`` ("is there a red
shape?"), ``shape`` ("what shape does the image contain?"), ``color`` ("what color is the
triangle?"). Each sample carries it as `Sample.subtype` (and at the end of its key), so
evaluation reports accuracy per question type beside the overall accuracy.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .schema import Media, Sample, split_of
from .select import materialize, pick_per_split

TASK_FAMILY = "easyvqa"
PACKAGE, VERSION = "easy-vqa", "1.0"
INSTALL = f"pip install --no-deps '{PACKAGE}=={VERSION}'"
YESNO = ("yes", "no")
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "yellow", "teal", "brown", "black", "gray")
ANSWERS = YESNO + SHAPES + COLORS
QUESTION_TYPES = ("yesno", "shape", "color")
_TYPE_OF_ANSWER = {**dict.fromkeys(YESNO, "yesno"), **dict.fromkeys(SHAPES, "shape"), **dict.fromkeys(COLORS, "color")}
# What easy-vqa 1.0 ships: (images, questions, sha256 of questions.json) per part.
EXPECTED = {
    "train": (4000, 38575, "bb67697636aed0e65631d4266824aebeae5c833b0f37ed781e20752e85617ec5"),
    "test": (1000, 9673, "0d4630a51bafec65343e2f6af9cdd20cf8eae214344ef57636202eec409553f7"),
}


class MissingPackageError(FileNotFoundError):
    """easy-vqa is not installed (or not the pinned version, or its files differ from it)."""


def question_type(answer: str) -> str:
    """``yesno``, ``shape`` or ``color`` for one of the 13 answers.

    Raises:
        ValueError: For any other answer.
    """
    try:
        return _TYPE_OF_ANSWER[answer]
    except KeyError:
        raise ValueError(f"{answer!r} is not an easy-VQA answer; known: {ANSWERS}") from None


def package_data_dir() -> Path:
    """The ``data`` folder of the installed easy-vqa package, found without importing it.

    Raises:
        MissingPackageError: Not installed, or another version (names the install command).
    """
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"the PyPI package {PACKAGE} is not installed: {INSTALL} (make setup)")
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version != VERSION:
        raise MissingPackageError(f"{PACKAGE} {version} is installed, the data pins {VERSION}: {INSTALL}")
    return Path(spec.submodule_search_locations[0]) / "data"


@dataclass(frozen=True)
class Question:
    """One question of the package: its part (train | test), position in the part's JSON, text, answer, image."""

    part: str
    index: int
    text: str
    answer: str
    image: int

    @property
    def question_type(self) -> str:
        return question_type(self.answer)


@lru_cache(maxsize=2)
def load_questions(root: str | None = None) -> dict[str, tuple[Question, ...]]:
    """Read and check both parts' ``questions.json``: ``{"train": (Question, ...), "test": (...)}``.

    Args:
        root: The package's ``data`` folder (default: the installed package's).

    Raises:
        MissingPackageError: A file is missing, or its bytes are not those of easy-vqa 1.0.
    """
    data = Path(root) if root is not None else package_data_dir()
    out = {}
    for part, (n_images, n_questions, sha256) in EXPECTED.items():
        path = data / part / "questions.json"
        if not path.is_file():
            raise MissingPackageError(f"{path} is missing: install the PyPI package {PACKAGE}: {INSTALL}")
        raw = path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != sha256:
            raise MissingPackageError(f"{path} is not the file of {PACKAGE}=={VERSION} (sha256 differs): {INSTALL}")
        questions = tuple(Question(part, i, str(t), str(a), int(im)) for i, (t, a, im) in enumerate(json.loads(raw)))
        for q in questions:
            question_type(q.answer)  # every answer is one of the 13
        images = {q.image for q in questions}
        if len(questions) != n_questions or images != set(range(n_images)):
            raise MissingPackageError(f"{path}: {len(questions)} questions about {len(images)} images, expected "
                                      f"{n_questions} about images 0..{n_images - 1}: {INSTALL}")
        out[part] = questions
    return out


def image_group(part: str, image: int) -> str:
    """The split group of one image: every question about it lands in one split."""
    return f"easyvqa-{part}-{image:04d}"


def split_of_question(q: Question, val_fraction: float = 0.1) -> str:
    """The package's test part is ``test``; its train part is ``train``/``val`` by the hash of the image."""
    if q.part == "test":
        return "test"
    return split_of(image_group(q.part, q.image), val_fraction=val_fraction, test_fraction=0.0)


def sample_key(q: Question) -> str:
    """``easyvqa-<part>-<image>-q<index in the part's JSON>-<question type>``."""
    return f"{image_group(q.part, q.image)}-q{q.index:05d}-{q.question_type}"


def build_easy_vqa(
    max_per_split: int | None = None,
    *,
    root: str | os.PathLike | None = None,
    question_types: tuple[str, ...] = QUESTION_TYPES,
    val_fraction: float = 0.1,
) -> dict[str, list[Sample]]:
    """easy-VQA questions as VQA samples: the question is the instruction, the answer the answer.

    The package's test part is the ``test`` split (1000 images); its train part is split into
    train/val by the hash of the image (`split_of` of ``easyvqa-train-NNNN``), so all questions
    about one image share a split and no image is in two splits. The image is the package's PNG,
    byte for byte; the question is the package's text, as written (lower case).

    Args:
        max_per_split: Cap on samples per split, picked in a stable hashed order (None: all,
            about 34.7k train / 3.9k val / 9,673 test).
        root: The package's ``data`` folder (default: the installed package's).
        question_types: Subset of ``("yesno", "shape", "color")`` to keep.
        val_fraction: Expected share of the train part's images that become ``val``.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` of samples with one 64x64 RGB PNG and
        `subtype` set to the question type.

    Raises:
        MissingPackageError: easy-vqa 1.0 is not installed (names the install command).
    """
    question_types = tuple(question_types)
    unknown = set(question_types) - set(QUESTION_TYPES)
    if unknown or not question_types:
        raise ValueError(f"question_types must be a non-empty subset of {QUESTION_TYPES}, got {question_types}")
    data = Path(root) if root is not None else package_data_dir()
    parts = load_questions(str(data))
    cands = [q for part in parts.values() for q in part if q.question_type in question_types]
    picked = pick_per_split(cands, lambda q: split_of_question(q, val_fraction), sample_key, max_per_split)

    def make(q: Question, split: str) -> Sample:
        path = data / q.part / "images" / f"{q.image}.png"
        if not path.is_file():
            raise MissingPackageError(f"{path} is missing: reinstall the PyPI package {PACKAGE}: {INSTALL}")
        media = (Media("image", path.read_bytes()),)
        return Sample(sample_key(q), TASK_FAMILY, split, q.text, q.answer, media, subtype=q.question_type)

    return materialize(picked, make, TASK_FAMILY)
