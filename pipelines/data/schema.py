"""The one sample schema every data builder emits, and the deterministic split rule.

A `Sample` is an instruction/answer pair with zero or more media items (PNG images, WAV audio)
and the task family it trains (e.g. ``vqa``, ``caption``, ``asr``, ``text``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

SPLITS = ("train", "val", "test")
MEDIA_KINDS = {"image": ".png", "audio": ".wav"}
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_MAGIC = {"image": b"\x89PNG\r\n\x1a\n", "audio": b"RIFF"}


class SchemaError(ValueError):
    """A sample violates the schema (bad key, unknown split or media kind, wrong media bytes)."""


@dataclass(frozen=True)
class Media:
    """One media item of a sample.

    Attributes:
        kind: ``"image"`` (PNG bytes) or ``"audio"`` (16-bit PCM WAV bytes).
        data: The encoded file bytes.
    """

    kind: str
    data: bytes

    @property
    def sha256(self) -> str:
        """Hex sha256 of `data`; the identity used by the shard checksums and the feature cache."""
        return hashlib.sha256(self.data).hexdigest()

    @property
    def ext(self) -> str:
        """File extension for this kind, with the dot."""
        return MEDIA_KINDS[self.kind]


@dataclass(frozen=True)
class Sample:
    """One training/eval example.

    Attributes:
        key: Unique id; letters, digits, ``_`` and ``-`` only (webdataset splits keys at dots).
        task_family: Which task family it trains and is evaluated in (``vqa``, ``caption``, ...).
        split: ``train``, ``val`` or ``test``.
        instruction: The prompt text. Media are referred to by their position in `media`; the
            model's processor inserts the placeholder tokens.
        answer: The target text.
        media: Images and/or audio clips, in order.
        subtype: Optional kind of the sample within its family: easy-VQA's question type
            (``yesno`` / ``shape`` / ``color``), or spoken words' ``seen_voice`` / ``unseen_voice``
            when voices are held out. Evaluation reports the metric per subtype beside the overall
            one. Empty (the default) for families without subtypes; shards store it only when set,
            so shards written before it existed, and shards of families without subtypes, are
            unchanged byte for byte.
    """

    key: str
    task_family: str
    split: str
    instruction: str
    answer: str
    media: tuple[Media, ...] = field(default_factory=tuple)
    subtype: str = ""

    def validate(self) -> None:
        """Check the sample against the schema.

        Raises:
            SchemaError: Naming the key and what is wrong.
        """
        if not _KEY_RE.match(self.key):
            raise SchemaError(f"sample key {self.key!r} must match {_KEY_RE.pattern} (no dots, no slashes)")
        if self.split not in SPLITS:
            raise SchemaError(f"sample {self.key}: split {self.split!r} is not one of {SPLITS}")
        if not self.task_family or not _KEY_RE.match(self.task_family):
            raise SchemaError(f"sample {self.key}: task_family {self.task_family!r} must match {_KEY_RE.pattern}")
        if not isinstance(self.instruction, str) or not isinstance(self.answer, str):
            raise SchemaError(f"sample {self.key}: instruction and answer must be str")
        if not self.answer:
            raise SchemaError(f"sample {self.key}: empty answer")
        if not isinstance(self.subtype, str) or (self.subtype and not _KEY_RE.match(self.subtype)):
            raise SchemaError(f"sample {self.key}: subtype {self.subtype!r} must be empty or match {_KEY_RE.pattern}")
        for i, m in enumerate(self.media):
            if m.kind not in MEDIA_KINDS:
                raise SchemaError(f"sample {self.key}: media {i} has unknown kind {m.kind!r}; known {sorted(MEDIA_KINDS)}")
            if not isinstance(m.data, bytes) or not m.data.startswith(_MAGIC[m.kind]):
                raise SchemaError(f"sample {self.key}: media {i} ({m.kind}) does not start with the {m.ext} signature")


def hash_unit(text: str, salt: str = "") -> float:
    """Map a string to a stable float in [0, 1) via sha256 (same on every machine and Python run)."""
    digest = hashlib.sha256(f"{salt}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(group_key: str, val_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """Deterministic split of a stable group key: ``train``, ``val`` or ``test``.

    Everything sharing a group key (e.g. all questions about one WordNet synset) lands in one split,
    so no split leaks into another.

    Args:
        group_key: A key that does not depend on iteration order (e.g. ``"fmnist-train-00042"``).
        val_fraction: Expected share of ``val``.
        test_fraction: Expected share of ``test``.

    Returns:
        The split name.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"bad split fractions val={val_fraction} test={test_fraction}")
    u = hash_unit(group_key, "split")
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def order_key(key: str) -> float:
    """Stable pseudo-random order for picking the first N samples of a split (a well-mixed prefix)."""
    return hash_unit(key, "order")
