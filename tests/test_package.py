"""Packaging invariants and the README's main job at smoke size."""

import subprocess
import sys
import tomllib
from pathlib import Path

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


def test_demo_runs_end_to_end_at_smoke_size(capsys):
    from zoo.pipelines import demo

    demo.main(["--dense-steps", "3", "--moe-steps", "3"])
    out = capsys.readouterr().out
    assert "max |logit diff| vs dense" in out
    assert "load per expert" in out and "greedy sample:" in out
