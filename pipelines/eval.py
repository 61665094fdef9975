"""Per-task-family evaluation on held-out splits: greedy generation scored against the answers.

Metrics: exact match (normalized) for `vqa`, `easyvqa` and `asr`; accuracy on the closed-answer
questions for `text` (WordNet category of a definition, multiple choice); SQuAD-style token F1 for
`caption`; word error rate (`wer`, lower is better) on request (`evaluate(..., metric="wer")`, or
`score` on predictions already generated). Each result carries a majority-answer baseline from the
training split, so "above chance" is a number, not a claim. Samples with a `subtype` (easy-VQA's
question types; spoken words' seen/unseen voices) are also scored per subtype, beside the overall
figure.

    zoo eval RUN/lora/vqa/model --family vqa        (or python -m zoo.pipelines.eval --checkpoint ...)
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

from zoo.pipelines.collate import collate
from zoo.progress import progress

METRIC_OF_FAMILY = {"vqa": "exact_match", "easyvqa": "exact_match", "asr": "exact_match", "text": "accuracy",
                    "caption": "token_f1"}
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


def word_edit_distance(hypothesis: Sequence[str], reference: Sequence[str]) -> int:
    """Levenshtein distance between two word sequences: the fewest substitutions, deletions and
    insertions that turn `reference` into `hypothesis`."""
    previous = list(range(len(hypothesis) + 1))  # distances from the empty reference prefix
    for i, ref_word in enumerate(reference, 1):
        current = [i]
        for j, hyp_word in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word)))
        previous = current
    return previous[-1]


def wer(prediction: str, reference: str) -> float:
    """Word error rate of one utterance: word edit distance / reference words, on normalized text.

    Lower is better; it exceeds 1 when the prediction has more wrong words than the reference has
    words. Averaged over samples (as `evaluate` does) it is the mean per-utterance WER, which
    equals the corpus WER (total edits / total reference words) when all references have one word.
    An empty reference scores the prediction's word count.
    """
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    return word_edit_distance(pred, ref) / max(len(ref), 1)


SCORERS = {"exact_match": exact_match, "accuracy": exact_match, "token_f1": token_f1, "wer": wer}


@torch.no_grad()
def generate_answers(model, processor, samples: Sequence, *, batch_size: int = 16, max_new_tokens: int = 12,
                     quiet: bool | None = None, desc: str = "eval") -> list[str]:
    """Greedy answers of `model` to each sample's prompt (and media).

    Args:
        quiet: the progress bar over batches (`zoo.progress.progress`: None shows it on a terminal).
        desc: the bar's label.
    """
    model.eval()
    tok = processor.tokenizer
    answers = []
    for start in progress(range(0, len(samples), batch_size), desc=desc, unit="batch", quiet=quiet):
        batch = collate(samples[start : start + batch_size], processor, with_answers=False)
        new = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        answers += [tok.decode(row, skip_special_tokens=True).strip() for row in new]
    return answers


def bootstrap_interval(scores: Sequence[float], resamples: int = 1000, *, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean over test items (Efron's percentile method).

    Resamples the per-item scores with replacement `resamples` times (a seeded generator, so one
    build's interval is reproducible) and takes the `(1 - level) / 2` and `(1 + level) / 2`
    quantiles of the resampled means. It measures the test set's sampling error for this one
    model, not the seed-to-seed spread of training.

    Args:
        scores: `[n]` per-item scores.
        resamples: bootstrap resamples B.
        seed: the generator's seed.
        level: the interval's coverage.

    Returns:
        `(low, high)`.
    """
    import numpy as np

    x = np.asarray(scores, dtype=np.float64)
    if x.size == 0 or resamples < 1:
        raise ValueError(f"bootstrap_interval: need scores and resamples >= 1, got {x.size} scores, {resamples} resamples")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))  # [B, n]
    means = x[idx].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def perplexity(lm, tokenizer, texts: Sequence[str], *, batch_size: int = 8, max_length: int = 256) -> float:
    """Token-level perplexity `exp(sum NLL / tokens)` of a causal LM on plain text lines (no template).

    Args:
        lm: a causal LM taking `input_ids`, `attention_mask` and returning `.logits [B, S, V]`
            (a transformers LM, or our `MoECausalLM`).
        tokenizer: its tokenizer.
        texts: the lines; each is scored on its own (truncated to `max_length` tokens).
    """
    lm.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt", padding_side="right")
            logits = lm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()  # [B, S, V]
            targets = enc["input_ids"][:, 1:]
            keep = enc["attention_mask"][:, 1:].bool()
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets[..., None])[..., 0]  # [B, S-1]
            nll -= float(logp[keep].double().sum())
            count += int(keep.sum())
    if count == 0:
        raise ValueError("perplexity: the texts hold no token to predict")
    return float(torch.tensor(nll / count, dtype=torch.float64).exp())


_BASE_PERPLEXITY: dict[tuple, float] = {}


def base_perplexity(weights: str, tokenizer, texts: Sequence[str]) -> float:
    """The pretrained LM's own perplexity on `texts` (its original vocabulary, no placeholders), once per process."""
    from transformers import AutoModelForCausalLM

    from zoo.models.pretrained import weights_dir

    key = (weights, tuple(texts))
    if key not in _BASE_PERPLEXITY:
        lm = AutoModelForCausalLM.from_pretrained(str(weights_dir(weights)), local_files_only=True, dtype=torch.float32)
        _BASE_PERPLEXITY[key] = perplexity(lm, tokenizer, texts)
    return _BASE_PERPLEXITY[key]


def majority_baseline(train: Sequence, test: Sequence, metric: str) -> float:
    """Score of always answering the most common training answer."""
    if not train or not test:
        return 0.0
    guess = collections.Counter(normalize(s.answer) for s in train).most_common(1)[0][0]
    return sum(SCORERS[metric](guess, s.answer) for s in test) / len(test)


def score(samples: Sequence, predictions: Sequence[str], metric: str, train: Sequence = (), *,
          bootstrap: int = 0) -> dict:
    """Score predictions already generated for `samples` (one generation, several metrics).

    Returns:
        `{"metric", "value", "n", "baseline"}`, plus `"by_subtype": {subtype: {"value", "n",
        "baseline"}}` when any sample has a `subtype` (a subtype's baseline is the majority answer
        of the training samples of that subtype, or of all of them when it has none, e.g. voices
        held out of training). With `bootstrap` B > 0, each value also gets `"bootstrap": [low, high]`,
        its 95% percentile bootstrap interval over the test items (`bootstrap_interval`).
    """
    if metric not in SCORERS:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(SCORERS)}")
    if not samples or len(predictions) != len(samples):
        raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples (need as many, at least one)")
    scores = [SCORERS[metric](p, s.answer) for p, s in zip(predictions, samples)]
    out = {"metric": metric, "value": round(sum(scores) / len(scores), 4), "n": len(samples),
           "baseline": round(majority_baseline(train, samples, metric), 4)}

    def interval(values):
        return {"bootstrap": [round(v, 4) for v in bootstrap_interval(values, bootstrap)]} if bootstrap else {}

    out.update(interval(scores))
    subtypes = sorted({s.subtype for s in samples if s.subtype})
    if subtypes:
        out["by_subtype"] = {}
        for t in subtypes:
            mine = [x for x, s in zip(scores, samples) if s.subtype == t]
            train_t = [s for s in train if s.subtype == t] or train
            out["by_subtype"][t] = {"value": round(sum(mine) / len(mine), 4), "n": len(mine),
                                    "baseline": round(majority_baseline(train_t, [s for s in samples if s.subtype == t], metric), 4),
                                    **interval(mine)}
    return out


def evaluate(model, processor, samples: Sequence, *, family: str, train: Sequence = (), batch_size: int = 16,
             max_new_tokens: int = 12, quiet: bool | None = None, metric: str | None = None,
             bootstrap: int = 0) -> dict:
    """Score `model` on `samples` of one task family (a progress bar labelled `eval <family>`; see
    `zoo.progress.progress` for `quiet`).

    Args:
        metric: a name in `SCORERS` (default: the family's, `METRIC_OF_FAMILY`), e.g. ``"wer"`` for `asr`.

    Returns:
        `{"family", "metric", "value", "n", "baseline", "examples": [(prompt, prediction, answer), ...3]}`,
        plus `"by_subtype"` when the samples have subtypes (see `score`).
    """
    if family not in METRIC_OF_FAMILY:
        raise ValueError(f"no metric for task family {family!r}; known: {sorted(METRIC_OF_FAMILY)}")
    if not samples:
        raise ValueError(f"no {family} samples to evaluate")
    metric = metric or METRIC_OF_FAMILY[family]
    if metric not in SCORERS:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(SCORERS)}")
    keep = SCORED.get(family, lambda s: True)
    samples = [s for s in samples if keep(s)]
    train = [s for s in train if keep(s)]
    if not samples:
        raise ValueError(f"no {family} samples of the scored kind to evaluate")
    predictions = generate_answers(model, processor, samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   quiet=quiet, desc=f"eval {family}")
    scored = score(samples, predictions, metric, train, bootstrap=bootstrap)
    return {
        "family": family,
        **{k: scored[k] for k in ("metric", "value", "n", "baseline", "bootstrap") if k in scored},
        "examples": [[s.instruction, p, s.answer] for s, p in list(zip(samples, predictions))[:3]],
        **({"by_subtype": scored["by_subtype"]} if "by_subtype" in scored else {}),
    }


def evaluate_outputs(recipe, model, processor, datasets, families, output: str) -> dict[str, dict]:
    """A recipe output's held-out metrics per family: `{"<family>/<metric>": {value, command, dataset}}`.

    Scores at most `recipe.eval.limit` scored-kind test samples per family (nothing if the recipe
    has no `eval`), with the majority-answer baseline beside each metric, and the `zoo eval`
    command that re-measures it. A family whose samples have subtypes also gets
    `"<family>/<metric>/<subtype>"` per subtype (e.g. `easyvqa/exact_match/color`), measured on
    the same samples.
    """
    if recipe.eval is None:
        return {}
    out = {}
    for family in sorted(f for f in families if f in METRIC_OF_FAMILY):
        keep = SCORED.get(family, lambda s: True)
        test = [s for s in datasets.test[family] if keep(s)][: recipe.eval.limit]  # limit what is scored
        metric = recipe.eval.metrics.get(family)
        r = evaluate(model, processor, test, family=family, train=datasets[family],
                     max_new_tokens=recipe.eval.max_new_tokens, metric=metric, bootstrap=recipe.eval.bootstrap)
        command = (f"zoo eval RUN/{output} --family {family}"
                   + (f" --limit {recipe.eval.limit}" if recipe.eval.limit else "")
                   + (f" --metric {metric}" if metric else "")
                   + f"  # RUN: the run directory of recipe {recipe.name} ($ZOO_HOME/runs/{recipe.name} for zoo build)")
        dataset = f"{family} test split, {r['n']} samples"
        boot = {"bootstrap": r["bootstrap"]} if "bootstrap" in r else {}
        out[f"{family}/{r['metric']}"] = {"value": r["value"], "command": command, "dataset": dataset, **boot}
        out[f"{family}/majority_baseline"] = {"value": r["baseline"], "command": command, "dataset": dataset}
        for subtype, t in r.get("by_subtype", {}).items():
            out[f"{family}/{r['metric']}/{subtype}"] = {
                "value": t["value"], "command": command, "dataset": f"{family} test split, {t['n']} {subtype} samples",
                **({"bootstrap": t["bootstrap"]} if "bootstrap" in t else {})}
    heldout = getattr(datasets, "heldout_text", None)
    if recipe.eval.perplexity and heldout:
        out.update(retention_metrics(recipe, model, processor, heldout, output))
    return out


def retention_metrics(recipe, model, processor, texts: Sequence[str], output: str) -> dict[str, dict]:
    """Held-out English perplexity of an output's LM, and of the pretrained LM it started from (when it
    did) with their ratio: what the multimodal training cost the LM (`retention/*`)."""
    command = f"zoo eval RUN/{output} --perplexity {len(texts)}  # RUN: the run directory of recipe {recipe.name}"
    dataset = f"corpus validation split, first {len(texts)} lines"
    lm = model.language_model
    ppl = perplexity(lm, processor.tokenizer, texts)
    out = {"retention/perplexity": {"value": round(ppl, 4), "command": command, "dataset": dataset}}
    weights = recipe.model.lm.weights
    if weights is not None:
        base = base_perplexity(weights, processor.tokenizer, texts)
        out["retention/perplexity_pretrained"] = {"value": round(base, 4), "command": command, "dataset": dataset}
        out["retention/perplexity_ratio"] = {"value": round(ppl / base, 4), "command": command, "dataset": dataset}
    return out


def find_run_data(checkpoint: Path) -> Path | None:
    """The `data/` directory of the run a stage output sits in (`RUN/<stage>[/<family>]/model`), if any."""
    for parent in Path(checkpoint).resolve().parents:
        if (parent / "data").is_dir() and (parent / "tokenizer").is_dir():
            return parent / "data"
    return None


def evaluate_checkpoint(checkpoint: Path, families: list[str], *, data_dir: Path | None = None, split: str = "test",
                        limit: int | None = None, max_new_tokens: int = 12, quiet: bool | None = None,
                        metric: str | None = None, bootstrap: int = 0, perplexity_lines: int = 0) -> list[dict]:
    """Load a model directory and score it on each family's `split` (what `zoo eval` runs).

    Args:
        checkpoint: a model directory (`zoo.io.model_dir`), e.g. a recipe output or an installed card.
        families: task families to score.
        data_dir: the built data; default: the `data/` of the run the checkpoint sits in.
        split: which split to score.
        limit: score at most this many scored-kind samples per family.
        max_new_tokens: greedy generation length.
        quiet: progress bars (`zoo.progress.progress`: None shows them on a terminal).
        metric: score every family with this metric instead of its own (e.g. "wer").
        bootstrap: resamples for each figure's 95% bootstrap interval over test items (0: none).
        perplexity_lines: also measure held-out English perplexity on the first N lines of the
            corpus' validation split (and the pretrained LM's, when the model starts from one).

    Raises:
        FileNotFoundError: no data directory given and none found beside the checkpoint.
    """
    from zoo.catalog.load import load_directory
    from zoo.pipelines.datasets import load_datasets

    data = Path(data_dir) if data_dir is not None else find_run_data(checkpoint)
    if data is None:
        raise FileNotFoundError(f"no data directory for {str(checkpoint)!r}: pass --data (the built data of its run, "
                                "or `python -m zoo.pipelines.data build --out DIR`)")
    model, processor, cfg = load_directory(checkpoint)
    unknown = sorted(set(families) - set(METRIC_OF_FAMILY))
    if unknown:
        raise ValueError(f"no metric for task family {unknown}; known: {sorted(METRIC_OF_FAMILY)}")
    test = load_datasets(data, set(families), split)
    train = load_datasets(data, set(families), "train")
    results = []
    for family in families:
        keep = SCORED.get(family, lambda s: True)
        samples = [s for s in test[family] if keep(s)][:limit]  # the limit counts scored samples
        results.append(evaluate(model, processor, samples, family=family, train=train[family],
                                max_new_tokens=max_new_tokens, quiet=quiet, metric=metric, bootstrap=bootstrap))
    if perplexity_lines:
        texts = heldout_text(data, perplexity_lines)
        ppl = perplexity(model.language_model, processor.tokenizer, texts)
        result = {"perplexity": round(ppl, 4), "n": len(texts)}
        if cfg.lm.weights is not None:
            base = base_perplexity(cfg.lm.weights, processor.tokenizer, texts)
            result.update(perplexity_pretrained=round(base, 4), perplexity_ratio=round(ppl / base, 4))
        results.append(result)
    return results


def heldout_text(data_dir: Path, lines: int) -> list[str]:
    """The first `lines` non-empty lines of the corpus' validation split (held-out English)."""
    path = Path(data_dir) / "corpus" / "val.txt"
    if not path.is_file():
        raise FileNotFoundError(f"no held-out corpus at {str(path)!r}: build the data with the corpus family")
    return [t for t in path.read_text().splitlines() if t.strip()][:lines]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a model directory (stage output or installed card)")
    p.add_argument("--data", help="built data directory (default: the data of the checkpoint's run)")
    p.add_argument("--family", action="append", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="score at most this many (scored-kind) samples")
    p.add_argument("--quiet", action="store_true", help="no progress bar (also ZOO_QUIET=1)")
    a = p.parse_args(argv)
    for r in evaluate_checkpoint(Path(a.checkpoint), a.family, data_dir=a.data, split=a.split, limit=a.limit,
                                 quiet=a.quiet or None):
        print(json.dumps(r))


if __name__ == "__main__":
    import sys

    from zoo.cli import report_errors
    from zoo.pipelines.cli import ERRORS

    sys.exit(report_errors("zoo.pipelines.eval", main, ERRORS))
