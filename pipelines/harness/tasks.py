"""Local task folders for the harnesses: our task families (or any samples, or plain text) over a JSONL file.

A task folder holds `<name>.yaml` (the task), `<split>.jsonl` (one sample a line: `id`,
`instruction`, `answer`, `subtype`, `media`: paths relative to the folder), `media/` (the PNG and
WAV files) and `utils.py` (the scorer and, for lmms-eval, `doc_to_visual`). Nothing in it imports
the zoo: the folder runs in any environment that has the harness.

    python -m zoo.pipelines.harness tasks --data RUN/data --family text --out tasks/          # lm-eval
    python -m zoo.pipelines.harness tasks --data RUN/data --family vqa --harness lmms-eval --out tasks/
    lm_eval ... --include_path tasks/ --tasks zoo_text --apply_chat_template

The scorer is the zoo's own (`zoo.pipelines.eval`: normalized exact match, token F1 or WER, the
family's metric by default) and the prompt is the sample's instruction; with the chat template
applied (lm-eval `--apply_chat_template`; the lmms-eval `zoo` model applies it itself) the
harness sees what `zoo eval` sees. Your own benchmark: write the same JSONL (or edit
`dataset_kwargs.data_files` to point at it) and keep the YAML.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

HARNESSES = ("lm-eval", "lmms-eval")

# The zoo's scorers, restated without the zoo (tests/test_harness.py checks they agree with
# zoo.pipelines.eval on a battery of strings).
_UTILS = '''"""Scorer{visual_doc} for the local task {name!r}, written by moe-zoo (zoo.pipelines.harness.tasks).

Standalone (no zoo import): the same normalization and metrics as `zoo.pipelines.eval`.
"""

import collections
import re
import string
from pathlib import Path

METRIC = {metric!r}
HERE = Path(__file__).resolve().parent
_PUNCT = re.compile(f"[{{re.escape(string.punctuation)}}]")


def normalize(text):
    """Lowercase, drop punctuation, collapse whitespace."""
    return " ".join(_PUNCT.sub(" ", str(text).lower()).split())


def exact_match(prediction, reference):
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction, reference):
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def wer(prediction, reference):
    hyp, ref = normalize(prediction).split(), normalize(reference).split()
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, 1):
        current = [i]
        for j, hyp_word in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word)))
        previous = current
    return previous[-1] / max(len(ref), 1)


SCORERS = {{"exact_match": exact_match, "accuracy": exact_match, "token_f1": token_f1, "wer": wer}}


def process_results(doc, results):
    prediction = results[0] if results else ""
    return {{METRIC: SCORERS[METRIC](prediction, doc["answer"])}}


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["instruction"]


def decode_wav(path):
    """A PCM WAV file -> {{"array": mono float32 in [-1, 1], "sampling_rate": rate}} (as the zoo decodes it)."""
    import wave

    import numpy as np

    with wave.open(str(path), "rb") as w:
        channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
        raw = w.readframes(w.getnframes())
    if width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 4:
        x = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 2147483648.0
    else:
        raise ValueError(f"{{path}}: unsupported WAV sample width {{width}} bytes")
    if channels > 1:
        x = x[: len(x) // channels * channels].reshape(-1, channels).mean(axis=1)
    return {{"array": x.astype(np.float32), "sampling_rate": rate}}


def doc_to_visual(doc):
    """The sample's media in order: PIL images and audio dicts (paths are relative to this folder)."""
    from PIL import Image

    out = []
    for rel in doc.get("media") or []:
        path = Path(rel) if Path(rel).is_absolute() else HERE / rel
        if path.suffix.lower() == ".wav":
            out.append(decode_wav(path))
        else:
            with Image.open(path) as im:
                out.append(im.convert("RGB"))
    return out
'''


def _yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a YAML string


def _metric_lines(metric: str) -> str:
    higher = "false" if metric == "wer" else "true"
    return f"metric_list:\n  - metric: {metric}\n    aggregation: mean\n    higher_is_better: {higher}\n"


def write_task(samples: Sequence, out_dir: str | os.PathLike, *, name: str, harness: str = "lm-eval",
               metric: str | None = None, max_new_tokens: int = 12, split: str = "test") -> Path:
    """Write samples as a local generation task folder `out_dir/name/` (replaced if present).

    Args:
        samples: `zoo.pipelines.data.schema.Sample`s (or anything with `key`, `instruction`, `answer`,
            `media` of `(kind, data)` items and an optional `subtype`), all of one task family.
        out_dir: where the task folder goes (pass it to the harness as `--include_path`).
        name: the task's name (letters, digits, `_`, `-`).
        harness: "lm-eval" (text only) or "lmms-eval" (`doc_to_visual` gives the media).
        metric: a scorer of `zoo.pipelines.eval.SCORERS` (default: the family's `METRIC_OF_FAMILY`).
        max_new_tokens: greedy generation length (`zoo eval`'s default is 12).
        split: the split name the task's data file is registered under.

    Returns:
        The task folder.

    Raises:
        ValueError: no samples, an unknown harness or metric, several families, or media for lm-eval.
    """
    from zoo.io.names import check_name
    from zoo.pipelines.eval import METRIC_OF_FAMILY, SCORERS

    if harness not in HARNESSES:
        raise ValueError(f"unknown harness {harness!r}; known: {list(HARNESSES)}")
    if not samples:
        raise ValueError(f"task {name!r}: no samples to write")
    check_name(name, "task name")
    families = sorted({getattr(s, "task_family", "") for s in samples})
    if len(families) != 1:
        raise ValueError(f"task {name!r}: samples of several task families {families}; write one task per family")
    family = families[0]
    metric = metric or METRIC_OF_FAMILY.get(family, "exact_match")
    if metric not in SCORERS:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(SCORERS)}")
    with_media = [s.key for s in samples if s.media]
    if harness == "lm-eval" and with_media:
        raise ValueError(f"task {name!r}: {len(with_media)} {family} samples have images or audio (e.g. {with_media[0]!r}); "
                         "lm-eval tasks here are text only: write an lmms-eval task (--harness lmms-eval)")
    folder = _fresh(Path(out_dir) / name)
    rows = []
    for s in samples:
        paths = []
        for i, m in enumerate(s.media):
            kind, data = (m.kind, m.data)
            rel = f"media/{s.key}-{i}{'.png' if kind == 'image' else '.wav'}"
            (folder / "media").mkdir(exist_ok=True)
            (folder / rel).write_bytes(data)
            paths.append(rel)
        rows.append({"id": s.key, "instruction": s.instruction, "answer": s.answer,
                     "subtype": getattr(s, "subtype", "") or "", "media": paths})
    data_file = folder / f"{split}.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "utils.py").write_text(_UTILS.format(name=name, metric=metric,
                                                   visual_doc=" and doc_to_visual" if harness == "lmms-eval" else ""))
    gen_key = "max_gen_toks" if harness == "lm-eval" else "max_new_tokens"
    lines = [
        f"# {harness} task written by moe-zoo (zoo.pipelines.harness.tasks): {len(rows)} {family} samples, scored",
        f"# with the zoo's {metric}. Point data_files at your own JSONL (same fields) to run your benchmark.",
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    {split}: {_yaml_str(str(data_file.resolve()))}",
        f"test_split: {split}",
        "output_type: generate_until",
        "doc_to_text: !function utils.doc_to_text" if harness == "lmms-eval" else "doc_to_text: instruction",
        "doc_to_target: answer",
    ]
    if harness == "lmms-eval":
        lines.append("doc_to_visual: !function utils.doc_to_visual")
    lines += ["process_results: !function utils.process_results", _metric_lines(metric).rstrip("\n"),
              "generation_kwargs:", "  until: []", f"  {gen_key}: {int(max_new_tokens)}", "  do_sample: false",
              *(["num_fewshot: 0"] if harness == "lm-eval" else []), "metadata:", "  version: 1.0"]
    (folder / f"{name}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_corpus_task(texts: Sequence[str], out_dir: str | os.PathLike, *, name: str = "zoo_corpus",
                      split: str = "test") -> Path:
    """Write plain-text documents as an lm-eval perplexity task (`loglikelihood_rolling`; word and byte
    perplexity and bits per byte, as lm-eval's wikitext task reports them)."""
    from zoo.io.names import check_name

    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"task {name!r}: no non-empty text to write")
    check_name(name, "task name")
    folder = _fresh(Path(out_dir) / name)
    data_file = folder / f"{split}.jsonl"
    data_file.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(texts)),
                         encoding="utf-8")
    text = "\n".join([
        f"# lm-eval perplexity task written by moe-zoo (zoo.pipelines.harness.tasks): {len(texts)} documents.",
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    {split}: {_yaml_str(str(data_file.resolve()))}",
        f"test_split: {split}",
        "output_type: loglikelihood_rolling",
        'doc_to_text: ""',
        "doc_to_target: text",
        "num_fewshot: 0",
        "metric_list:",
        "  - metric: word_perplexity",
        "  - metric: byte_perplexity",
        "  - metric: bits_per_byte",
        "metadata:",
        "  version: 1.0",
        "",
    ])
    (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
    return folder


def write_family_tasks(data_dir: str | os.PathLike, families: Sequence[str], out_dir: str | os.PathLike, *,
                       harness: str | None = None, split: str = "test", limit: int | None = None,
                       max_new_tokens: int = 12, metric: str | None = None, prefix: str = "zoo_") -> list[Path]:
    """One task folder per family from built data (what `zoo eval --data DIR --family F --limit N` scores:
    the family's scored kind of samples, the first `limit` of them).

    `harness` None picks lmms-eval for families with media and lm-eval otherwise. The family
    `corpus` becomes a perplexity task over its validation lines (`limit` of them).
    """
    from zoo.pipelines.datasets import load_datasets
    from zoo.pipelines.eval import SCORED

    written = []
    for family in families:
        if family == "corpus":
            lines = (Path(data_dir) / "corpus" / "val.txt").read_text(encoding="utf-8").splitlines()
            written.append(write_corpus_task([t for t in lines if t.strip()][:limit], out_dir, name=f"{prefix}corpus"))
            continue
        samples = load_datasets(Path(data_dir), {family}, split)[family]
        keep = SCORED.get(family, lambda s: True)
        samples = [s for s in samples if keep(s)][:limit]
        chosen = harness or ("lmms-eval" if any(s.media for s in samples) else "lm-eval")
        written.append(write_task(samples, out_dir, name=f"{prefix}{family}", harness=chosen, metric=metric,
                                  max_new_tokens=max_new_tokens, split=split))
    return written


def _fresh(folder: Path) -> Path:
    import shutil

    if folder.exists():
        if not (folder / "utils.py").exists() and not any(folder.glob("*.yaml")):
            raise FileExistsError(f"{str(folder)!r} exists and is not a task folder written here; choose another --out")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


__all__ = ["HARNESSES", "write_corpus_task", "write_family_tasks", "write_task"]
