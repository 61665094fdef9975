"""Packaging invariants: every package listed, a real wheel that works outside the repository, the
library never importing training code, and the top-level `kernels/` folder invisible to transformers."""

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = {"zoo": "zoo", "encoders": "zoo.encoders", "kernels": "zoo.kernels", "pipelines": "zoo.pipelines"}
DATA = {"model_cards": "zoo.model_cards", "configs": "zoo.configs"}
LIBRARY = ("zoo", "encoders", "kernels")


def test_every_package_folder_is_listed_in_pyproject():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"] == {v: k for k, v in {**CODE, **DATA}.items()}
    found = set(DATA.values())
    for folder, name in CODE.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    found |= {f"zoo.configs.{p.name}" for p in (ROOT / "configs").iterdir() if p.is_dir()}
    assert found == set(setup["packages"]), "pyproject [tool.setuptools] packages must list every package folder"


def test_model_library_never_imports_training_code_not_even_lazily():
    bad = []
    for folder in LIBRARY:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names if n.startswith("zoo.pipelines")]
    assert not bad, bad
    code = (
        "import sys, pkgutil, importlib\n"
        "seen = []\n"
        "for top in ('zoo', 'zoo.encoders', 'zoo.kernels'):\n"
        "    pkg = importlib.import_module(top)\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, top + '.'):\n"
        "        importlib.import_module(m.name); seen.append(m.name)\n"
        "assert 'zoo.moe.layer' in seen and 'zoo.kernels.reference' in seen, seen\n"
        "bad = [m for m in sys.modules if m.startswith('zoo.pipelines')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_kernels_folder_does_not_change_what_transformers_sees_from_the_repository_root(tmp_path):
    code = (
        "import sys\n"
        "from transformers.utils.import_utils import _is_package_available, is_kernels_available\n"
        "shadow = sys.modules.get('kernels')  # what a probe imported under that name, if anything\n"
        "print(_is_package_available('kernels', return_version=True)[0], is_kernels_available(),\n"
        "      getattr(shadow, '__all__', None), [m for m in sys.modules if m.startswith('kernels.')])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    here = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, check=True)
    away = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, check=True)
    assert here.stdout == away.stdout, (here.stdout, away.stdout)
    assert here.stdout.split()[0] == "False", "transformers took the repository's kernels/ folder for the HF kernels package"


@pytest.mark.slow
def test_a_built_wheel_works_outside_the_repository(tmp_path):
    """`pip install .` (not editable) ships the cards and configs: listed and resolved from a wheel."""
    dist, target = tmp_path / "dist", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
                   check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = dist.glob("moe_zoo-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, cwd=tmp_path)
    code = (
        "import zoo, zoo.pipelines.engines.deepspeed_engine as ds\n"
        "from zoo.pipelines.stages import RecipeConfig\n"
        f"assert zoo.__file__.startswith({str(target)!r}), zoo.__file__\n"
        "cards = zoo.list_models()\n"
        "print(len(cards), sorted(c.name for c in cards))\n"
        "recipe = RecipeConfig.load('tiny-zoo')\n"
        "print(recipe.outputs()[-1], ds.config_path('zero2_bf16').name)\n"
        "card = zoo.get_card('tiny-zoo-vqa')\n"
        "print(card.resolve_path(card.recipe).is_file())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("ZOO_MODEL_CARDS",)}
    env["PYTHONPATH"] = str(target)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    shipped = len([p for p in (ROOT / "model_cards").glob("*.md") if p.name.lower() != "readme.md"])
    assert lines[0].startswith(f"{shipped} ") and "tiny-zoo-vqa" in lines[0], lines
    assert lines[1] == "lora-vqa zero2_bf16.json" and lines[2] == "True", lines


@pytest.mark.slow
def test_demo_builds_loads_and_reports_a_recipe_at_smoke_size(tmp_path, monkeypatch, capsys):
    """The README's main job, on the micro recipe: build via a card, zoo.load, print the table."""
    from zoo.pipelines import demo

    card = (ROOT / "model_cards" / "tiny-zoo-vqa.md").read_text()
    card = card.replace("name: tiny-zoo-vqa", "name: micro-vqa").replace(
        "recipe: configs/recipes/tiny-zoo.yaml", f"recipe: {ROOT / 'configs/recipes/micro.yaml'}").replace(
        "config: configs/models/tiny-zoo.yaml", f"config: {ROOT / 'configs/models/micro-zoo.yaml'}")
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "micro-vqa.md").write_text(card)
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "home"))
    demo.main(["--cards-dir", str(tmp_path / "cards"), "--recipe", "micro"])
    out = capsys.readouterr().out
    assert "micro-vqa@1.1.0" in out and "vqa/exact_match" in out and "reference" in out
    assert "published (card)" in out  # the card's figure next to this build's
    demo.main(["--cards-dir", str(tmp_path / "cards"), "--recipe", "micro"])  # built: loads only
    assert "building" not in capsys.readouterr().out
