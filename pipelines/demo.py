"""The README's main job: build the tiny zoo end to end, load it with `zoo.load`, show what it does.

`zoo build` runs `configs/recipes/tiny-zoo.yaml` (data from Debian packages -> tokenizer ->
pretrain-lm -> align -> specialize -> moe-tune -> per-family LoRA, each output evaluated on its
held-out test split) and installs one versioned checkpoint per task family with its card. Then
every card is loaded back with `zoo.load`, asked one held-out question, and its measured metrics
are printed next to the majority-answer baseline and the card's published figure (mean and 95%
interval over seeds, `zoo experiment configs/experiments/tiny-zoo.yaml`), saying whether this
build falls inside it. A second run finds the zoo built and only loads.

    python -m zoo.pipelines.demo [--rebuild]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import zoo
from zoo.catalog.cards import Catalog
from zoo.catalog.install import install_dir, is_installed, read_card
from zoo.io.hub import zoo_home
from zoo.pipelines.build import build


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None, help="card names (default: every card of the recipe)")
    p.add_argument("--recipe", default="tiny-zoo", help="build the cards whose recipe file has this stem")
    p.add_argument("--cards-dir", default=None, help="model cards directory (default: the cards shipped with moe-zoo)")
    p.add_argument("--rebuild", action="store_true", help="re-run the recipe even if the zoo is built")
    p.add_argument("--resume", action="store_true", help="continue a killed build from its stages' newest checkpoints")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    catalog = Catalog.from_dir(a.cards_dir)
    cards = [catalog.get(n) for n in a.models] if a.models else [
        catalog.get(n) for n in catalog.names() if (c := catalog.get(n)).recipe and Path(c.recipe).stem == a.recipe
    ]
    if not cards:
        raise SystemExit(f"demo: no model card builds from a recipe named {a.recipe!r}")
    t0 = time.time()
    if a.rebuild or not all(is_installed(c) for c in cards):
        print(f"building {', '.join(c.ref for c in cards)} from {cards[0].recipe} (one run builds them all)")
        build(cards[0].name, str(cards[0].version), force=a.rebuild, resume=a.resume, cards_dir=a.cards_dir)
        print(f"built in {time.time() - t0:.0f}s")
    rows = []
    for card in cards:
        model, processor = zoo.load(card.name, card.version, cards_dir=a.cards_dir)
        metrics = {m["name"]: m for m in read_card(install_dir(card))["metrics"]}  # measured by the build
        example = _ask(model, processor, card.task_family, zoo_home() / "runs" / Path(card.recipe).stem / "data")
        published = {m.name: m for m in card.metrics}  # the card's: mean and interval over seeds
        for name, m in metrics.items():
            if not name.endswith("majority_baseline"):
                base = metrics.get(name.split("/")[0] + "/majority_baseline", {}).get("value")
                boot = m.get("bootstrap")
                dataset = m.get("dataset", "") + (f"; bootstrap 95% [{boot[0]:.3f}, {boot[1]:.3f}]" if boot else "")
                rows.append((card.ref, name, m["value"], base, _published(published.get(name), m["value"]),
                             dataset, example))
    print(f"\n{'model':<28} {'metric':<30} {'value':>7} {'baseline':>8}  {'published (card)':<32} measured on")
    for ref, name, value, base, pub, dataset, _ in rows:
        print(f"{ref:<28} {name:<30} {value:7.3f} {base if base is not None else float('nan'):8.3f}  {pub:<32} {dataset}")
    print("\none held-out example per model (loaded with zoo.load):")
    for ref, example in dict((r[0], r[6]) for r in rows).items():
        print(f"  {ref:<24} {example}")
    print(f"\nexpert load by task family (PNG): {zoo_home() / 'runs' / Path(cards[0].recipe).stem}/*/expert_load.png")
    print(f"total {time.time() - t0:.0f}s")


def _published(metric, value: float) -> str:
    """The card's figure for this metric and whether this build's `value` lies in its interval."""
    if metric is None:
        return "–"
    if metric.interval is None:
        return f"{metric.value:.3f} (one build)"
    lo, hi = metric.interval
    where = "inside" if metric.inside(value) else ("below" if value < lo else "above")
    return f"{metric.value:.3f} [{lo:.3f}, {hi:.3f}] {where}"


def _ask(model, processor, family: str, data_dir: Path) -> str:
    """Answer the first held-out test sample of `family` from the run's data."""
    from zoo.pipelines.eval import SCORED, generate_answers
    from zoo.pipelines.datasets import load_datasets

    if not (data_dir / family).is_dir():  # a multitask model: ask it a vqa question
        family = "vqa"
    if not (data_dir / family).is_dir():
        return f"(no {family} data under {data_dir})"
    keep = SCORED.get(family, lambda s: True)
    sample = next(s for s in load_datasets(data_dir, {family}, "test")[family] if keep(s))
    answer = generate_answers(model, processor, [sample], quiet=True)[0]  # one answer: no bar
    media = "".join(f"[{m.kind}]" for m in sample.media)
    return f"{media} {sample.instruction[:60]!r} -> {answer!r} (reference {sample.answer!r})"


if __name__ == "__main__":
    main()
