"""Bad input never crashes, never runs silently wrong, never loses work (issue 27).

A battery over every subcommand, run in-process: each bad input ends with status 1 and exactly
one line `<prog>: error: <cause>` on stderr whose text names the cause, and no traceback. Then one
case per error class (OS errors, YAML, timm, device, network, locks, unexpected ones), the
run-directory lock, stale temporaries, the non-finite policy, and the smaller cases.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import pathlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from zoo import cli as zoo_cli
from zoo.pipelines.cli import main

ROOT = Path(__file__).resolve().parents[1]
MICRO = yaml.safe_load((ROOT / "configs" / "recipes" / "micro.yaml").read_text())
MODEL = yaml.safe_load((ROOT / "configs" / "models" / "micro-zoo.yaml").read_text())


def one_line_error(capsys, prog: str = "zoo") -> str:
    """The single stderr line of a failed command (asserts there is exactly one, and no traceback)."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


def run(argv, capsys, expect: str | list[str], prog: str = "zoo", entry=main) -> str:
    assert entry(argv) == 1
    line = one_line_error(capsys, prog)
    for text in [expect] if isinstance(expect, str) else expect:
        assert text in line, f"{text!r} not in {line!r}"
    return line


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.delenv("ZOO_DEBUG", raising=False)
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------------------------- recipes


def _set(path, value):
    def mutate(r):
        node = r
        for key in path[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return mutate


_DELETE = object()
_S0 = ["stages", 0]
_T0 = [*_S0, "train"]

RECIPE_CASES = {
    # typed values: the key path and the accepted type
    "steps-string": (_set([*_T0, "steps"], "three"), ["stages[0].train.steps", "expected an integer", "'three'"]),
    "steps-float": (_set([*_T0, "steps"], 2.5), ["stages[0].train.steps", "expected an integer, got 2.5"]),
    "steps-whole-float": (_set([*_T0, "steps"], 3.0), ["stages[0].train.steps", "write 3"]),
    "steps-zero": (_set([*_T0, "steps"], 0), ["stages[0].train", "steps must be >= 1"]),
    "steps-bool": (_set([*_T0, "steps"], True), ["stages[0].train.steps", "got True (bool)"]),
    "lr-word": (_set([*_T0, "optim", "lr"], "fast"), ["stages[0].train.optim.lr", "expected a number", "'fast'"]),
    "lr-negative": (_set([*_T0, "optim", "lr"], -1.0), ["stages[0].train.optim", "lr must be > 0"]),
    "lr-list": (_set([*_T0, "optim", "lr"], [1, 2]), ["stages[0].train.optim.lr", "expected a number"]),
    "precision": (_set([*_T0, "optim", "precision"], "fp8"), ["stages[0].train.optim", "precision='fp8'"]),
    "betas-short": (_set([*_T0, "optim", "betas"], [0.9]), ["stages[0].train.optim.betas", "a list of 2"]),
    "betas-word": (_set([*_T0, "optim", "betas"], [0.9, "high"]), ["stages[0].train.optim.betas[1]", "expected a number"]),
    "grad-accum-zero": (_set([*_T0, "optim", "grad_accum"], 0), ["grad_accum must be >= 1"]),
    "optim-typo": (_set([*_T0, "optim", "learning_rate"], 0.1), ["stages[0].train.optim", "'learning_rate'", "known keys"]),
    "optim-not-mapping": (_set([*_T0, "optim"], "adamw"), ["stages[0].train.optim", "expected a mapping (OptimConfig)"]),
    "train-typo": (_set([*_T0, "stpes"], 3), ["stages[0].train", "'stpes'", "did you mean 'steps'"]),
    "wandb-word": (_set([*_T0, "wandb"], "yes"), ["stages[0].train.wandb", "expected a boolean"]),
    "batch-size-string": (_set([*_S0, "batch_size"], "8"), ["stages[0].batch_size", "expected an integer", "'8'"]),
    "stage-typo": (_set([*_S0, "dta"], {}), ["stages[0]", "StageConfig: unknown config key(s) ['dta']"]),
    "stage-kind": (_set([*_S0, "kind"], "pretrain"), ["stages[0].kind", "unknown stage kind 'pretrain'"]),
    "stage-not-mapping": (_set(["stages", 1], "align"), ["stages[1]", "expected a mapping"]),
    "stage-name-slash": (_set([*_S0, "name"], "a/b"), ["stages[0].name", "stage name 'a/b' contains the path separator"]),
    "stage-name-dotdot": (_set([*_S0, "name"], ".."), ["stages[0].name", "may not contain '..'"]),
    "stage-name-number": (_set([*_S0, "name"], 3), ["stages[0].name", "expected a string"]),
    "stage-options-typo": (_set(["stages", 3, "options", "mo"], {}), ["stages[3].options", "'mo'"]),
    "trains-not-list": (_set([*_S0, "trains"], "lm.*"), ["stages[0].trains", "expected a list of strings or null"]),
    "sample-types-float": (_set(["stages", 6, "sample_types", "text"], 0.5), ["stages[6].sample_types.text", "expected an integer"]),
    "start-from-later": (_set([*_S0, "start_from"], "align"), ["stage 'pretrain-lm' starts from 'align', which is not an earlier stage"]),
    "duplicate-stages": (lambda r: r["stages"].append(copy.deepcopy(r["stages"][0])), ["duplicate stage names"]),
    "no-stages": (_set(["stages"], []), ["stages", "must be a non-empty list"]),
    "stages-mapping": (_set(["stages"], {"a": 1}), ["stages", "expected a list"]),
    # data mix weights, validated before anything trains
    "weight-word": (_set([*_S0, "data", "corpus"], "heavy"), ["stages[0].data.corpus", "expected a number", "'heavy'"]),
    "weight-negative": (_set([*_S0, "data", "corpus"], -1), ["stages[0].data.corpus", "must be a finite number > 0, got -1"]),
    "weight-zero": (_set([*_S0, "data", "corpus"], 0), ["stages[0].data.corpus", "must be a finite number > 0"]),
    "weight-nan": (_set([*_S0, "data", "corpus"], float("nan")), ["stages[0].data.corpus", "finite number"]),
    "data-empty": (_set([*_S0, "data"], {}), ["stages[0].data", "must name at least one task family"]),
    "data-list": (_set([*_S0, "data"], ["corpus"]), ["stages[0].data", "expected a mapping"]),
    # the recipe's own keys
    "data-block-typo": (_set(["data", "max_per_splt"], 8), ["data.max_per_splt", "did you mean 'max_per_split'"]),
    "data-max-zero": (_set(["data", "max_per_split"], 0), ["data.max_per_split", ">= 1"]),
    "data-max-word": (_set(["data", "max_per_split"], "eight"), ["data.max_per_split", "expected an integer or null"]),
    "data-options-list": (_set(["data", "options"], [1]), ["data.options", "expected a mapping"]),
    "recipe-typo": (_set(["stagess"], []), ["RecipeConfig: unknown config key(s) ['stagess']", "did you mean 'stages'"]),
    "recipe-name-escape": (_set(["name"], "../evil"), ["name: recipe name '../evil' contains the path separator"]),
    "recipe-name-dotdot": (_set(["name"], "..evil"), ["recipe name '..evil' may not contain '..'"]),
    "recipe-name-empty": (_set(["name"], ""), ["recipe name must be a non-empty string"]),
    "seed-word": (_set(["seed"], "zero"), ["seed: expected an integer"]),
    "vocab-float": (_set(["tokenizer_vocab"], 512.5), ["tokenizer_vocab: expected an integer"]),
    "eval-limit-word": (_set(["eval", "limit"], "all"), ["eval.limit", "expected an integer or null"]),
    "eval-typo": (_set(["eval", "limt"], 4), ["eval", "'limt'", "did you mean 'limit'"]),
    "model-number": (_set(["model"], 42), ["model: expected a model config"]),
    "model-file-missing": (_set(["model"], "nope.yaml"), ["nope.yaml", "no such file or directory", "cannot"]),
    # the model inline: LM keys checked against the transformers config class
    "lm-key-typo": (lambda r: _inline(r, ["lm", "config", "hiden_size"], 64),
                    ["model.lm.config.hiden_size", "LlamaConfig has no field 'hiden_size'", "did you mean 'hidden_size'"]),
    "lm-value-string": (lambda r: _inline(r, ["lm", "config", "hidden_size"], "32"),
                        ["model.lm.config.hidden_size", "expected an integer", "'32'"]),
    "lm-model-type": (lambda r: _inline(r, ["lm", "model_type"], "lama"),
                      ["model.lm.model_type", "unknown transformers model type 'lama'", "did you mean 'llama'"]),
    "lm-config-list": (lambda r: _inline(r, ["lm", "config"], [1]), ["model.lm.config", "expected a mapping"]),
    "timm-name": (lambda r: _inline(r, ["encoders", "image", "name"], "vit_tiny_patch16_2244"),
                  ["model.encoders.image.name", "unknown timm model 'vit_tiny_patch16_2244'", "did you mean 'vit_tiny_patch16_224'"]),
    "encoder-kind": (lambda r: _inline(r, ["encoders", "image", "kind"], "timmm"), ["model.encoders.image.kind", "unknown encoder 'timmm'"]),
    "encoder-freeze-word": (lambda r: _inline(r, ["encoders", "image", "freeze"], "no"), ["model.encoders.image.freeze", "expected a boolean"]),
    "image-token-float": (lambda r: _inline(r, ["image_token_id"], 3.5), ["model.image_token_id", "expected an integer"]),
    "moe-top-k-float": (_set(["stages", 3, "options", "moe", "router_options", "top_k"], 1.5),
                        ["stages[3].options", "router_options.top_k", "expected an integer"]),
    "moe-experts-word": (_set(["stages", 3, "options", "moe", "num_experts"], "four"), ["stages[3].options", "moe.num_experts", "expected an integer"]),
    "moe-layers-float": (_set(["stages", 3, "options", "moe", "layers"], 2.5), ["moe.layers", "expected a string or a list of integers"]),
}


def _inline(recipe, path, value):
    model = copy.deepcopy(MODEL)
    _set(path, value)(model)
    recipe["model"] = model


def _write_recipe(tmp_path, mutate) -> Path:
    r = copy.deepcopy(MICRO)
    r["model"] = str(ROOT / "configs" / "models" / "micro-zoo.yaml")
    mutate(r)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_bad_recipe_value_is_named_with_file_and_key_path(case, tmp_path, capsys):
    mutate, expect = RECIPE_CASES[case]
    path = _write_recipe(tmp_path, mutate)
    line = run(["train", str(path), "--out", str(tmp_path / "out")], capsys, expect)
    if case != "model-file-missing":
        assert str(path) in line, f"the file is not named: {line}"
    assert not (tmp_path / "out").exists(), "nothing may be written for a config error"


def test_yaml_exponent_without_a_dot_is_a_number(tmp_path):
    from zoo.pipelines.stages import RecipeConfig

    path = _write_recipe(tmp_path, _set([*_T0, "optim", "lr"], "3e-3"))
    assert "3e-3" in path.read_text()  # PyYAML reads it as a string ...
    recipe = RecipeConfig.load(path)
    assert recipe.stages[0].train.optim.lr == pytest.approx(3e-3)  # ... the config reads it as the number
    assert isinstance(RecipeConfig.load(_write_recipe(tmp_path, _set([*_T0, "optim", "lr"], 1))).stages[0].train.optim.lr, int)


RECIPE_TEXT_CASES = {
    "broken-yaml": ("name: micro\nstages: [\n  {name: a\n", ["line", "column", "YAML syntax error"]),
    "tab-indent": ("name: micro\nstages:\n\t- a\n", ["line 3", "YAML syntax error"]),
    "not-a-mapping": ("- just\n- a list\n", ["a recipe must be a YAML mapping"]),
    "empty-file": ("", ["a recipe must be a YAML mapping", "NoneType"]),
}


@pytest.mark.parametrize("case", sorted(RECIPE_TEXT_CASES))
def test_unreadable_recipe_text_names_file_line_and_column(case, tmp_path, capsys):
    text, expect = RECIPE_TEXT_CASES[case]
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    line = run(["train", str(path)], capsys, expect)
    assert str(path) in line


def test_broken_model_yaml_named_by_its_own_file(tmp_path, capsys):
    (tmp_path / "model.yaml").write_text("name: m\nlm: {model_type: llama, config: {hidden_size: 32}\n")
    path = _write_recipe(tmp_path, _set(["model"], str(tmp_path / "model.yaml")))
    run(["train", str(path)], capsys, [str(tmp_path / "model.yaml"), "line 3", "YAML syntax error"])
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({**MODEL, "lm": {**MODEL["lm"], "confg": {}}}))
    run(["train", str(path)], capsys, [str(tmp_path / "model.yaml"), "lm: LMConfig: unknown config key(s) ['confg']"])


def test_recipe_that_does_not_exist(tmp_path, capsys):
    run(["train", "micr"], capsys, ["no shipped recipes config 'micr'", "did you mean 'micro'"])
    run(["train", str(tmp_path / "nope.yaml")], capsys, ["nope.yaml", "does not exist"])


# ------------------------------------------------------------------------------- CLI arguments


@pytest.fixture
def cards(tmp_path, monkeypatch):
    d = tmp_path / "cards"
    d.mkdir()
    card = ("---\nname: {name}\nversion: '1.0.0'\ntask_family: vqa\ndescription: d\nlicense: apache-2.0\n"
            "config: {{lm: {{}}}}\nmetrics: {{}}\n{extra}---\n")
    (d / "alpha-vqa-1.0.0.md").write_text(card.format(name="alpha-vqa", extra="recipe: missing/recipe.yaml\noutput: lora-vqa\n"))
    (d / "beta-rel-1.0.0.md").write_text(card.format(name="beta-rel", extra="uri: weights/ckpt\n"))
    monkeypatch.setenv("ZOO_MODEL_CARDS", str(d))
    return d


ARG_CASES = {
    "eval-negative-limit": (["eval", "alpha-vqa", "--family", "vqa", "--limit", "-1"], "--limit must be >= 1, got -1"),
    "eval-zero-limit": (["eval", "alpha-vqa", "--family", "vqa", "--limit", "0"], "--limit must be >= 1"),
    "eval-max-new-tokens": (["eval", "alpha-vqa", "--family", "vqa", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    "eval-data-missing": (["eval", "alpha-vqa", "--family", "vqa", "--data", "/nonexistent/data"], "--data '/nonexistent/data' is not a directory"),
    "eval-unknown-model": (["eval", "gamma", "--family", "vqa"], "unknown model 'gamma'"),
    "eval-not-built": (["eval", "alpha-vqa", "--family", "vqa"], "alpha-vqa@1.0.0 is not built yet"),
    "train-ep-size": (["train", "micro", "--ep-size", "0"], "--ep-size must be >= 1"),
    "train-data-dir": (["train", "micro", "--data-dir", "/nonexistent/data"], "--data-dir '/nonexistent/data' is not a directory"),
    "train-unknown-stage": (["train", "micro", "--stage", "finetune", "--out", "{tmp}/o"], "recipe 'micro' has no stage 'finetune'"),
    "experiment-jobs": (["experiment", "micro", "--jobs", "0"], "--jobs must be >= 1"),
    "experiment-seeds": (["experiment", "configs/experiments/micro.yaml", "--seeds", "a,b"], "--seeds must be comma-separated integers"),
    "experiment-missing": (["experiment", "{tmp}/nope.yaml"], "does not exist"),
    "experiment-unknown": (["experiment", "nosuchstudy"], "no shipped experiments config 'nosuchstudy'"),
    "load-unknown": (["load", "gamma"], "unknown model 'gamma'"),
    "load-bad-range": (["load", "alpha-vqa@^x"], "version range '^x'"),
    "load-no-version": (["load", "alpha-vqa@^2.0"], "no version of 'alpha-vqa' satisfies"),
    "load-device-typo": (["load", "alpha-vqa", "--device", "cpuu"], "unknown device 'cpuu'"),
    "load-relative-uri": (["load", "beta-rel"], "{cards}/weights/ckpt"),
    "build-unknown": (["build", "gamma"], "unknown model 'gamma'"),
    "build-no-recipe": (["build", "beta-rel"], "has no recipe to build it"),
    "build-recipe-missing": (["build", "alpha-vqa"], "its recipe 'missing/recipe.yaml' does not exist"),
    "export-exists": (["export", "alpha-vqa", "--format", "hf", "--out", "{tmp}"], "already exists; pass --overwrite to replace it"),
    "quantize-exists": (["quantize", "alpha-vqa", "--bits", "8", "--out", "{tmp}"], "already exists; pass --overwrite"),
    "export-not-built": (["export", "alpha-vqa", "--format", "hf", "--out", "{tmp}/x"], "zoo build alpha-vqa@1.0.0"),
    "publish-not-dir": (["publish", "{tmp}/absent", "--repo", "org/name"], "is not a directory"),
    "publish-no-manifest": (["publish", "{tmp}", "--repo", "org/name"], "has no manifest.json"),
    "report-missing": (["report", "{tmp}/nothing"], "nothing"),
    "cards-dir-missing": (["--cards-dir", "{tmp}/no-cards", "list"], "model cards directory '{tmp}/no-cards' (--cards-dir) does not exist"),
    "cards-dir-file": (["--cards-dir", "{cards}/alpha-vqa-1.0.0.md", "list"], "is not a directory"),
}


@pytest.mark.parametrize("case", sorted(ARG_CASES))
def test_bad_argument_is_named(case, cards, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv, expect = ARG_CASES[case]
    fill = {"tmp": str(tmp_path), "cards": str(cards)}
    run([a.format(**fill) for a in argv], capsys, expect.format(**fill))


def test_absent_device_is_named(cards, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run(["load", "alpha-vqa", "--device", "cuda"], capsys, ["device 'cuda' is absent", "no usable CUDA device"])
    run(["load", "alpha-vqa", "--device", "cuda:1"], capsys, "device 'cuda:1' is absent")


def test_env_cards_dir_that_does_not_exist(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ZOO_MODEL_CARDS", str(tmp_path / "gone"))
    run(["list"], capsys, "($ZOO_MODEL_CARDS) does not exist")


def test_relative_card_uri_resolves_against_the_cards_folder(cards, tmp_path, monkeypatch):
    from zoo.catalog.cards import Catalog

    monkeypatch.chdir(tmp_path)
    card = Catalog.from_dir(cards).get("beta-rel")
    assert card.uri == str((cards / "weights" / "ckpt").resolve())


def test_bad_cards_are_named(cards, capsys):
    (cards / "broken-1.0.0.md").write_text("---\nname: broken\nversion: [1\n---\n")
    run(["list"], capsys, ["broken-1.0.0.md", "line 4, column 1", "front matter is not valid YAML"])
    (cards / "broken-1.0.0.md").write_text("---\nname: a..b\nversion: '1.0.0'\ntask_family: vqa\ndescription: d\n"
                                           "license: mit\nconfig: {lm: {}}\nuri: /x\n---\n")
    run(["list"], capsys, ["broken-1.0.0.md", "card name 'a..b' may not contain '..'"])


def test_a_local_directory_named_like_a_card_does_not_shadow_it(cards, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "alpha-vqa").mkdir()
    run(["load", "alpha-vqa"], capsys, ["'alpha-vqa' is both a directory here and a model card name",
                                        "./alpha-vqa", "alpha-vqa@1.0.0"])
    run(["eval", "alpha-vqa", "--family", "vqa"], capsys, "is both a directory here and a model card name")
    run(["load", "./alpha-vqa"], capsys, "alpha-vqa")  # the directory, explicitly: its own error (no checkpoint)
    assert "both" not in capsys.readouterr().err


# ---------------------------------------------------------------------------- error classes


def test_os_errors_name_operation_path_and_reason(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    recipe = _write_recipe(tmp_path, lambda r: None)
    run(["train", str(recipe), "--out", str(blocker / "run")], capsys,
        ["cannot create the directory", str(blocker / "run"), "is a file, not a directory"])
    real_mkdir = pathlib.Path.mkdir
    for code, reason in ((errno.EROFS, "read-only"), (errno.ENOSPC, "disk full"), (errno.EACCES, "permission denied")):
        def refuse(self, *args, _code=code, **kwargs):
            if "target" in str(self):
                raise OSError(_code, os.strerror(_code), str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "mkdir", refuse)
        run(["train", str(recipe), "--out", str(tmp_path / "target")], capsys,
            ["cannot create the directory", str(tmp_path / "target"), reason])
    monkeypatch.setattr(pathlib.Path, "mkdir", real_mkdir)


def test_network_errors_say_the_command_needs_the_network(tmp_path, capsys, monkeypatch):
    from huggingface_hub.errors import OfflineModeIsEnabled

    from zoo.io.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2)}, {"model": {}})

    def offline(**kw):
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled.")

    monkeypatch.setattr(zoo_cli, "create_repo", offline)
    run(["publish", str(ckpt), "--repo", "org/name"], capsys, ["`zoo publish` needs the network", "HF_HUB_OFFLINE is set"])

    import requests

    def unreachable(**kw):
        raise requests.ConnectionError("Failed to establish a new connection: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(zoo_cli, "create_repo", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    run(["publish", str(ckpt), "--repo", "org/name"], capsys, ["`zoo publish` needs the network", "unreachable"])


def test_an_unexpected_error_is_one_line_naming_its_class(capsys, monkeypatch):
    monkeypatch.setattr(zoo_cli, "cmd_list", lambda args: 1 / 0)
    parser, _ = zoo_cli.make_parser()
    assert zoo_cli.run_cli(parser, ["list"], zoo_cli.ERRORS) == 1
    assert "unexpected ZeroDivisionError: division by zero" in one_line_error(capsys)
    monkeypatch.setenv("ZOO_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        zoo_cli.run_cli(parser, ["list"], zoo_cli.ERRORS)


def test_describe_names_each_class():
    import yaml as pyyaml

    from zoo.errors import describe

    try:
        pyyaml.safe_load("a: [1\n")
    except pyyaml.YAMLError as e:
        assert "line 2" in describe(e) and "YAML syntax error" in describe(e)
    assert describe(KeyError("no such family 'x'")) == "no such family 'x'"
    assert "no CUDA device" in describe(AssertionError("Torch not compiled with CUDA enabled"))
    assert "unknown device" in describe(RuntimeError("Expected one of cpu, cuda device type at start of device string: gpu"))
    err = OSError(errno.ENOTDIR, "Not a directory", "/a/b")
    assert describe(err) == "cannot access '/a/b': a part of the path is a file, not a directory"
    assert describe(FileNotFoundError("recipe 'x' does not exist")) == "recipe 'x' does not exist"


# ------------------------------------------------------------------------------ the data CLI

DATA = "python -m zoo.pipelines.data"


def data_main(argv):
    from zoo.pipelines.data.__main__ import main as dmain

    return dmain(argv)


def _png(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (4, 4), (255, 0, 0)).save(path)


def _entry(i="a", image="img.png", conv=None):
    e = {"id": i, "conversations": conv if conv is not None else [{"from": "human", "value": "<image>\nwhat?"},
                                                                  {"from": "gpt", "value": "red"}]}
    if image is not None:
        e["image"] = image
    return e


LLAVA_CASES = {
    "not-json": ("{not json", ["not valid JSON", "line 1, column 2"]),
    "not-utf8": (b"\xff\xfe\x00", "not UTF-8"),
    "not-a-list": ({"id": 1}, "expected a JSON list of entries, got dict"),
    "entry-not-object": (["hello"], ["entry 0", "must be an object"]),
    "entry-no-id": ([{"conversations": []}], ["entry 0", "needs an 'id'"]),
    "entry-id-list": ([{"id": [1], "conversations": []}], ["entry 0", "needs an 'id'"]),
    "no-conversations": ([{"id": "a"}], ["entry 0 (id 'a')", "'conversations' must be a non-empty list"]),
    "empty-conversations": ([_entry(conv=[])], ["entry 0 (id 'a')", "'conversations' must be a non-empty list"]),
    "gpt-first": ([_entry(conv=[{"from": "gpt", "value": "x"}])], ["entry 0 (id 'a')", "turn 0 should be from 'human'"]),
    "human-alone": ([_entry(conv=[{"from": "human", "value": "x"}])], ["entry 0 (id 'a')", "not followed by a 'gpt' turn"]),
    "turn-not-object": ([_entry(conv=["hi", "there"])], ["entry 0 (id 'a')", "turn 0 should be from 'human', got 'hi'"]),
    "answer-turn-not-object": ([_entry(conv=[{"from": "human", "value": "q"}, "a"])], ["entry 0", "not followed by a 'gpt' turn"]),
    "value-not-string": ([_entry(conv=[{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}])],
                         ["entry 0 (id 'a')", "turn 1 'value' must be a string"]),
    "empty-answer": ([_entry(conv=[{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}])],
                     ["entry 0 (id 'a')", "empty answer"]),
    "image-absolute": ([_entry(image="/etc/passwd")], ["entry 0 (id 'a')", "must be relative to the image root"]),
    "image-escapes": ([_entry(image="../secret.png")], ["entry 0 (id 'a')", "resolves outside the image root"]),
    "image-not-string": ([_entry(image=["img.png"])], ["entry 0 (id 'a')", "'image' must be a path"]),
    "image-missing": ([_entry(image="nope.png")], ["entry 0 (id 'a')", "nope.png does not exist"]),
    "image-not-an-image": ([_entry(image="bad.png")], ["entry 0 (id 'a')", "is not an image PIL can read"]),
    "duplicate-id": ([_entry(), _entry(i="a")], ["entry 1 (id 'a')", "like entry 0"]),
    "second-entry-bad": ([_entry(), _entry(i="b", conv=[{"from": "robot"}])], ["entry 1 (id 'b')", "should be from 'human'"]),
}


@pytest.mark.parametrize("case", sorted(LLAVA_CASES))
def test_llava_importer_names_the_entry(case, tmp_path, capsys):
    content, expect = LLAVA_CASES[case]
    images = tmp_path / "images"
    images.mkdir()
    _png(images / "img.png")
    (images / "bad.png").write_bytes(b"not a png")
    (tmp_path / "secret.png").write_bytes(b"")
    src = tmp_path / "llava.json"
    if isinstance(content, bytes):
        src.write_bytes(content)
    else:
        src.write_text(content if isinstance(content, str) else json.dumps(content))
    run(["import-llava", "--json", str(src), "--image-root", str(images), "--out", str(tmp_path / "out"), "--quiet"],
        capsys, expect, prog=DATA, entry=data_main)
    assert not (tmp_path / "out").exists()


DATA_CASES = {
    "build-negative": (["build", "--out", "{tmp}/d", "--max-per-split", "-1"], "--max-per-split must be >= 1, got -1"),
    "build-under-file": (["build", "--out", "{tmp}/file/d", "--max-per-split", "1", "--families", "corpus", "--quiet"],
                         ["cannot create the directory", "is a file, not a directory"]),
    "import-image-size": (["import-llava", "--json", "x", "--image-root", "y", "--out", "z", "--image-size", "0"],
                          "--image-size must be >= 1"),
    "import-root-missing": (["import-llava", "--json", "{tmp}/file", "--image-root", "{tmp}/noroot", "--out", "{tmp}/o"],
                            "image root '{tmp}/noroot' is not a directory"),
    "import-json-missing": (["import-llava", "--json", "{tmp}/nope.json", "--image-root", "{tmp}", "--out", "{tmp}/o"],
                            ["cannot open", "nope.json", "no such file or directory"]),
    "show-not-built": (["show", "{tmp}"], "not a built data directory"),
    "show-negative": (["show", "{tmp}", "-n", "-2"], "-n must be >= 0"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_data_cli_errors_are_one_line(case, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    argv, expect = DATA_CASES[case]
    fill = {"tmp": str(tmp_path)}
    expect = [e.format(**fill) for e in ([expect] if isinstance(expect, str) else expect)]
    run([a.format(**fill) for a in argv], capsys, expect, prog=DATA, entry=data_main)


def test_data_show_unknown_split(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text(json.dumps({"splits": {"train": {"count": 0, "shards": []}}}))
    run(["show", str(tmp_path), "--split", "tst"], capsys, "has no split 'tst'; it has ['train']", prog=DATA, entry=data_main)


# ------------------------------------------------------------------------------------- locks


HOLDER = textwrap.dedent("""
    import sys, time
    from zoo.io.locks import hold_lock
    with hold_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def _holder(directory: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_training_process_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _holder(out, 30)
    try:
        run(["train", "micro", "--out", str(out)], capsys,
            [f"run directory '{out}' is in use by process {holder.pid}", "--wait"])
    finally:
        holder.kill()
        holder.wait()


def test_wait_takes_the_lock_when_the_holder_ends_and_a_kill_leaves_no_stale_lock(tmp_path):
    from zoo.io.locks import DirectoryBusy, hold_lock

    out = tmp_path / "run"
    holder = _holder(out, 0.5)
    waited = []
    with hold_lock(out, wait=True, on_wait=waited.append):
        assert (out / ".zoo-lock").read_text() == str(os.getpid())
    assert waited == [holder.pid]
    holder.wait()
    holder = _holder(out, 30)
    with pytest.raises(DirectoryBusy, match=f"still in use by process {holder.pid} after waiting 0.2 s"):
        with hold_lock(out, wait=0.2):
            pass
    holder.kill()  # kill -9: the kernel drops the lock with the process
    holder.wait()
    with hold_lock(out):
        pass


def test_the_next_run_removes_temporaries_a_kill_left(tmp_path, monkeypatch):
    from zoo.pipelines import runner
    from zoo.pipelines.stages import RecipeConfig

    out = tmp_path / "run"
    left = [out / "pretrain-lm" / "train" / "checkpoints" / ".step-00000002.tmp-ab12_x",
            out / "pretrain-lm" / ".model.old-9zz", out / "pretrain-lm" / "train" / "checkpoints" / ".tmp-step-00000004"]
    for d in left:
        d.mkdir(parents=True)
        (d / "weights.safetensors").write_bytes(b"partial")
    files = [out / "features" / "tmpk2j3_x.tmp", out / ".results.md.abc123.tmp"]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("partial")
    keep = [out / "pretrain-lm" / "train" / "checkpoints" / "step-00000002" / "weights.safetensors", out / "data" / "x.tmp"]
    for f in keep:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("complete")
    seen = {}

    def fake_run(recipe, out_dir, only, resume, data_dir, engine):
        seen["lock"] = (out_dir / ".zoo-lock").read_text()
        seen["left"] = [p for p in [*left, *files] if p.exists()]
        return {}

    monkeypatch.setattr(runner, "_run_locked", fake_run)
    assert runner.run_recipe(RecipeConfig.load("micro"), out) == {}
    assert seen == {"lock": str(os.getpid()), "left": []}
    assert all(f.exists() for f in keep)


# ------------------------------------------------------------------------------- non-finite


def test_nonfinite_names_the_last_checkpoint_with_finite_weights_and_loss(tmp_path):
    from zoo.io.checkpoint import save_checkpoint
    from zoo.pipelines.nonfinite import nonfinite_message

    ckpts = [save_checkpoint(tmp_path / "checkpoints" / f"step-{s:08d}", {"w": torch.full((2,), v)}, {})
             for s, v in ((2, 1.0), (4, float("inf")))]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 5)))
    msg = nonfinite_message("moe-tune", 4, "gradient norm is nan", ckpts, metrics)
    assert "stage 'moe-tune': gradient norm is nan at step 5" in msg
    assert f"last good checkpoint: {ckpts[0]}" in msg and "['step-00000004']" in msg and "halted" in msg
    metrics.write_text("".join(json.dumps({"step": s, "loss": float("nan") if s == 2 else 1.0}) + "\n" for s in range(1, 5)))
    assert "last good checkpoint: none" in nonfinite_message("s", 4, "loss is nan", ckpts, metrics)


# ---------------------------------------------------------------------------- smaller cases


def test_zoo_quiet_silences_transformers_progress_bars(monkeypatch):
    from transformers.utils import logging as hf_logging

    from zoo.progress import quiet_while

    monkeypatch.delenv("ZOO_QUIET", raising=False)
    hf_logging.enable_progress_bar()
    with quiet_while(True):
        assert not hf_logging.is_progress_bar_enabled()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert hf_logging.is_progress_bar_enabled()
    monkeypatch.setenv("ZOO_QUIET", "1")  # the environment alone, no --quiet
    with quiet_while(False):
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()


def test_config_errors_keep_their_classes_and_pickle():
    import pickle

    from zoo.config import ConfigError, ConfigTypeError, config_from_dict
    from zoo.pipelines.optim import OptimConfig

    with pytest.raises(TypeError) as info:
        config_from_dict(OptimConfig, {"lr": "fast"})
    assert isinstance(info.value, ConfigTypeError) and isinstance(info.value, ValueError)
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value) == "lr: expected a number, got 'fast' (str)"
    assert isinstance(ConfigError("x", ("a", "[0]", "b"), "f.yaml"), ValueError)
    assert str(ConfigError("x", ("a", "[0]", "b"), "f.yaml")) == "f.yaml: a[0].b: x"
