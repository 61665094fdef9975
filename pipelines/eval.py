"""Per-task-family evaluation on held-out splits: greedy generation scored against the answers.

Metrics: exact match (normalized) for `vqa` and `asr`; accuracy on the closed-answer questions
for `text` (WordNet category of a definition, multiple choice); SQuAD-style token F1 for `caption`. Each result carries a majority-answer baseline from the training split, so "above
chance" is a number, not a claim.

    python -m zoo.pipelines.eval --checkpoint RUN/lora/vqa/model --data RUN/data --family vqa
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import string
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from zoo.pipelines.collate import collate

METRIC_OF_FAMILY = {"vqa": "exact_match", "asr": "exact_match", "text": "accuracy", "caption": "token_f1"}
# Which samples a family is scored on. text: its closed-answer questions (WordNet category of a
# definition, or 4-option multiple choice); its open "Define: X" / "What word means" questions
# train the LM but ask a tiny model to produce words it has never seen.
SCORED = {"text": lambda s: s.instruction.startswith("What kind of thing is:") or "Options:" in s.instruction}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall (bag of normalized words)."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


SCORERS = {"exact_match": exact_match, "accuracy": exact_match, "token_f1": token_f1}


@torch.no_grad()
def generate_answers(model, processor, samples: Sequence, *, batch_size: int = 16, max_new_tokens: int = 12,
                     progress: bool = False) -> list[str]:
    """Greedy answers of `model` to each sample's prompt (and media)."""
    model.eval()
    tok = processor.tokenizer
    answers = []
    for start in tqdm(range(0, len(samples), batch_size), desc="eval", disable=not progress):
        batch = collate(samples[start : start + batch_size], processor, with_answers=False)
        new = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        answers += [tok.decode(row, skip_special_tokens=True).strip() for row in new]
    return answers


def majority_baseline(train: Sequence, test: Sequence, metric: str) -> float:
    """Score of always answering the most common training answer."""
    if not train or not test:
        return 0.0
    guess = collections.Counter(normalize(s.answer) for s in train).most_common(1)[0][0]
    return sum(SCORERS[metric](guess, s.answer) for s in test) / len(test)


def evaluate(model, processor, samples: Sequence, *, family: str, train: Sequence = (), batch_size: int = 16,
             max_new_tokens: int = 12, progress: bool = False) -> dict:
    """Score `model` on `samples` of one task family.

    Returns:
        `{"family", "metric", "value", "n", "baseline", "examples": [(prompt, prediction, answer), ...3]}`.
    """
    if family not in METRIC_OF_FAMILY:
        raise ValueError(f"no metric for task family {family!r}; known: {sorted(METRIC_OF_FAMILY)}")
    if not samples:
        raise ValueError(f"no {family} samples to evaluate")
    metric = METRIC_OF_FAMILY[family]
    keep = SCORED.get(family, lambda s: True)
    samples = [s for s in samples if keep(s)]
    train = [s for s in train if keep(s)]
    if not samples:
        raise ValueError(f"no {family} samples of the scored kind to evaluate")
    predictions = generate_answers(model, processor, samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   progress=progress)
    scores = [SCORERS[metric](p, s.answer) for p, s in zip(predictions, samples)]
    return {
        "family": family,
        "metric": metric,
        "value": round(sum(scores) / len(scores), 4),
        "n": len(samples),
        "baseline": round(majority_baseline(train, samples, metric), 4),
        "examples": [[s.instruction, p, s.answer] for s, p in list(zip(samples, predictions))[:3]],
    }


def main(argv: list[str] | None = None) -> None:
    from zoo.pipelines.runner import load_datasets, load_model
    from zoo.processor import MultimodalProcessor
    from zoo.tokenizer import load_tokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a stage output directory")
    p.add_argument("--data", required=True, help="built data directory")
    p.add_argument("--family", action="append", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="score at most this many (scored-kind) samples")
    a = p.parse_args(argv)
    model, _ = load_model(Path(a.checkpoint))
    processor = MultimodalProcessor.from_model(model, load_tokenizer(Path(a.checkpoint) / "tokenizer"))
    test = load_datasets(Path(a.data), set(a.family), a.split)
    train = load_datasets(Path(a.data), set(a.family), "train")
    for family in a.family:
        keep = SCORED.get(family, lambda s: True)
        samples = [s for s in test[family] if keep(s)][: a.limit]  # --limit counts scored samples
        r = evaluate(model, processor, samples, family=family, train=train[family], progress=True)
        print(json.dumps(r))


if __name__ == "__main__":
    import sys

    from zoo.cli import report_errors
    from zoo.pipelines.run import USER_ERRORS

    sys.exit(report_errors("zoo.pipelines.eval", main, USER_ERRORS))
