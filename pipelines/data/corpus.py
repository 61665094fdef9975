"""Plain text for training the tokenizer and pretraining the tiny LM.

Sources: WordNet noun definitions (``"<word>: <definition>"``; the synsets' own train/val split
from `wordnet.synset_splits`, and none from the test split, so the LM never reads held-out answers of the ``text`` family),
fortunes (Debian ``fortunes-min``; split by hash of the fortune), and the word list
``/usr/share/dict/words`` (Debian ``wamerican``; tokenizer only).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .schema import order_key, split_of
from .wordnet import DATA_NOUN, load_noun_synsets, noun_synset_splits

FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDS = Path("/usr/share/dict/words")
CORPUS_SPLITS = ("train", "val")


def read_fortunes(directory: str | os.PathLike = FORTUNES_DIR) -> list[str]:
    """Every fortune in the plain-text cookie files of `directory`, whitespace-normalized, file order.

    Raises:
        FileNotFoundError: If the directory holds no cookie files (install ``fortunes-min``).
    """
    directory = Path(directory)
    files = sorted(p for p in directory.glob("*") if p.is_file() and p.suffix not in (".dat", ".u8"))
    if not files:
        raise FileNotFoundError(f"no fortune files in {directory}: install the Debian package fortunes-min (make setup)")
    out = []
    for p in files:
        for chunk in re.split(r"^%\s*$", p.read_text(encoding="utf-8", errors="replace"), flags=re.M):
            text = " ".join(chunk.split())
            if text:
                out.append(text)
    return out


def read_words(path: str | os.PathLike = WORDS) -> list[str]:
    """The dictionary word list without possessives (``"dog's"``), in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: install the Debian package wamerican (make setup)")
    return [w for w in path.read_text(encoding="utf-8", errors="replace").split() if not w.endswith("'s")]


def corpus_lines(split: str, max_lines: int | None = None, *, data_noun: str | os.PathLike = DATA_NOUN, fortunes_dir: str | os.PathLike = FORTUNES_DIR) -> list[str]:
    """LM text of one split: one definition or fortune per line, in a stable hashed order.

    Args:
        split: ``train`` or ``val``.
        max_lines: Cap (None: all; about 66k train lines).
        data_noun: WordNet ``data.noun``.
        fortunes_dir: Fortune cookie directory.

    Returns:
        The lines (no newlines inside).
    """
    if split not in CORPUS_SPLITS:
        raise ValueError(f"corpus split must be one of {CORPUS_SPLITS}, got {split!r}")
    synsets = load_noun_synsets(str(data_noun))
    splits = noun_synset_splits(str(data_noun))
    lines = [(s.key, f"{s.lemmas[0]}: {s.definition}") for s in synsets if splits[s.key] == split]
    for text in read_fortunes(fortunes_dir):
        if split_of("fortune/" + text) == split:
            lines.append(("fortune/" + text, text))
    lines.sort(key=lambda kv: (order_key(kv[0]), kv[0]))
    return [text for _, text in lines[:max_lines]]


def write_corpus(out_dir: str | os.PathLike, max_lines: int | None = None, *, words_path: str | os.PathLike = WORDS) -> dict[str, int]:
    """Write ``train.txt``, ``val.txt`` (LM text) and ``words.txt`` (tokenizer extra) into `out_dir`.

    Args:
        out_dir: Directory (created if needed).
        max_lines: Cap per file.
        words_path: The word list.

    Returns:
        Line count per file name.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    words = read_words(words_path)[:max_lines]
    files = {"train.txt": corpus_lines("train", max_lines), "val.txt": corpus_lines("val", max_lines), "words.txt": words}
    for name, lines in files.items():
        tmp = out / (name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, out / name)
    return {name: len(lines) for name, lines in files.items()}
