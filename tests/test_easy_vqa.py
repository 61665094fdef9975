"""easy-VQA (PyPI easy-vqa==1.0) as a task family, and the eval pieces it brought: scores per
subtype (question type) and word error rate against a naive reference."""

import functools
import importlib.util
import io
import json
import random
from types import SimpleNamespace

import pytest
from PIL import Image

from zoo.pipelines.data import BUILDERS, SPLITS, Sample, build_family, load_split, write_dataset
from zoo.pipelines.data import easy_vqa as ev
from zoo.pipelines.data.__main__ import main as cli
from zoo.pipelines.eval import SCORERS, evaluate_outputs, score, wer, word_edit_distance

N = 40  # samples per split


@pytest.fixture(scope="module")
def built():
    return ev.build_easy_vqa(N)


def _image(s: Sample) -> tuple[str, int]:
    """(part, image id) of a sample, from its key."""
    _, part, image = s.key.split("-")[:3]
    return part, int(image)


def test_splits_are_full_disjoint_by_image_and_keep_the_package_test_part(built):
    assert set(built) == set(SPLITS) and all(len(built[s]) == N for s in SPLITS)
    images = {split: {_image(s) for s in samples} for split, samples in built.items()}
    assert not (images["train"] & images["val"] or images["train"] & images["test"] or images["val"] & images["test"])
    assert {p for p, _ in images["test"]} == {"test"} and {p for s in ("train", "val") for p, _ in images[s]} == {"train"}
    # Over the whole package (the split rule the builder uses): every question once, images whole.
    parts = ev.load_questions()
    assert {p: len(q) for p, q in parts.items()} == {"train": 38575, "test": 9673}
    split_of_image, counts = {}, dict.fromkeys(SPLITS, 0)
    for q in (q for part in parts.values() for q in part):
        s = ev.split_of_question(q)
        assert split_of_image.setdefault((q.part, q.image), s) == s
        counts[s] += 1
    assert counts == {"train": 34527, "val": 4048, "test": 9673}
    per_split = {s: sum(v == s for v in split_of_image.values()) for s in SPLITS}
    assert per_split == {"train": 3594, "val": 406, "test": 1000}


def test_builds_are_deterministic_and_a_smaller_limit_is_a_prefix(tmp_path, built):
    again = ev.build_easy_vqa(N)
    assert again == built
    assert ev.build_easy_vqa(7)["val"] == built["val"][:7]
    m = write_dataset(built, tmp_path / "a", task_family=ev.TASK_FAMILY, source="t")
    assert write_dataset(again, tmp_path / "b", task_family=ev.TASK_FAMILY, source="t") == m
    assert load_split(tmp_path / "a", "test") == built["test"]  # the subtype survives the shards


def test_samples_are_the_package_questions_answers_and_images(built):
    data = ev.package_data_dir()
    assert sorted(ev.ANSWERS) == sorted(line.strip() for line in (data / "answers.txt").read_text().splitlines() if line.strip())
    by_index = {(q.part, q.index): q for part in ev.load_questions().values() for q in part}
    types = set()
    for s in (s for samples in built.values() for s in samples):
        s.validate()
        part, image = _image(s)
        q = by_index[(part, int(s.key.split("-")[3][1:]))]
        assert (s.instruction, s.answer, q.image) == (q.text, q.answer, image)
        assert s.answer in ev.ANSWERS and s.task_family == "easyvqa"
        assert s.subtype == ev.question_type(s.answer) == s.key.rsplit("-", 1)[1]
        types.add(s.subtype)
        # The type agrees with the question's wording.
        if s.subtype == "yesno":
            assert not s.instruction.startswith("what")
        else:
            assert s.instruction.startswith("what")
            assert ("color" in s.instruction) == (s.subtype == "color") or s.instruction.startswith("what is the")
        assert s.media[0].data == (data / part / "images" / f"{image}.png").read_bytes()
    assert types == set(ev.QUESTION_TYPES)
    im = Image.open(io.BytesIO(built["train"][0].media[0].data))
    assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 64))


def test_question_types_cover_every_answer_and_can_be_chosen():
    parts = ev.load_questions()
    shares = {t: sum(q.question_type == t for q in parts["train"]) for t in ev.QUESTION_TYPES}
    assert shares == {"yesno": 28407, "shape": 5002, "color": 5166}  # the package README: 28,407 yes/no
    assert sum(q.question_type == "yesno" for q in parts["test"]) == 7136
    only = ev.build_easy_vqa(5, question_types=["color"])
    assert {s.subtype for v in only.values() for s in v} == {"color"}
    with pytest.raises(ValueError, match="question_types"):
        ev.build_easy_vqa(1, question_types=("count",))
    with pytest.raises(ValueError, match="not an easy-VQA answer"):
        ev.question_type("purple")


def test_registered_family_builds_shards_with_its_source(tmp_path):
    assert BUILDERS["easyvqa"].source == "pypi:easy-vqa==1.0"
    m = build_family("easyvqa", tmp_path, max_per_split=3)
    assert m["source"] == "pypi:easy-vqa==1.0" and {s: v["count"] for s, v in m["splits"].items()} == dict.fromkeys(SPLITS, 3)


def test_shards_of_samples_without_subtype_do_not_store_one(tmp_path):
    plain = Sample("a", "vqa", "train", "q", "yes")
    write_dataset({"train": [plain]}, tmp_path, task_family="vqa", source="t")
    import tarfile

    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        meta = json.loads(tar.extractfile("a.json").read())
    assert "subtype" not in meta and load_split(tmp_path, "train") == [plain]
    with pytest.raises(ValueError, match="subtype"):
        Sample("a", "vqa", "train", "q", "yes", subtype="a.b").validate()


def test_missing_package_names_the_install_command(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "easy_vqa" else real(name, *a))
    with pytest.raises(ev.MissingPackageError, match=r"pip install --no-deps 'easy-vqa==1\.0'"):
        ev.build_easy_vqa(1)
    assert cli(["build", "--out", str(tmp_path), "--max-per-split", "1", "--families", "easyvqa"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps 'easy-vqa==1.0'" in err[0], err
    # A folder whose files are not the package's is refused too.
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "questions.json").write_text("[]")
    with pytest.raises(ev.MissingPackageError, match="sha256 differs"):
        ev.build_easy_vqa(1, root=tmp_path)


def _samples(answers_types, split="test"):
    return [Sample(f"k{i}", "easyvqa", split, "q", a, subtype=t) for i, (a, t) in enumerate(answers_types)]


def test_scores_per_subtype_beside_the_overall_score():
    test = _samples([("yes", "yesno"), ("no", "yesno"), ("red", "color"), ("circle", "shape"), ("blue", "color")])
    train = _samples([("no", "yesno"), ("no", "yesno"), ("red", "color"), ("circle", "shape")], "train")
    r = score(test, ["yes", "yes", "red", "square", "green"], "exact_match", train)
    # overall 2/5; yesno 1/2, color 1/2, shape 0/1; majority baselines: "no" overall (1/5), per type no/red/circle
    assert (r["value"], r["n"], r["baseline"]) == (0.4, 5, 0.2)
    assert r["by_subtype"] == {"color": {"value": 0.5, "n": 2, "baseline": 0.5},
                               "shape": {"value": 0.0, "n": 1, "baseline": 1.0},
                               "yesno": {"value": 0.5, "n": 2, "baseline": 0.5}}
    plain = [Sample("p", "vqa", "test", "q", "yes")]
    assert "by_subtype" not in score(plain, ["yes"], "exact_match")


def test_recipe_outputs_report_per_type_metrics_and_leave_other_families_alone(monkeypatch):
    from zoo.pipelines import eval as ev_mod
    from zoo.pipelines.datasets import Datasets

    test = {"easyvqa": _samples([("yes", "yesno"), ("red", "color"), ("circle", "shape"), ("no", "yesno")]),
            "vqa": [Sample("v", "vqa", "test", "q", "yes")]}
    replies = {"easyvqa": ["yes", "red", "triangle", "yes"], "vqa": ["yes"]}
    monkeypatch.setattr(ev_mod, "generate_answers", lambda m, p, samples, **kw: replies[samples[0].task_family])
    from zoo.pipelines.stages.recipe import EvalSpec

    recipe = SimpleNamespace(name="r", eval=EvalSpec(limit=None, max_new_tokens=4))
    datasets = Datasets({"easyvqa": test["easyvqa"], "vqa": test["vqa"]}, test)
    out = evaluate_outputs(recipe, None, None, datasets, ["easyvqa", "vqa"], "lora/easyvqa/model")
    values = {k: v["value"] for k, v in out.items()}
    assert values == {"easyvqa/exact_match": 0.5, "easyvqa/majority_baseline": 0.25, "easyvqa/exact_match/color": 1.0,
                      "easyvqa/exact_match/shape": 0.0, "easyvqa/exact_match/yesno": 0.5,
                      "vqa/exact_match": 1.0, "vqa/majority_baseline": 1.0}
    assert out["easyvqa/exact_match/yesno"]["dataset"] == "easyvqa test split, 2 yesno samples"


@functools.lru_cache(maxsize=None)
def _naive_distance(hyp: tuple, ref: tuple) -> int:
    """The Levenshtein recursion as written in textbooks (exponential without the cache)."""
    if not ref:
        return len(hyp)
    if not hyp:
        return len(ref)
    return min(_naive_distance(hyp[:-1], ref) + 1, _naive_distance(hyp, ref[:-1]) + 1,
               _naive_distance(hyp[:-1], ref[:-1]) + (hyp[-1] != ref[-1]))


def test_word_error_rate_against_hand_computed_values_and_a_naive_reference():
    assert SCORERS["wer"] is wer
    assert wer("the cat sat on mat", "the cat sat on the mat") == pytest.approx(1 / 6)  # one deletion
    assert wer("The cat, sat!", "the cat sat") == 0.0  # normalized like exact match
    assert wer("a dog sat", "the cat sat") == pytest.approx(2 / 3)  # two substitutions
    assert wer("turn left at the red house now", "turn left at the house") == pytest.approx(2 / 5)  # two insertions
    assert wer("", "seven") == 1.0 and wer("one two three", "seven") == 3.0  # WER can exceed 1
    assert wer("", "") == 0.0 and wer("yes", "") == 1.0
    rng = random.Random(0)
    vocab = ["a", "b", "c", "d"]
    for _ in range(300):
        hyp = tuple(rng.choice(vocab) for _ in range(rng.randint(0, 7)))
        ref = tuple(rng.choice(vocab) for _ in range(rng.randint(0, 7)))
        d = _naive_distance(hyp, ref)
        assert word_edit_distance(hyp, ref) == d
        assert wer(" ".join(hyp), " ".join(ref)) == pytest.approx(float(d) / max(len(ref), 1), abs=0)
