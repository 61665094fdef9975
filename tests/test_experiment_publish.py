"""`zoo report`: experiment results into the README's claims, RESULTS.md's tables and the model cards.

The reports are made by the harness's own `summarize`/`write_reports` from per-seed figures chosen
by hand, so every published number is checked against a hand computation of the mean and the
Student-t interval.
"""

import json
import math
from pathlib import Path

import pytest

from zoo.catalog.cards import Catalog, CatalogError, parse_card
from zoo.pipelines.experiment import ExperimentConfig, RunResult, plan
from zoo.pipelines.experiment_publish import (card_metrics, claims_markdown, load_reports, publish_cards,
                                              replace_section, studies_markdown)
from zoo.pipelines.experiment_report import summarize, write_reports

ROOT = Path(__file__).resolve().parents[1]
MICRO = ROOT / "configs" / "experiments" / "micro.yaml"
T_975_DF2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # closed form of t(0.975) at 2 degrees of freedom


def _output(vqa: float, asr: float, experts: float = 2.0) -> dict:
    return {"family": None, "experts_per_token": experts, "active_params": 1000.0, "flops_per_token": 2000.0,
            "trainable_params": 500, "stored_bytes": 4000,
            "families": {"vqa": {"metric": "exact_match", "value": vqa, "baseline": 0.25, "n": 4},
                         "asr": {"metric": "exact_match", "value": asr, "baseline": 0.0, "n": 3}}}


def _report(tmp_path: Path, variants: dict, figures: dict, name: str = "micro") -> Path:
    """Write a report of the micro experiment with `variants`, whose runs gave `figures`:
    variant -> seed -> (vqa, asr)."""
    exp = ExperimentConfig.load(MICRO)
    exp.name, exp.variants = name, variants
    exp.compare = [c for c in exp.compare if c.a in variants and c.b in variants]
    runs = plan(exp)
    results = []
    for r in runs:
        vqa, asr = figures[r.variant][r.seed]
        results.append(RunResult(r.variant, r.seed, {"moe-tune": _output(vqa, asr, 2.0 if r.variant == "top2" else 1.0)}, 10.0))
    report = summarize(exp, results, runs)
    report.update(executed_stages=15, reused_stages=9, wall_s=25.0)
    out = tmp_path / name
    out.mkdir(parents=True)
    write_reports(exp, report, out)
    return out / "results.json"


FIGURES = {"top2": {0: (0.50, 0.30), 1: (0.60, 0.40), 2: (0.70, 0.35)},
           "top1": {0: (0.40, 0.30), 1: (0.45, 0.40), 2: (0.50, 0.35)}}


def _card(cards: Path, stem: str, output: str, recipe: Path = ROOT / "configs" / "recipes" / "micro.yaml") -> Path:
    cards.mkdir(exist_ok=True)
    path = cards / f"{stem}.md"
    path.write_text(f"""---
name: {stem}
version: 1.0.0
task_family: multitask
description: A micro card.
license: apache-2.0
config: {ROOT / 'configs' / 'models' / 'micro-zoo.yaml'}
recipe: {recipe}
output: {output}
metrics:
  vqa/exact_match: {{value: 0.9, dataset: one build, command: "zoo eval {stem} --family vqa"}}
---
# {stem}

Prose stays.
""")
    return path


def test_card_figures_are_the_mean_and_t_interval_over_seeds(tmp_path):
    report = load_reports([_report(tmp_path / "runs", {"top2": {}}, FIGURES)])[0]
    metrics = card_metrics(report, "moe-tune")
    vqa = metrics["vqa/exact_match"]
    # by hand: 0.5, 0.6, 0.7 -> mean 0.6, s = 0.1, half width t(0.975, 2) * 0.1 / sqrt(3)
    half = T_975_DF2 * 0.1 / math.sqrt(3)
    assert vqa["value"] == pytest.approx(0.6) and vqa["interval"] == pytest.approx([0.6 - half, 0.6 + half], abs=1e-4)
    assert vqa["seeds"] == [0, 1, 2] and vqa["dataset"] == "vqa test split, 4 samples"
    assert vqa["command"] == "zoo experiment configs/experiments/micro.yaml"
    assert metrics["asr/majority_baseline"]["value"] == 0.0 and metrics["asr/majority_baseline"]["interval"] == [0.0, 0.0]
    assert set(metrics) == {"vqa/exact_match", "vqa/majority_baseline", "asr/exact_match", "asr/majority_baseline"}
    assert card_metrics(report, "lora-vqa") == {}  # an output the experiment did not measure

    cards = tmp_path / "model_cards"
    measured, other = _card(cards, "micro-moe", "moe-tune"), _card(cards, "micro-vqa", "lora-vqa")
    untouched = other.read_text()
    assert publish_cards([report], cards) == [measured]
    assert other.read_text() == untouched
    card = parse_card(measured)
    m = {x.name: x for x in card.metrics}["vqa/exact_match"]
    assert (m.value, m.seeds) == (pytest.approx(0.6), (0, 1, 2)) and m.interval == pytest.approx((0.6 - half, 0.6 + half), abs=1e-4)
    assert m.inside(0.6) and not m.inside(0.9) and "Prose stays." in card.body
    assert publish_cards([report], cards) == []  # nothing new: nothing rewritten


def test_publishing_refuses_ambiguous_or_failed_experiments(tmp_path):
    two = load_reports([_report(tmp_path / "a", {"top2": {}, "top1": {"stages": {"moe-tune": {"options": {
        "moe": {"router_options": {"top_k": 1}}}}}}}, FIGURES)])[0]
    with pytest.raises(ValueError, match=r"has variants \['top1', 'top2'\]; a card's figures come from an experiment of one variant"):
        card_metrics(two, "moe-tune")
    one = load_reports([_report(tmp_path / "b", {"top2": {}}, FIGURES)])[0]
    again = load_reports([_report(tmp_path / "c", {"top2": {}}, FIGURES, name="micro-again")])[0]
    again["recipe"] = one["recipe"]
    _card(tmp_path / "cards", "micro-moe", "moe-tune")
    with pytest.raises(ValueError, match=r"card micro-moe@1.0.0: output 'moe-tune' is measured by experiments \['micro', 'micro-again'\]"):
        publish_cards([one, again], tmp_path / "cards")
    one["failures"] = [{"variant": "top2", "seed": 1, "error": "boom"}]
    with pytest.raises(ValueError, match="has failed runs"):
        card_metrics(one, "moe-tune")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match=r"bad.json: not a `zoo experiment` report"):
        load_reports([tmp_path / "bad.json"])
    with pytest.raises(FileNotFoundError, match="no results.json"):
        load_reports([tmp_path / "cards"])


def test_claims_and_studies_sections_are_generated_from_the_reports(tmp_path):
    variants = {"top2": {}, "top1": {"stages": {"moe-tune": {"options": {"moe": {"router_options": {"top_k": 1}}}}}}}
    reports = load_reports([_report(tmp_path / "runs", variants, FIGURES).parent.parent])
    claims = claims_markdown(reports, "zoo report runs")
    # the "not worse" claim on vqa: differences 0.10, 0.15, 0.20 -> mean 0.15, s 0.05
    half = T_975_DF2 * 0.05 / math.sqrt(3)
    row = next(line for line in claims.splitlines() if "top-2 is not worse" in line and "| vqa |" in line)
    assert f"| +0.150 | [{0.15 - half:+.3f}, {0.15 + half:+.3f}] | holds |" in row
    flops = next(line for line in claims.splitlines() if "computes more experts" in line and "| asr |" in line)
    assert "| experts_per_token | +1.000 |" in flops and "holds" in flops
    assert "Generated by `zoo report runs`" in claims

    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- zoo report: claims begin -->\nstale text\n<!-- zoo report: claims end -->\n\nafter\n")
    assert replace_section(readme, "claims", claims)
    text = readme.read_text()
    assert "stale text" not in text and row in text and text.endswith("<!-- zoo report: claims end -->\n\nafter\n")
    assert not replace_section(readme, "claims", claims)  # idempotent
    with pytest.raises(ValueError, match=r"README.md: no '<!-- zoo report: studies begin -->'"):
        replace_section(readme, "studies", "x")
    studies = studies_markdown(reports, "zoo report runs")
    assert "### Experiment `micro`" in studies and "| top2 | vqa | exact_match |" in studies


def test_zoo_report_writes_readme_results_and_cards(tmp_path, capsys):
    from zoo.pipelines.cli import main

    _report(tmp_path / "runs", {"top2": {}}, FIGURES)
    _card(tmp_path / "model_cards", "micro-moe", "moe-tune")
    for name, markers in (("README.md", ("claims", "cards")), ("RESULTS.md", ("studies",))):
        (tmp_path / name).write_text("".join(f"<!-- zoo report: {m} begin -->\n<!-- zoo report: {m} end -->\n" for m in markers))
    assert main(["report", str(tmp_path / "runs"), "--readme", str(tmp_path / "README.md"), "--results",
                 str(tmp_path / "RESULTS.md"), "--cards", str(tmp_path / "model_cards")]) == 0
    out = capsys.readouterr().out
    assert "claims section rewritten" in out and "studies section rewritten" in out and "micro-moe.md: figures" in out
    assert "| top2 | vqa | exact_match | 0.600 ±" in (tmp_path / "RESULTS.md").read_text()
    half = T_975_DF2 * 0.1 / math.sqrt(3)
    assert (f"| `micro-moe` | vqa/exact_match | 0.600 | [{0.6 - half:.3f}, {0.6 + half:.3f}] | 0.250 | 3 | "
            "`zoo experiment configs/experiments/micro.yaml` |") in (tmp_path / "README.md").read_text()
    assert {m.name for m in Catalog.from_dir(tmp_path / "model_cards").get("micro-moe").metrics} >= {"vqa/exact_match"}
    assert main(["report", str(tmp_path / "nothing")]) == 1
    assert "no results.json" in capsys.readouterr().err


def test_card_intervals_are_validated(tmp_path):
    def card(metric: str) -> Path:
        p = tmp_path / "c.md"
        p.write_text("---\nname: c\nversion: 1.0.0\ntask_family: vqa\ndescription: d\nlicense: mit\n"
                     f"config: {{lm: {{hidden_size: 32}}}}\nrecipe: r.yaml\noutput: o\nmetrics:\n  acc: {metric}\n---\n")
        return p

    ok = parse_card(card("{value: 0.5, command: c, seeds: [0, 1, 2], interval: [0.4, 0.6]}")).metrics[0]
    assert ok.interval == (0.4, 0.6) and ok.seeds == (0, 1, 2)
    for bad, cause in [("{value: 0.5, command: c, seeds: [0], interval: [0.4, 0.6]}", "not the >= 2 seeds"),
                       ("{value: 0.7, command: c, seeds: [0, 1], interval: [0.4, 0.6]}", "interval must be \\[low, high\\] around"),
                       ("{value: 0.5, command: c, seeds: [0, 0]}", "seeds must be a list of distinct integers"),
                       ("{value: 0.5, command: c, spread: 1}", "must have only name, value, command, dataset, seeds, interval")]:
        with pytest.raises(CatalogError, match=cause):
            parse_card(card(bad))


def test_the_demo_says_where_a_build_falls_against_the_published_interval():
    from zoo.catalog.cards import Metric
    from zoo.pipelines.demo import _published

    over_seeds = Metric("vqa/exact_match", 0.5, "c", seeds=(0, 1, 2), interval=(0.4, 0.6))
    assert _published(over_seeds, 0.45) == "0.500 [0.400, 0.600] inside"
    assert _published(over_seeds, 0.7).endswith("above") and _published(over_seeds, 0.3).endswith("below")
    assert _published(Metric("x", 0.5, "c"), 0.1) == "0.500 (one build)" and _published(None, 0.1) == "–"


def test_claim_differences_are_formatted_by_size_and_a_zero_spread_is_marked():
    from zoo.pipelines.experiment_report import signed, signed_interval

    assert signed(-0.0301) == "-0.030" and signed(256882.0) == "+256.9k" and signed(-2.5e6) == "-2.50M"
    assert signed_interval({"mean": -256882.0, "low": -265829.7, "high": -247934.3}) == "[-265.8k, -247.9k]"
    assert signed_interval({"mean": -0.03, "low": -0.03 - 1e-17, "high": -0.03 + 1e-17}) == "[-0.030, -0.030] (same every seed)"
    assert signed_interval({"mean": -0.03, "low": -0.031, "high": -0.029}) == "[-0.031, -0.029]"
    assert signed_interval({"low": None, "high": None}) == "–"


def test_results_md_flags_stages_trained_at_more_than_one_thread_count(tmp_path):
    from zoo.pipelines.experiment_report import results_markdown

    report = json.loads(_report(tmp_path, {"top2": {}, "top1": {}}, FIGURES).read_text())
    machine = {"cpu": "x", "cores": 2, "torch": "t", "transformers": "tf", "threads": 1}
    one = results_markdown({**report, "machine": {**machine, "stage_threads": [1]}})
    mixed = results_markdown({**report, "machine": {**machine, "stage_threads": [1, 2]}})
    assert "(stages trained at 1 threads)" in one and "Mixed thread counts" not in one
    assert "(stages trained at 1, 2 threads)" in mixed and "**Mixed thread counts**" in mixed


def test_the_shipped_cards_figures_come_from_the_card_experiments():
    """Every tiny-zoo card's task figures are means over >= 3 seeds with an interval, from the
    experiment that measured them (written by `zoo report --cards`, never by hand)."""
    catalog = Catalog.from_dir(ROOT / "model_cards")
    for name in catalog.names():
        card = catalog.get(name)
        if card.recipe != "configs/recipes/tiny-zoo.yaml" or card.base is not None:
            continue
        exp = "tiny-zoo-moe" if card.output == "moe-tune" else "tiny-zoo"
        assert card.metrics, name
        for m in card.metrics:
            assert len(m.seeds) >= 3 and m.interval is not None, (name, m.name)
            assert m.command == f"zoo experiment configs/experiments/{exp}.yaml", (name, m.name)


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    from zoo.pipelines.experiment_report import write_text_atomic

    path = tmp_path / "results.md"
    write_text_atomic(path, "old\n")
    with pytest.raises(TypeError):
        write_text_atomic(path, b"not text")  # fails inside the write, after the temporary exists
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["results.md"]
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n" and len(list(tmp_path.iterdir())) == 1
