"""The `zoo` CLI without a trained model: list, argument handling, helpful errors, publish (mocked)."""

from __future__ import annotations

import pytest
import torch

from zoo import cli
from zoo.io.checkpoint import save_checkpoint
from zoo.pipelines.cli import main


@pytest.fixture
def cards(tmp_path, monkeypatch):
    d = tmp_path / "cards"
    d.mkdir()
    base = "task_family: {fam}\ndescription: {desc}\nlicense: apache-2.0\nconfig: {{lm: {{}}}}\nmetrics: {{}}\n"
    for name, version, fam, extra in [
        ("alpha-vqa", "1.0.0", "vqa", "recipe: missing/recipe.yaml\noutput: lora-vqa\n"),
        ("alpha-vqa", "1.2.0", "vqa", "recipe: missing/recipe.yaml\noutput: lora-vqa\n"),
        ("beta-asr", "0.3.0", "asr", f"uri: {tmp_path / 'nowhere'}\n"),
    ]:
        (d / f"{name}-{version}.md").write_text(
            f"---\nname: {name}\nversion: '{version}'\n" + base.format(fam=fam, desc=f"{name} model") + extra + "---\n"
        )
    monkeypatch.setenv("ZOO_MODEL_CARDS", str(d))
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "home"))
    return d


def test_list(cards, capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "TASK", "FAMILY", "STATUS", "DESCRIPTION"]
    assert lines[1].split()[:5] == ["alpha-vqa", "1.2.0", "vqa", "not", "built"]
    assert lines[2].split()[:4] == ["beta-asr", "0.3.0", "asr", "remote"]
    assert main(["list", "--all-versions", "--task-family", "vqa"]) == 0
    assert [ln.split()[1] for ln in capsys.readouterr().out.splitlines()[1:]] == ["1.0.0", "1.2.0"]
    assert main(["list", "gamma-*"]) == 0
    assert "no registered model matches pattern 'gamma-*'" in capsys.readouterr().err


def test_errors_name_the_cause(cards, capsys):
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err
    assert main(["load", "gamma"]) == 1
    assert "zoo: error: unknown model 'gamma'" in capsys.readouterr().err
    assert main(["build", "alpha-vqa@^1.0"]) == 1
    assert "alpha-vqa@1.2.0: its recipe 'missing/recipe.yaml' does not exist" in capsys.readouterr().err
    assert main(["build", "beta-asr"]) == 1
    assert "beta-asr@0.3.0 has no recipe to build it; it is fetched from" in capsys.readouterr().err
    assert main(["load", "beta-asr"]) == 1
    err = capsys.readouterr().err
    assert "nowhere'" in err and "no such file or directory" in err
    assert main(["export", "alpha-vqa", "--format", "onnx", "--out", "x"]) == 2
    assert main(["export", "alpha-vqa", "--format", "hf", "--out", "x"]) == 1
    assert "zoo build alpha-vqa@1.2.0" in capsys.readouterr().err


@pytest.fixture
def uploads(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "create_repo", lambda **kw: calls.append(("create_repo", kw)))

    class Info:
        commit_url = "https://huggingface.co/org/name/commit/abc"

    monkeypatch.setattr(cli, "upload_folder", lambda **kw: calls.append(("upload_folder", kw)) or Info())
    return calls


def test_publish_arguments(tmp_path, uploads, capsys):
    ckpt = save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2)}, {"model": {}})
    assert main(["publish", str(ckpt), "--repo", "org/name", "--private", "--revision", "dev", "--message", "v1"]) == 0
    assert uploads == [
        ("create_repo", {"repo_id": "org/name", "repo_type": "model", "private": True, "exist_ok": True}),
        ("upload_folder", {"repo_id": "org/name", "folder_path": str(ckpt), "repo_type": "model",
                           "commit_message": "v1", "revision": "dev"}),
    ]
    out = capsys.readouterr().out
    assert "uploaded" in out and "commit/abc" in out
    uploads.clear()
    assert main(["publish", str(ckpt), "--repo", "org/name", "--dry-run"]) == 0
    assert uploads == [] and "would upload" in capsys.readouterr().out

    for argv, message in [
        ([str(ckpt), "--repo", "name-only"], "--repo must be 'org/name', got 'name-only'"),
        ([str(ckpt), "--repo", "a/b/c"], "--repo must be 'org/name'"),
        ([str(tmp_path / "absent"), "--repo", "org/name"], "is not a directory"),
        ([str(tmp_path), "--repo", "org/name"], "has no manifest.json"),
    ]:
        assert main(["publish", *argv]) == 1
        assert message in capsys.readouterr().err
    (ckpt / "config.json").write_text("{}\n")
    assert main(["publish", str(ckpt), "--repo", "org/name"]) == 1
    assert "file 'config.json' has" in capsys.readouterr().err
    assert main(["publish", str(ckpt)]) == 2  # --repo is required
    assert uploads == []
