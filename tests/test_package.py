"""Packaging invariants and the README's main job at smoke size."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"zoo": "zoo", "encoders": "zoo.encoders", "kernels": "zoo.kernels", "pipelines": "zoo.pipelines"}


def test_every_python_package_folder_is_listed_in_pyproject():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"] == {v: k for k, v in FOLDERS.items()}
    found = set()
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    assert found == set(setup["packages"]), "pyproject [tool.setuptools] packages must list every package folder"


def test_model_library_never_imports_training_code():
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
    assert "micro-vqa@1.0.0" in out and "vqa/exact_match" in out and "reference" in out
    demo.main(["--cards-dir", str(tmp_path / "cards"), "--recipe", "micro"])  # built: loads only
    assert "building" not in capsys.readouterr().out
