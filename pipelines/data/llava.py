"""Import LLaVA-format JSON (LLaVA-Pretrain, LLaVA-mix style) into the `Sample` schema.

Input: a JSON list of ``{"id", "image": <path relative to image_root>, "conversations":
[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}``; entries
without ``image`` are text-only. Every human->gpt turn pair becomes one sample (key
``<id>-t<turn>``) carrying the entry's image; all turns of an entry share its split.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .fashion_mnist import png_bytes
from .schema import Media, Sample, SchemaError, split_of
from .select import materialize, pick_per_split

IMAGE_TOKEN = "<image>"
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")


class LlavaFormatError(ValueError):
    """The JSON does not follow the LLaVA conversation format (message names the entry)."""


def _turns(entry: dict, where: str) -> list[tuple[str, str]]:
    conv = entry.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise LlavaFormatError(f"{where}: 'conversations' must be a non-empty list, got {_kind(conv)}")
    pairs, i = [], 0
    while i < len(conv):
        a = conv[i]
        if not isinstance(a, dict) or a.get("from") != "human":
            raise LlavaFormatError(f"{where}: turn {i} should be from 'human', got {a.get('from') if isinstance(a, dict) else a!r}")
        b = conv[i + 1] if i + 1 < len(conv) else None
        if not isinstance(b, dict) or b.get("from") != "gpt":
            raise LlavaFormatError(f"{where}: turn {i} (human) is not followed by a 'gpt' turn")
        texts = []
        for j, turn in ((i, a), (i + 1, b)):
            value = turn.get("value", "")
            if not isinstance(value, str):
                raise LlavaFormatError(f"{where}: turn {j} 'value' must be a string, got {_kind(value)}")
            texts.append(value)
        pairs.append((texts[0].replace(IMAGE_TOKEN, "").strip(), texts[1].strip()))
        i += 2
    return pairs


def _kind(value) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"[:80]


def image_path(root: Path, rel, where: str) -> Path:
    """`root / rel` for an entry's `image`, refusing anything but a relative path inside `root`.

    Raises:
        LlavaFormatError: `rel` is not a string, is absolute, or leaves `root` (`..`, a symlink out).
    """
    if not isinstance(rel, str) or not rel.strip():
        raise LlavaFormatError(f"{where}: 'image' must be a path relative to the image root, got {_kind(rel)}")
    if Path(rel).is_absolute() or rel.startswith("~"):
        raise LlavaFormatError(f"{where}: image {rel!r} must be relative to the image root {str(root)!r}, not absolute")
    base = root.resolve()
    path = (base / rel).resolve()
    if path != base and base not in path.parents:
        raise LlavaFormatError(f"{where}: image {rel!r} resolves outside the image root {str(root)!r}")
    return path


def import_llava(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    *,
    task_family: str = "vqa",
    max_per_split: int | None = None,
    image_size: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> dict[str, list[Sample]]:
    """Read a LLaVA-format JSON file into samples.

    The ``<image>`` placeholder is removed from the question (the model's processor inserts its
    own placeholder tokens for the sample's media). Images are re-encoded as RGB PNG.

    Args:
        json_path: The JSON list.
        image_root: Directory the entries' ``image`` paths are relative to.
        task_family: Family recorded on every sample.
        max_per_split: Cap per split (samples, not entries).
        image_size: If set, images are resized to ``image_size x image_size``.
        val_fraction: Expected share of ``val`` (by hash of the entry id).
        test_fraction: Expected share of ``test``.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``.

    Raises:
        LlavaFormatError: Malformed entry (names its id and index).
        FileNotFoundError: An image is missing (names the entry and the path).
    """
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"image root {str(root)!r} is not a directory")
    try:
        entries = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LlavaFormatError(f"{json_path}: line {e.lineno}, column {e.colno}: not valid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise LlavaFormatError(f"{json_path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(entries, list):
        raise LlavaFormatError(f"{json_path}: expected a JSON list of entries, got {type(entries).__name__}")
    cands, seen = [], {}
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise LlavaFormatError(f"{json_path} entry {n}: must be an object with 'id' and 'conversations', got {_kind(entry)}")
        if "id" not in entry or not isinstance(entry["id"], (str, int)) or isinstance(entry["id"], bool) or entry["id"] == "":
            raise LlavaFormatError(f"{json_path} entry {n}: needs an 'id' (a string or an integer), got {_kind(entry.get('id'))}")
        where = f"{json_path} entry {n} (id {entry['id']!r})"
        if "image" in entry and entry["image"] is not None:
            image_path(root, entry["image"], where)  # every entry's image checked, picked or not
        base = "llava-" + _BAD_KEY_CHARS.sub("_", str(entry["id"]))
        if base in seen:
            raise LlavaFormatError(f"{where}: id maps to key {base!r} like entry {seen[base]}")
        seen[base] = n
        split = split_of(base, val_fraction, test_fraction)
        for t, (q, a) in enumerate(_turns(entry, where)):
            if not a:
                raise LlavaFormatError(f"{where}: turn pair {t} has an empty answer")
            cands.append((f"{base}-t{t}", split, q, a, entry.get("image"), where))
    picked = pick_per_split(cands, lambda c: c[1], lambda c: c[0], max_per_split)
    cache: dict[str, bytes] = {}

    def media(rel: str | None, where: str) -> tuple[Media, ...]:
        if rel is None:
            return ()
        if rel not in cache:
            path = image_path(root, rel, where)
            if not path.is_file():
                raise FileNotFoundError(f"{where}: image {path} does not exist")
            try:
                img = Image.open(io.BytesIO(path.read_bytes())).convert("RGB")
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise LlavaFormatError(f"{where}: {path} is not an image PIL can read ({type(e).__name__})") from None
            if image_size:
                img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
            cache[rel] = png_bytes(img)
        return (Media("image", cache[rel]),)

    def sample(c, split: str) -> Sample:
        try:
            return Sample(c[0], task_family, split, c[2], c[3], media(c[4], c[5]))
        except SchemaError as e:
            raise LlavaFormatError(f"{c[5]}: {e}") from None

    return materialize(picked, sample, task_family)
