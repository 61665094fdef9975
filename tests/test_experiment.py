"""The experiment harness: interval math by hand, shared-stage reuse, resume after SIGKILL, failures, bad input."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from zoo.pipelines.experiment import ExperimentConfig, plan, run_experiment
from zoo.pipelines.experiment_stats import paired_difference, t_interval, verdict

ROOT = Path(__file__).resolve().parents[1]
MICRO = ROOT / "configs" / "experiments" / "micro.yaml"
SHARED = ("pretrain-lm", "align", "specialize")
# Student t quantiles by hand: with 2 degrees of freedom the t quantile has the closed form
# t_p = (2p - 1) / sqrt(2 p (1 - p)); printed tables give 4.303 (df 2) and 3.182 (df 3).
T_975_DF2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)
T_975_DF3 = 3.1824463052837


def test_t_interval_matches_a_hand_computation():
    iv = t_interval([0.5, 0.6, 0.7])
    # mean 0.6; s = sqrt(((-0.1)^2 + 0 + 0.1^2) / 2) = 0.1; half width = t * s / sqrt(3)
    assert iv.mean == pytest.approx(0.6, abs=1e-15) and iv.std == pytest.approx(0.1, abs=1e-15)
    assert iv.half_width == pytest.approx(T_975_DF2 * 0.1 / math.sqrt(3), rel=1e-12)
    assert (iv.low, iv.high) == pytest.approx((0.6 - 0.2484138, 0.6 + 0.2484138), abs=1e-7)
    iv4 = t_interval([1.0, 2.0, 4.0, 5.0])  # mean 3, s^2 = (4 + 1 + 1 + 4) / 3
    assert iv4.half_width == pytest.approx(T_975_DF3 * math.sqrt(10 / 3) / 2, rel=1e-12)
    assert T_975_DF2 == pytest.approx(4.303, abs=5e-4)
    one = t_interval([0.7])
    assert one.mean == 0.7 and math.isnan(one.low) and one.to_dict()["low"] is None


def test_paired_difference_is_over_common_seeds_and_verdicts_read_its_interval():
    a, b = {0: 0.80, 1: 0.70, 2: 0.75, 5: 0.9}, {0: 0.60, 1: 0.65, 2: 0.60}
    d = paired_difference(a, b)  # per seed: 0.20, 0.05, 0.15 (seed 5 has no pair)
    assert d.n == 3 and d.mean == pytest.approx(0.4 / 3)
    s = math.sqrt(((0.2 - 0.4 / 3) ** 2 + (0.05 - 0.4 / 3) ** 2 + (0.15 - 0.4 / 3) ** 2) / 2)
    assert d.half_width == pytest.approx(T_975_DF2 * s / math.sqrt(3), rel=1e-9)
    assert d.low < 0 < d.high and verdict(d, "higher") == "not shown"  # 3 seeds: +0.13 is not enough
    tight = t_interval([0.10, 0.11, 0.12])
    assert verdict(tight, "higher") == "holds" and verdict(tight, "lower") == "contradicted"
    assert verdict(t_interval([-0.01, 0.0, 0.01]), "not_lower", margin=0.05) == "holds"
    assert verdict(t_interval([-0.2, -0.21, -0.19]), "not_lower", margin=0.05) == "contradicted"
    assert verdict(t_interval([0.3]), "higher") == "one seed"
    with pytest.raises(ValueError, match="expect must be one of"):
        verdict(tight, "better")
    with pytest.raises(ValueError, match="no seed in common"):
        paired_difference({0: 1.0}, {1: 1.0})


def _micro(**changes) -> ExperimentConfig:
    exp = ExperimentConfig.load(MICRO)
    for k, v in changes.items():
        setattr(exp, k, v)
    return exp


def test_bad_input_names_the_cause():
    with pytest.raises(ValueError, match="overrides stage 'moe-tun', which recipe"):
        plan(_micro(variants={"a": {}, "b": {"stages": {"moe-tun": {"batch_size": 2}}}}))
    with pytest.raises(ValueError, match=r"variant 'b'.*unknown.*'top_kk'"):
        plan(_micro(variants={"a": {}, "b": {"stages": {"moe-tune": {"options": {"moe": {"router_options": {"top_kk": 1}}}}}}}))
    with pytest.raises(ValueError, match=r"variant 'b'.*moe-tune.*unknown config key\(s\) \['upcycle'\] \(did you mean 'upcycler'.*\?\); known keys are \[.*'upcycler'"):
        plan(_micro(variants={"a": {}, "b": {"stages": {"moe-tune": {"options": {"upcycle": "noisy"}}}}}))
    with pytest.raises(ValueError, match=r"`seeds` must list at least one seed"):
        ExperimentConfig(name="x", recipe=str(MICRO), seeds=[], variants={"a": {}})
    with pytest.raises(ValueError, match="duplicate seeds"):
        ExperimentConfig(name="x", recipe=str(MICRO), seeds=[1, 1], variants={"a": {}})
    with pytest.raises(ValueError, match="the seed list is empty"):
        plan(_micro(), seeds=[])
    with pytest.raises(ValueError, match=r"variants 'top2' and 'steps' differ in stages.moe-tune.train.steps \(2 vs 5\), "
                                         r"outside the declared factor"):
        plan(_micro(variants={"top2": {}, "steps": {"stages": {"moe-tune": {"train": {"steps": 5}}}}}))
    with pytest.raises(ValueError, match="unknown recipe field 'dataa'"):
        plan(_micro(overrides={"dataa": {}}))
    with pytest.raises(ValueError, match="compare names variant 'top3'"):
        ExperimentConfig(name="x", recipe=str(MICRO), seeds=[0], variants={"a": {}}, compare=[{"a": "a", "b": "top3"}])
    with pytest.raises(ValueError, match="`only` names stages \\['nope'\\]"):
        plan(_micro(only=["pretrain-lm", "nope"]))
    with pytest.raises(ValueError, match="renames it"):
        plan(_micro(variants={"a": {"stages": {"moe-tune": {"name": "tune"}}}}))


def test_plan_shares_prefix_stages_between_variants_and_seeds_change_every_stage():
    runs = plan(_micro())
    assert [(r.variant, r.seed) for r in runs] == [(v, s) for v in ("top2", "top1") for s in (0, 1, 2)]
    by = {(r.variant, r.seed): r for r in runs}
    for s in (0, 1, 2):
        for stage in SHARED:
            assert by["top2", s].keys[stage] == by["top1", s].keys[stage]
        assert by["top2", s].keys["moe-tune"] != by["top1", s].keys["moe-tune"]
    for stage in (*SHARED, "moe-tune"):
        assert len({by["top2", s].keys[stage] for s in (0, 1, 2)}) == 3  # the seed reaches every stage
    r = by["top1", 2]
    assert r.recipe.seed == 2000 and [st.train.seed for st in r.recipe.stages] == [2000, 2001, 2002, 2003]
    noisy = plan(_micro(factor=None, variants={"n": {"stages": {"moe-tune": {"options": {
        "upcycler": "noisy", "upcycler_options": {"scale": 0.01, "seed": 3}}}}}}), seeds=[0, 2])
    assert [p.recipe.stage("moe-tune").options.upcycler_options["seed"] for p in noisy] == [3, 2003]


@pytest.fixture(scope="module")
def micro_experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    report = run_experiment(_micro(), out / "micro", store=out / "store", quiet=True)
    return out, report


def _final_losses(out: Path, exp_dir: str) -> dict:
    return {(v, s): json.loads((out / exp_dir / "runs" / v / f"seed-{s}" / "moe-tune" / "model" / "config.json").read_text())["final_loss"]
            for v in ("top2", "top1") for s in (0, 1, 2)}


@pytest.mark.slow
def test_micro_experiment_reports_every_variant_with_intervals_and_reuses_shared_stages(micro_experiment):
    out, report = micro_experiment
    assert not report["failures"]
    assert report["executed_stages"] == 3 * 3 + 2 * 3 and report["reused_stages"] == 3 * 3  # prefix once per seed
    runs = out / "micro" / "runs"
    for s in (0, 1, 2):
        for stage in SHARED:
            assert os.readlink(runs / "top2" / f"seed-{s}" / stage) == os.readlink(runs / "top1" / f"seed-{s}" / stage)
        assert os.readlink(runs / "top2" / f"seed-{s}" / "moe-tune") != os.readlink(runs / "top1" / f"seed-{s}" / "moe-tune")
    losses = _final_losses(out, "micro")
    assert len(set(losses.values())) == 6  # every run trained differently
    for v in ("top2", "top1"):
        assert set(report["variants"][v]) == {"vqa", "asr", "text"}  # moe-tune's families
        for family, e in report["variants"][v].items():
            values = [e["task"]["per_seed"][str(s)] for s in (0, 1, 2)]
            iv = t_interval(values)
            assert (e["task"]["mean"], e["task"]["n"]) == (pytest.approx(iv.mean), 3)
            assert e["experts_per_token"]["mean"] == (2.0 if v == "top2" else 1.0)
            assert e["trainable_params"]["mean"] > 0 and e["stored_bytes"]["mean"] > 0
    top2, top1 = report["variants"]["top2"]["vqa"], report["variants"]["top1"]["vqa"]
    assert top2["active_params"]["mean"] > top1["active_params"]["mean"]
    assert top2["flops_per_token"]["mean"] > top1["flops_per_token"]["mean"]
    claim = report["claims"][0]
    assert claim["families"]["vqa"]["mean"] == pytest.approx(1.0) and claim["families"]["vqa"]["verdict"] == "holds"
    md = (out / "micro" / "results.md").read_text()
    assert "| top2 | vqa | exact_match |" in md and "Student t" in md and "holds" in md
    threads = torch.get_num_threads()
    assert report["machine"]["stage_threads"] == [threads] and f"(stages trained at {threads} threads)" in md
    assert (out / "micro" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "micro" / "results.json").read_text())["variants"] == report["variants"]

    again = run_experiment(_micro(), out / "micro", store=out / "store", quiet=True)  # everything is done
    assert again["executed_stages"] == 0 and again["variants"] == report["variants"]


@pytest.mark.slow
def test_a_failing_variant_is_reported_and_the_others_are_kept(micro_experiment):
    out, _ = micro_experiment
    # split upcycling into 3 experts: 3 does not divide the FFN's 64 neurons; fails inside the stage
    broken = {"stages": {"moe-tune": {"options": {"upcycler": "split", "moe": {"num_experts": 3}}}}}
    exp = _micro(factor=None, variants={**_micro().variants, "broken": broken})
    report = run_experiment(exp, out / "with-broken", store=out / "store", quiet=True, seeds=[0, 1])
    assert {(f["variant"], f["seed"]) for f in report["failures"]} == {("broken", 0), ("broken", 1)}
    assert "3 does not divide 64" in report["failures"][0]["error"]
    assert set(report["variants"]) == {"top2", "top1"} and report["executed_stages"] == 0  # the rest was stored
    md = (out / "with-broken" / "results.md").read_text()
    assert "## Failed runs" in md and "broken seed 0" in md
    assert (out / "with-broken" / "runs" / "broken" / "seed-0" / "error.txt").is_file()

    from zoo.pipelines.cli import main

    bad = out / "bad.yaml"
    bad.write_text(MICRO.read_text().replace("seeds: [0, 1, 2]", "seeds: []").replace("../recipes/", f"{ROOT}/configs/recipes/"))
    assert main(["experiment", str(bad), "--out", str(out / "bad")]) == 1


@pytest.mark.slow
def test_resume_after_sigkill_skips_finished_stages_and_matches_the_uninterrupted_run(micro_experiment, tmp_path):
    out, report = micro_experiment
    for built in [*(out / "store").glob("data-*"), *(out / "store").glob("tokenizer-*")]:  # the data, not the stages
        shutil.copytree(built, tmp_path / "store" / built.name)
    cmd = [sys.executable, "-m", "zoo.pipelines.cli", "experiment", str(MICRO), "--out", str(tmp_path), "--quiet"]  # store: OUT/store
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}  # as this process
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((tmp_path / "store").glob("stage-*/done.json"))) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p: p.read_text() for p in (tmp_path / "store").glob("stage-*/done.json")}
    assert 5 <= len(done) < 15 and not (tmp_path / "micro" / "results.json").exists()

    assert subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True).returncode == 0
    resumed = json.loads((tmp_path / "micro" / "results.json").read_text())
    assert resumed["executed_stages"] == 15 - len(done)
    assert all(p.read_text() == text for p, text in done.items())  # finished stages were not run again
    strip = lambda variants: {v: {f: {k: e for k, e in row.items() if k != "wall_s"} for f, row in fams.items()}  # noqa: E731
                              for v, fams in variants.items()}
    assert strip(resumed["variants"]) == strip(report["variants"])
    assert _final_losses(tmp_path, "micro") == _final_losses(out, "micro")  # bit-for-bit the same training


@pytest.mark.slow
def test_two_jobs_give_the_one_process_results_and_train_each_stage_once(micro_experiment, tmp_path):
    from zoo.pipelines.experiment import run_experiments

    out, report = micro_experiment
    for built in [*(out / "store").glob("data-*"), *(out / "store").glob("tokenizer-*")]:  # the data, not the stages
        shutil.copytree(built, tmp_path / "store" / built.name)
    two, again = run_experiments([_micro(), _micro(name="micro-again")], tmp_path, jobs=2, quiet=True)
    records = [json.loads(p.read_text()) for p in (tmp_path / "store").glob("stage-*/done.json")]
    assert len(records) == 15 and len({r["key"] for r in records}) == 15  # no stage trained twice
    assert (two["executed_stages"], two["reused_stages"]) == (report["executed_stages"], report["reused_stages"])
    assert (again["executed_stages"], again["reused_stages"]) == (0, 24)  # counted once, by the first experiment
    assert two["jobs"] == 2 and 0 < two["wall_s"] <= again["wall_s"]
    assert again["variants"] == two["variants"] and "2 processes (`--jobs`)" in (tmp_path / "micro" / "results.md").read_text()
    strip = lambda variants: {v: {f: {k: e for k, e in row.items() if k != "wall_s"} for f, row in fams.items()}  # noqa: E731
                              for v, fams in variants.items()}
    assert strip(two["variants"]) == strip(report["variants"]) and two["claims"] == report["claims"]
    assert _final_losses(tmp_path, "micro") == _final_losses(out, "micro")  # bit-for-bit the same training
    assert json.loads((tmp_path / "micro" / "results.json").read_text())["variants"] == two["variants"]
    with pytest.raises(ValueError, match="jobs=0 must be an integer >= 1"):
        run_experiments([_micro()], tmp_path, jobs=0)


def test_a_new_name_starts_its_options_afresh_and_lists_are_replaced():
    from zoo.pipelines.experiment import apply_overrides

    recipe = {"name": "r", "stages": [{"name": "tune", "kind": "moe-tune", "trains": ["a.*", "b.*"], "options": {
        "moe": {"router": "topk", "router_options": {"top_k": 2}, "loss_coefs": {"balance": 0.01}, "num_experts": 4}}}]}
    out = apply_overrides(recipe, {"stages": {"tune": {"trains": ["c.*"], "options": {"moe": {
        "router": "topp", "router_options": {"p": 0.5}}}}}}, "test")
    moe = out["stages"][0]["options"]["moe"]
    assert moe == {"router": "topp", "router_options": {"p": 0.5}, "num_experts": 4}  # top_k, balance dropped
    assert out["stages"][0]["trains"] == ["c.*"]
    dense = apply_overrides(recipe, {"stages": {"tune": {"kind": "pretrain-lm"}}}, "test")
    assert "options" not in dense["stages"][0] and recipe["stages"][0]["options"]["moe"]["num_experts"] == 4
    assert apply_overrides(recipe, {"stages": {"tune": None}}, "test")["stages"] == []


def test_every_shipped_experiment_plans_and_the_studies_share_their_stages():
    exps = {p.stem: ExperimentConfig.load(p) for p in sorted(MICRO.parent.glob("*.yaml"))}
    assert {"moe-vs-dense", "lora-adapters", "topp-vs-topk", "null-experts", "esft", "smoe-dropout", "upcycling"} <= set(exps)
    plans = {name: {(r.variant, r.seed): r for r in plan(exp)} for name, exp in exps.items()}
    studies = [n for n, e in exps.items() if Path(e.recipe).name == "study.yaml"]
    for stage in SHARED:  # one prefix per seed for every study (multiplet upcycling changes specialize)
        keys = {r.keys[stage] for n in studies for (v, seed), r in plans[n].items()
                if seed == 0 and (stage, n, v) != ("specialize", "upcycling", "multiplet")}
        assert len(keys) == 1, stage
    top2 = {plans[n][v, 0].keys["tune"] for n, v in [("moe-vs-dense", "moe"), ("topp-vs-topk", "top2"), ("null-experts", "top2"),
                                                      ("smoe-dropout", "top2-k2"), ("smoe-dropout", "top2-k4"), ("upcycling", "copy"),
                                                      ("esft", "esft")]}
    assert len(top2) == 1  # the top-2 MoE trains once per seed for five studies
    smoe = plans["smoe-dropout"]
    assert smoe["smoe-k1", 1].keys == smoe["smoe-k4", 1].keys and smoe["smoe-k4", 1].inference == {"top_k": 4}
    assert plans["upcycling"]["multiplet", 0].keys["specialize"] != plans["upcycling"]["copy", 0].keys["specialize"]
    assert plans["upcycling"]["multiplet", 0].keys["align"] == plans["upcycling"]["copy", 0].keys["align"]
    with pytest.raises(ValueError, match=r"variants 'smoe-k1' and 'smoe-k2' differ in inference.top_k \(1 vs 2\)"):
        exp = exps["smoe-dropout"]
        exp.factor = [f for f in exp.factor if not f.startswith("inference")]
        plan(exp)


@pytest.mark.slow
@pytest.mark.parametrize("study", sorted(p.stem for p in MICRO.parent.glob("*.yaml") if p.stem != "micro"))
def test_every_shipped_study_runs_end_to_end_at_two_steps(study, tmp_path_factory):
    """Each study on the micro model, 2 steps per stage, 2 seeds: every variant trains and is measured."""
    from zoo.pipelines.experiment import MeasureSpec, base_recipe_dict

    exp = ExperimentConfig.load(MICRO.parent / f"{study}.yaml")
    exp.seeds = [0, 1]
    exp.overrides = {"model": str(ROOT / "configs" / "models" / "micro-zoo.yaml"), "tokenizer_vocab": 512,
                     "data": {"max_per_split": 16},
                     "stages": {s["name"]: {"train": {"steps": 2}, "batch_size": 4} for s in base_recipe_dict(exp)["stages"]}}
    for variant in exp.variants.values():  # multiplet upcycling's FFN copies: 2 steps too
        if "specialize" in variant.get("stages", {}):
            variant["stages"]["specialize"]["options"].update(expert_steps=2, cluster_samples=8)
    exp.eval = MeasureSpec(limit=4, max_new_tokens=4, batch_size=8, routing_samples=4)
    store = tmp_path_factory.getbasetemp() / "studies-store"  # shared: the prefix trains once for all studies
    report = run_experiment(exp, tmp_path_factory.mktemp(study), store=store, quiet=True)
    assert not report["failures"], report["failures"]
    assert set(report["variants"]) == set(exp.variants)
    for claim in report["claims"]:
        assert claim["families"] and all(d["n"] == 2 for d in claim["families"].values())
    if study == "esft":  # ESFT trains the selected experts' rows only: fewer than the MoE's expert tensors
        trained = {v: report["variants"][v]["vqa"]["trainable_params"]["mean"] for v in exp.variants}
        assert 0 < trained["esft"] < trained["full"]


def test_a_stage_locked_by_a_live_process_is_waited_for_and_a_stale_lock_taken_over(tmp_path):
    from zoo.pipelines.experiment import StageBusy, _stage_lock

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    waited = []
    try:
        (tmp_path / "lock").write_text(str(sleeper.pid))
        with pytest.raises(StageBusy, match=f"stage 'tune' .* is being run by process {sleeper.pid}"):
            with _stage_lock(tmp_path, "tune", wait_s=0.3, poll_s=0.05, on_wait=waited.append):
                pass
        assert waited == [sleeper.pid]  # it waited (once told) before giving up
        threading.Timer(0.3, lambda: (sleeper.kill(), sleeper.wait())).start()  # it ends while we wait: ours
        with _stage_lock(tmp_path, "tune", poll_s=0.05):
            assert sleeper.poll() is not None
            assert (tmp_path / "lock").read_text() == str(os.getpid())
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not (tmp_path / "lock").exists()
    (tmp_path / "lock").write_text(str(sleeper.pid))  # left by a killed process: taken over at once
    with _stage_lock(tmp_path, "tune", wait_s=0):
        assert (tmp_path / "lock").read_text() == str(os.getpid())
    assert not (tmp_path / "lock").exists()


def test_dry_run_counts_shared_stages_once(tmp_path, capsys):
    from zoo.pipelines.cli import main

    assert main(["experiment", str(MICRO), "--out", str(tmp_path), "--dry-run"]) == 0
    # 3 seeds x (3 shared stages of 3 + 2 + 2 steps + 2 moe-tune variants of 2 steps), 3 families x 4 answers
    assert capsys.readouterr().out.strip() == ("micro: 6 runs, 15 stages (0 done), 33 steps to train, "
                                               "6 measurements (<= 72 answers)")
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written
