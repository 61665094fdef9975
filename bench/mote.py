"""MoTE on the tiny zoo: find the experts speech inputs use, switch them off, score asr and vqa.

fTRI (`zoo.inference.attribute_experts`) on the MoE base model's language model: behaviour set =
asr training prompts (spoken words, their audio tokens spliced in), contrast set = vqa training
prompts (Fashion-MNIST images). Per MoE layer the experts are ranked by how much more often asr
tokens choose them; then, for each n, the top-n experts of every layer are switched off
(`override_routing(disable=...)`) and asr / vqa are scored on their held-out test splits with the
project's scorers (`zoo.pipelines.eval.evaluate`, exact match), next to two controls: the top-n
experts of the reverse attribution (vqa against asr), and n random experts per layer (the mean and
range over `--random-draws` draws, seeded).

    python bench/mote.py                                  # the installed tiny-zoo-moe card
    python bench/mote.py --checkpoint RUN/moe-tune/model --data RUN/data --limit 100
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import time
from pathlib import Path

import torch
import transformers

import zoo
from zoo.catalog.load import load_directory
from zoo.inference import attribute_experts, override_routing
from zoo.pipelines.collate import collate
from zoo.pipelines.datasets import load_datasets
from zoo.pipelines.eval import evaluate

FAMILIES = ("asr", "vqa")


def batches(samples, processor, size: int):
    for start in range(0, len(samples), size):
        yield collate(samples[start: start + size], processor, with_answers=False)


def main() -> None:
    home = Path(os.environ.get("ZOO_HOME", Path.home() / ".cache" / "zoo"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-zoo-moe", help="an installed card (ignored with --checkpoint)")
    ap.add_argument("--checkpoint", help="a model directory instead of a card")
    ap.add_argument("--data", default=str(home / "runs" / "tiny-zoo" / "data"), help="the built data of the run")
    ap.add_argument("--attribution-samples", type=int, default=200, help="training prompts per set for fTRI")
    ap.add_argument("--limit", type=int, default=200, help="test samples scored per family")
    ap.add_argument("--top", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--random-draws", type=int, default=5, help="random-expert controls per n")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.checkpoint:
        model, processor, _ = load_directory(args.checkpoint)
        what = args.checkpoint
    else:
        model, processor = zoo.load(args.model)
        what = args.model
    lm = model.language_model
    data = Path(args.data)
    train = load_datasets(data, set(FAMILIES), "train")
    test = load_datasets(data, set(FAMILIES), "test")
    test = {f: test[f][: args.limit] for f in FAMILIES}

    n_attr = args.attribution_samples
    asr_prompts, vqa_prompts = train["asr"][:n_attr], train["vqa"][:n_attr]
    fmri = attribute_experts(model, batches(asr_prompts, processor, 16), batches(vqa_prompts, processor, 16), within=lm)
    reverse = attribute_experts(model, batches(vqa_prompts, processor, 16), batches(asr_prompts, processor, 16), within=lm)

    def score(disable=None) -> dict[str, float]:
        if disable is None:
            return {f: evaluate(model, processor, test[f], family=f, train=train[f], quiet=True)["value"] for f in FAMILIES}
        with override_routing(lm, disable=disable):
            return score()

    rows = [("none", "", score())]
    rng = random.Random(0)
    experts = {layer: len(s) for layer, s in fmri.scores.items()}
    for n in args.top:
        top = fmri.top(n, min_score=-math.inf)  # the n best per layer, even where no expert is asr-specific
        rows.append((f"top-{n} asr experts", str(top), score(top)))
        top_vqa = reverse.top(n, min_score=-math.inf)
        rows.append((f"top-{n} vqa experts", str(top_vqa), score(top_vqa)))
        draws = [score({layer: sorted(rng.sample(range(e), n)) for layer, e in experts.items()})
                 for _ in range(args.random_draws)]
        rows.append((f"{n} random per layer", f"mean of {args.random_draws} draws",
                     {f: sum(d[f] for d in draws) / len(draws) for f in FAMILIES},
                     {f: (min(d[f] for d in draws), max(d[f] for d in draws)) for f in FAMILIES}))

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, cpu")
    print(f"versions: torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}")
    print(f"model: {what}; data: {data}; fTRI on {n_attr} asr vs {n_attr} vqa training prompts "
          f"({fmri.behaviour_tokens} vs {fmri.contrast_tokens} real tokens); scored on {len(test['asr'])} asr / {len(test['vqa'])} vqa test samples")
    print("\nper-layer selection rate asr | vqa | score (asr - vqa), experts 0..E-1")
    for layer, s in fmri.scores.items():
        fmt = lambda t: " ".join(f"{v:.2f}" for v in t.tolist())  # noqa: E731
        print(f"  layer {layer}: {fmt(fmri.behaviour[layer])} | {fmt(fmri.contrast[layer])} | {fmt(s)}"
              f"   ranking {fmri.ranking(layer)}")
    print(f"\n{'switched off':22s} {'experts (layer: ids)':24s} {'asr EM':>7s} {'vqa EM':>7s}")
    for name, which, s, *spread in rows:
        extra = ("   range asr " + "–".join(f"{v:.3f}" for v in spread[0]["asr"])
                 + ", vqa " + "–".join(f"{v:.3f}" for v in spread[0]["vqa"])) if spread else ""
        print(f"{name:22s} {which:24s} {s['asr']:7.3f} {s['vqa']:7.3f}{extra}")
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
