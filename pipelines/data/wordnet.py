"""WordNet noun definitions (Debian ``wordnet``; its ``data.noun`` parsed directly) -> text instructions."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .schema import Sample, hash_unit, split_of
from .select import materialize, pick_per_split

DATA_NOUN = Path("/usr/share/wordnet/data.noun")
TASK_FAMILY = "text"
QUESTION_TYPES = ("define", "name", "choice", "category")
# WordNet's noun lexicographer files (lexnames(5WN)), by lex_filenum: the `category` answers.
NOUN_CATEGORIES = {
    3: "top", 4: "act", 5: "animal", 6: "artifact", 7: "attribute", 8: "body", 9: "cognition",
    10: "communication", 11: "event", 12: "feeling", 13: "food", 14: "group", 15: "location",
    16: "motive", 17: "object", 18: "person", 19: "phenomenon", 20: "plant", 21: "possession",
    22: "process", 23: "quantity", 24: "relation", 25: "shape", 26: "state", 27: "substance", 28: "time",
}
_PAREN_MARKER = re.compile(r"\((?:a|p|ip)\)$")


@dataclass(frozen=True)
class Synset:
    """One noun synset.

    Attributes:
        offset: The byte offset id in ``data.noun`` (stable across installs of WordNet 3.0).
        lemmas: Its words, most frequent first, underscores turned into spaces.
        definition: The gloss without its quoted examples.
        examples: Quoted usage examples from the gloss.
        category: The lexicographer category (``NOUN_CATEGORIES``), e.g. "person", "plant".
    """

    offset: str
    lemmas: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]
    category: str = ""

    @property
    def key(self) -> str:
        return f"wn-{self.offset}"


def parse_data_line(line: str) -> Synset:
    """Parse one ``data.noun`` line (format documented in wndb(5WN)).

    Raises:
        ValueError: Naming the line when it does not follow the format.
    """
    head, sep, gloss = line.partition(" | ")
    fields = head.split()
    if not sep or len(fields) < 4:
        raise ValueError(f"not a WordNet data line: {line[:80]!r}")
    n_words = int(fields[3], 16)
    lemmas = tuple(_PAREN_MARKER.sub("", fields[4 + 2 * i]).replace("_", " ") for i in range(n_words))
    gloss = gloss.strip()
    parts = [p.strip() for p in gloss.split(";")]
    definition = "; ".join(p for p in parts if not p.startswith('"')).strip()
    examples = tuple(p.strip('"') for p in parts if p.startswith('"'))
    category = NOUN_CATEGORIES.get(int(fields[1]), "")
    return Synset(fields[0], lemmas, definition, examples, category)


@lru_cache(maxsize=2)
def load_noun_synsets(path: str | os.PathLike = DATA_NOUN) -> tuple[Synset, ...]:
    """All noun synsets with a definition, in file order (about 82k)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: install the Debian package wordnet (make setup)")
    out = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for n, line in enumerate(f, 1):
            if line.startswith("  "):  # license header
                continue
            try:
                syn = parse_data_line(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: {e}") from e
            if syn.definition and syn.lemmas:
                out.append(syn)
    return tuple(out)


def synset_splits(synsets: tuple[Synset, ...] | list[Synset], val_fraction: float = 0.1, test_fraction: float = 0.1) -> dict[str, str]:
    """Split of every synset, keeping synsets that share a first word or a definition together.

    WordNet repeats definitions across synsets (~380 times) and words across senses; splitting by
    synset alone would put the same question in train and test. Synsets are grouped by union-find
    over (first word, lower-cased) and definition; a group's split is the hash of its smallest key.

    Returns:
        ``{synset.key: split}``.
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for syn in synsets:
        for node in (f"w:{syn.lemmas[0].lower()}", f"d:{syn.definition}"):
            a, b = find(syn.key), find(node)
            if a != b:
                parent[max(a, b)] = min(a, b)  # "wn-..." sorts after "d:"/"w:"; roots stay stable
    roots: dict[str, str] = {}
    for syn in synsets:  # name each group by its smallest synset key
        r = find(syn.key)
        roots[r] = min(roots.get(r, syn.key), syn.key)
    return {syn.key: split_of(roots[find(syn.key)], val_fraction, test_fraction) for syn in synsets}


@lru_cache(maxsize=4)
def noun_synset_splits(path: str | os.PathLike = DATA_NOUN, val_fraction: float = 0.1, test_fraction: float = 0.1) -> dict[str, str]:
    """`synset_splits` of the installed ``data.noun``, computed once per process (do not mutate)."""
    return synset_splits(load_noun_synsets(str(path)), val_fraction, test_fraction)


@dataclass(frozen=True)
class _Candidate:
    synset: Synset
    question: str
    split: str

    @property
    def key(self) -> str:
        return f"{self.synset.key}-{self.question}"


def build_wordnet_instructions(
    max_per_split: int | None = None,
    *,
    path: str | os.PathLike = DATA_NOUN,
    question_types: tuple[str, ...] | list[str] = QUESTION_TYPES,
    max_definition_chars: int = 160,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> dict[str, list[Sample]]:
    """Text-only instruction samples from WordNet noun synsets.

    Question types (all questions about one synset share its split; see `synset_splits`):

    - ``define``: "Define: <word>" -> definition;
    - ``name``: "What word means: <definition>?" -> the synset's first word;
    - ``choice``: "Which word means: <definition>? Options: a, b, c, d" -> the right option
      (three distractors picked by hash from other synsets; accuracy has a 25 % chance level);
    - ``category``: "What kind of thing is: <definition>?" -> its WordNet lexicographer category
      (26 classes: person, artifact, plant, ...; the majority class is the baseline).

    Args:
        max_per_split: Cap per split (None: every synset with a definition of at most
            `max_definition_chars` characters, times the question types).
        path: WordNet ``data.noun``.
        question_types: Subset of ``QUESTION_TYPES``.
        max_definition_chars: Longer definitions are skipped (keeps sequences short for tiny LMs).
        val_fraction: Expected share of ``val``.
        test_fraction: Expected share of ``test``.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` of text-only samples.
    """
    unknown = set(question_types) - set(QUESTION_TYPES)
    if unknown or not question_types:
        raise ValueError(f"question_types must be a non-empty subset of {QUESTION_TYPES}, got {question_types}")
    synsets = [s for s in load_noun_synsets(str(path)) if len(s.definition) <= max_definition_chars]
    splits = noun_synset_splits(str(path), val_fraction, test_fraction)
    cands = []
    for syn in synsets:
        split = splits[syn.key]
        cands.extend(_Candidate(syn, q, split) for q in question_types)
    picked = pick_per_split(cands, lambda c: c.split, lambda c: c.key, max_per_split)
    return materialize(picked, lambda c, _: _make(c, synsets), TASK_FAMILY)


def _make(c: _Candidate, pool: list[Synset]) -> Sample:
    syn, word = c.synset, c.synset.lemmas[0]
    if c.question == "define":
        return Sample(c.key, TASK_FAMILY, c.split, f"Define: {word}", syn.definition)
    if c.question == "name":
        return Sample(c.key, TASK_FAMILY, c.split, f"What word means: {syn.definition}?", word)
    if c.question == "category":
        return Sample(c.key, TASK_FAMILY, c.split, f"What kind of thing is: {syn.definition}?", syn.category)
    options, i = [word], 0
    while len(options) < 4:
        other = pool[int(hash_unit(f"{c.key}/{i}", "distractor") * len(pool))]
        i += 1
        if other.lemmas[0] not in options and other.lemmas[0] not in syn.lemmas:
            options.append(other.lemmas[0])
    options.sort(key=lambda o: hash_unit(f"{c.key}/{o}", "option"))
    return Sample(c.key, TASK_FAMILY, c.split, f"Which word means: {syn.definition}? Options: {', '.join(options)}", word)
