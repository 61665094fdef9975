"""An experiment's report: means and intervals per variant and family, claims, `results.md`, `results.png`.

`summarize` turns the per-run measurements of `zoo.pipelines.experiment` into the report dict that
`results.json` holds; `results_markdown` and `plot_results` render it for a person. The statistics
are `zoo.pipelines.experiment_stats` (Student-t over seeds, paired by seed for claims).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo.pipelines.experiment_stats import Interval, paired_difference, t_interval, verdict

if TYPE_CHECKING:
    from zoo.pipelines.experiment import ExperimentConfig, RunPlan, RunResult

# Efficiency fields measured per output, in the order the table shows them.
# `max_vio`: the LM's MaxVio (max expert load / mean load - 1, DeepSeek's imbalance), mean over its MoE layers.
EFFICIENCY = ("experts_per_token", "max_vio", "active_params", "flops_per_token", "trainable_params", "stored_bytes",
              "wall_s")


def _per_family(results: list[RunResult]) -> dict[str, dict[str, dict[str, dict[int, float]]]]:
    """variant -> family -> field ("task", "baseline", efficiency fields) -> seed -> value."""
    table: dict = {}
    for r in results:
        if r.error:
            continue
        for out in r.outputs.values():
            for family, score in out["families"].items():
                row = table.setdefault(r.variant, {}).setdefault(family, {})
                row.setdefault("task", {})[r.seed] = score["value"]
                row.setdefault("baseline", {})[r.seed] = score["baseline"]
                row.setdefault("_metric", score["metric"])
                for name in EFFICIENCY:
                    value = r.wall_s if name == "wall_s" else out.get(name)
                    if value is not None:
                        row.setdefault(name, {})[r.seed] = float(value)
    return table


def summarize(exp: ExperimentConfig, results: list[RunResult], runs: list[RunPlan]) -> dict[str, Any]:
    """Means and intervals per variant and family, and each claim's paired difference and verdict."""
    from zoo.pipelines.experiment import recipe_path

    table = _per_family(results)
    variants = {}
    for v, families in table.items():
        variants[v] = {}
        for family, row in families.items():
            entry = {"metric": row["_metric"]}
            for name, by_seed in row.items():
                if name == "_metric":
                    continue
                entry[name] = {"per_seed": {str(s): by_seed[s] for s in sorted(by_seed)},
                               **t_interval([by_seed[s] for s in sorted(by_seed)], exp.level).to_dict()}
            variants[v][family] = entry
    claims = []
    for c in exp.compare:
        per_family = {}
        for family in sorted(set(table.get(c.a, {})) & set(table.get(c.b, {}))):
            field_name = c.metric
            a, b = table[c.a][family].get(field_name), table[c.b][family].get(field_name)
            if not a or not b or not set(a) & set(b):
                continue
            diff = paired_difference(a, b, exp.level)
            per_family[family] = {**diff.to_dict(), "verdict": verdict(diff, c.expect, c.margin),
                                  "metric": table[c.a][family]["_metric"] if c.metric == "task" else c.metric}
        claims.append({**dataclasses.asdict(c), "families": per_family})
    equal = {}
    for name, tol in (exp.equal or {}).items():
        for family in sorted({f for fams in variants.values() for f in fams}):
            means = {v: fams[family][name]["mean"] for v, fams in variants.items() if name in fams.get(family, {})}
            if means:
                lo, hi = min(means.values()), max(means.values())
                spread = (hi - lo) / abs(hi) if hi else 0.0
                equal.setdefault(name, {})[family] = {"means": means, "relative_spread": round(spread, 4),
                                                      "tolerance": tol, "equal": spread <= tol}
    return {
        "experiment": exp.name,
        "description": exp.description,
        "seeds": sorted({r.seed for r in runs}),
        "level": exp.level,
        "interval": "Student t over seeds (mean ± t_{(1+level)/2, n-1} s/sqrt(n)); claims: paired by seed",
        "recipe": str(recipe_path(exp)),
        "measured_stage": runs[0].measured.name if runs else None,
        "factor": exp.factor,
        "variants": variants,
        "claims": claims,
        "equal": equal,
        "runs": [dataclasses.asdict(r) for r in results],
        "failures": [{"variant": r.variant, "seed": r.seed, "error": r.error} for r in results if r.error],
    }


def _fmt_num(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.2f}M"
    if abs(value) >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.3g}"


def signed(value: float) -> str:
    """A difference with its sign: 3 decimals for metrics in [0, 1], k/M for counts (FLOPs, parameters)."""
    if abs(value) < 1e3:
        return f"{value:+.3f}"
    return ("+" if value >= 0 else "-") + _fmt_num(abs(value))


def signed_interval(d: dict) -> str:
    """`[low, high]` of a paired difference (`–` without one); a zero-width interval (every seed
    gave the same difference) is marked: the spread over seeds is then no measure of the error."""
    if d.get("low") is None:
        return "–"
    text = f"[{signed(d['low'])}, {signed(d['high'])}]"
    same = abs(d["high"] - d["low"]) <= 1e-9 * max(1.0, abs(d["mean"]))  # up to float rounding
    return text + " (same every seed)" if same else text


def _interval_of(entry: dict) -> Interval:
    return Interval(entry["mean"], entry["low"] if entry["low"] is not None else math.nan,
                    entry["high"] if entry["high"] is not None else math.nan, entry["n"],
                    entry["std"] if entry["std"] is not None else math.nan, entry["level"])


def results_markdown(report: dict) -> str:
    """`results.md`: the table a person reads, the claims with their verdicts, the failures.

    Rendered from the report alone (`results.json`), so `zoo report` can re-render old results.
    """
    verdict_text = {"holds": "holds", "contradicted": "is contradicted", "not shown": "is not shown (the interval spans the boundary)",
                    "one seed": "cannot be judged (one seed)"}
    pct = round(report["level"] * 100)
    lines = [f"# Experiment `{report['experiment']}`", ""]
    if report.get("description"):
        lines += [report["description"].strip(), ""]
    lines += [f"Seeds {report['seeds']}; measured stage `{report['measured_stage']}`; "
              f"{pct}% intervals: Student t over seeds (n-1 degrees of freedom: with 3-5 seeds the spread "
              "is itself uncertain, which a normal interval ignores); claims are paired by seed (variants of "
              "one seed share their common stages). "
              f"Stages run {report.get('executed_stages', '?')}, reused {report.get('reused_stages', '?')}; "
              + (f"wall {report.get('wall_s', '?')} s." if report.get("jobs", 1) == 1 else
                 f"{report['jobs']} processes (`--jobs`) ran the invocation's experiments together; this one's last "
                 f"result was in {report.get('wall_s', '?')} s after its start."), ""]
    if report.get("machine"):
        m = report["machine"]
        trained = ", ".join("unrecorded" if t is None else str(t) for t in m.get("stage_threads", []))
        lines += [f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, transformers {m['transformers']}; "
                  f"{m['threads']} torch threads (stages trained at {trained or '–'} threads).", ""]
        if len(m.get("stage_threads", [])) > 1:
            # The stage key does not name the thread count (a store is shared across machines), and
            # the prefix stages' thread count moved the tiny zoo's asr by -0.16 (README, Threads).
            lines += ["**Mixed thread counts**: this experiment's stages were trained at more than one "
                      "thread count (a store shared by runs at different `OMP_NUM_THREADS`); the thread "
                      "count changes the results, so its variants are not one numerical regime.", ""]
    if report.get("factor"):
        lines += [f"Variants differ only in: {', '.join(f'`{f}`' for f in report['factor'])} (checked).", ""]
    lines += ["| variant | family | metric | mean ± CI | majority baseline | experts/token | MaxVio | active params | "
              "FLOPs/token | trainable params | stored bytes | wall s (from scratch) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v, families in report["variants"].items():
        for family, e in sorted(families.items()):
            eff = [_fmt_num(e[n]["mean"]) if n in e else ("dense" if n in ("experts_per_token", "max_vio") else "–")
                   for n in EFFICIENCY]
            lines.append(f"| {v} | {family} | {e['metric']} | {_interval_of(e['task']).format()} | "
                         f"{e['baseline']['mean']:.3f} | " + " | ".join(eff) + " |")
    for name, per_family in report.get("equal", {}).items():
        lines += [""]
        for family, e in per_family.items():
            means = ", ".join(f"{v} {_fmt_num(m)}" for v, m in e["means"].items())
            lines.append(f"Equal {name} ({family}): {means}: spread {e['relative_spread']:.1%} "
                         f"{'within' if e['equal'] else 'OUTSIDE'} the declared {e['tolerance']:.0%}.")
    if report["claims"]:
        lines += ["", "## Claims", ""]
    for c in report["claims"]:
        head = f"**{c['a']} vs {c['b']}**" + (f" ({c['paper']})" if c["paper"] else "") + (f": {c['claim']}" if c["claim"] else "")
        margin = f" by more than {c['margin']}" if c["expect"].startswith("not_") else ""
        lines += [head, "", f"Expected: {c['a']} {c['expect'].replace('_', ' ')} than {c['b']}{margin} "
                  f"({'task metric' if c['metric'] == 'task' else c['metric']}).", ""]
        if not c["families"]:
            lines += ["No family has results for both variants.", ""]
            continue
        lines += ["| family | metric | difference a − b | interval | verdict |", "| --- | --- | --- | --- | --- |"]
        for family, d in c["families"].items():
            lines.append(f"| {family} | {d['metric']} | {signed(d['mean'])} | {signed_interval(d)} | {d['verdict']} |")
        by_verdict: dict[str, list[str]] = {}
        for family, d in c["families"].items():
            by_verdict.setdefault(d["verdict"], []).append(family)
        lines += ["", "At this scale the claim " + "; ".join(
            f"{verdict_text[v]} on {', '.join(fams)}" for v, fams in by_verdict.items()) + ".", ""]
    if report["failures"]:
        lines += ["## Failed runs", ""]
        lines += [f"- {f['variant']} seed {f['seed']}: {f['error']}" for f in report["failures"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_results(report: dict, path: Path) -> None:
    """`results.png`: the task metric per variant (mean and interval over seeds, the per-seed points,
    the majority-answer baseline dashed), one panel per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted({f for fams in report["variants"].values() for f in fams})
    variants = list(report["variants"])
    fig, axes = plt.subplots(1, max(len(families), 1), figsize=(3.2 * max(len(families), 1), 3.2), squeeze=False)
    for ax, family in zip(axes[0], families):
        xs, means, errs, metric = [], [], [], ""
        for i, v in enumerate(variants):
            e = report["variants"][v].get(family)
            if e is None:
                continue
            metric = e["metric"]
            xs.append(i)
            means.append(e["task"]["mean"])
            errs.append(0.0 if e["task"]["low"] is None else (e["task"]["high"] - e["task"]["low"]) / 2)
            seeds = list(e["task"]["per_seed"].values())
            ax.plot([i] * len(seeds), seeds, "k.", alpha=0.5, markersize=4)
        ax.errorbar(xs, means, yerr=errs, fmt="o", capsize=4)
        baselines = [report["variants"][v][family]["baseline"]["mean"] for v in variants if family in report["variants"][v]]
        if baselines:
            ax.axhline(max(baselines), color="gray", linestyle="--", linewidth=1, label="majority answer")
            ax.legend(loc="best", fontsize="small")
        ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
        ax.set_xlim(-0.5, len(variants) - 0.5)
        ax.set_title(f"{family} ({metric})")
    fig.suptitle(f"{report['experiment']}: mean and {round(report['level'] * 100)}% t interval over seeds {report['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in its folder and a rename: a reader (or a
    process sharing the store) sees the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_reports(exp: ExperimentConfig, report: dict, out_dir: Path) -> None:
    """Write `results.json`, `results.md` and `results.png` into `out_dir`."""
    out_dir = Path(out_dir)
    write_text_atomic(out_dir / "results.json", json.dumps(report, indent=1, default=str))
    write_text_atomic(out_dir / "results.md", results_markdown(report))
    plot_results(report, out_dir / "results.png")


__all__ = ["EFFICIENCY", "plot_results", "results_markdown", "signed", "signed_interval", "summarize", "write_reports",
           "write_text_atomic"]
