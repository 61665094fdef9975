"""`zoo build` / `zoo.load` / `zoo export` on checkpoints built once by the micro recipe.

One module-scoped build (`zoo build` through the CLI, ~45 s) runs `configs/recipes/micro.yaml`
into a temporary `$ZOO_HOME` and installs every card naming that recipe; every other test here
reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import zoo
from zoo.io.checkpoint import CheckpointError, verify_checkpoint
from zoo.pipelines.cli import main
from zoo.io.hub import IntegrityError
from zoo.catalog.install import LoadError, NotBuiltError, install_dir, read_card, set_card_metrics
from zoo.catalog.cards import CatalogError, get_card

ROOT = Path(__file__).resolve().parents[1]
MICRO = ROOT / "configs" / "recipes" / "micro.yaml"


def _write_card(cards: Path, name: str, version: str = "1.0.0", **fields) -> None:
    body = {"name": name, "version": f'"{version}"', "task_family": fields.pop("task_family", "vqa"),
            "description": "Micro test model.", "license": "apache-2.0",
            "config": str(ROOT / "configs" / "models" / "micro-zoo.yaml"), **fields}
    lines = "".join(f"{k}: {v}\n" for k, v in body.items())
    (cards / f"{name}-{version}.md").write_text(f"---\n{lines}metrics: {{}}\n---\n# {name}\n")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(env, build seconds): ZOO_HOME and ZOO_MODEL_CARDS of a zoo whose micro cards are built."""
    import time

    root = tmp_path_factory.mktemp("zoo")
    cards = root / "cards"
    cards.mkdir()
    for version in ("1.0.0", "1.1.0"):
        _write_card(cards, "micro-vqa", version, recipe=str(MICRO), output="lora-vqa")
    _write_card(cards, "micro-asr", recipe=str(MICRO), output="lora-asr", task_family="asr")
    _write_card(cards, "micro-moe", recipe=str(MICRO), output="moe-tune", task_family="multitask")
    _write_card(cards, "micro-esft", recipe=str(MICRO), output="esft", base="micro-moe@^1.0", task_family="multitask")
    other = root / "other.yaml"  # a recipe nobody builds
    other.write_text(MICRO.read_text().replace("../models/micro-zoo.yaml", str(ROOT / "configs/models/micro-zoo.yaml")))
    _write_card(cards, "micro-other", recipe=str(other), output="lora-vqa")
    env = {"ZOO_HOME": str(root / "home"), "ZOO_MODEL_CARDS": str(cards)}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        start = time.perf_counter()
        assert main(["build", "micro-vqa"]) == 0
        seconds = time.perf_counter() - start
    return env, seconds


@pytest.fixture(autouse=True)
def _zoo_env(request, monkeypatch):
    if "built" in request.fixturenames:
        env, _ = request.getfixturevalue("built")
        for k, v in env.items():
            monkeypatch.setenv(k, v)


def _batch(processor):
    return processor(text=["<image> what is this?", "<audio> transcribe"],
                     images=[torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(1))],
                     audio=[torch.randn(8000, generator=torch.Generator().manual_seed(2)).numpy()])


def test_build_installs_every_card_of_the_recipe(built, capsys):
    home = Path(built[0]["ZOO_HOME"])
    for ref in ("micro-vqa/1.0.0", "micro-vqa/1.1.0", "micro-asr/1.0.0", "micro-moe/1.0.0", "micro-esft/1.0.0"):
        verify_checkpoint(home / "models" / ref)
        name, version = ref.split("/")
        card = read_card(home / "models" / ref)
        assert (card["name"], card["version"]) == (name, version)
    assert not (home / "models" / "micro-other").exists()
    assert not [p for p in (home / "models").rglob(".*tmp*")], "temporary directories left behind"
    assert main(["build", "micro-asr"]) == 0
    assert "already built" in capsys.readouterr().out


def test_load_round_trip_equals_the_recipe_output(built):
    from zoo.pipelines.runner import load_model

    model, processor = zoo.load("micro-vqa", "^1.0")
    assert (install_dir(get_card("micro-vqa", "^1.0")) / "README.md").read_text().count("name: micro-vqa") == 1
    ref, _ = load_model(Path(built[0]["ZOO_HOME"]) / "runs" / "micro" / "lora" / "vqa" / "model")
    ref.eval()
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    batch = _batch(processor)
    assert batch["input_ids"].shape[0] == 2
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref(**batch).logits)
    model16, _ = zoo.load("micro-vqa@1.0.0", dtype=torch.bfloat16)
    assert next(model16.parameters()).dtype == torch.bfloat16


def test_expert_adapter_card_installs_only_the_adapter_and_loads_onto_its_base(built, tmp_path, monkeypatch, capsys):
    """ESFT: the adapter card holds the selected experts alone; base + adapter == the esft output exactly."""
    from zoo.io.checkpoint import weights_identity
    from zoo.io.expert_adapter import read_expert_adapter
    from zoo.pipelines.runner import load_model

    home = Path(built[0]["ZOO_HOME"])
    installed = home / "models" / "micro-esft" / "1.0.0"
    assert not (installed / "model.safetensors").exists()  # not a whole model
    adapter = read_expert_adapter(installed)
    assert adapter.base == "micro-moe@1.0.0"
    assert adapter.base_sha256 == weights_identity(home / "models" / "micro-moe" / "1.0.0")
    assert adapter.experts and all(adapter.experts.values())
    output = home / "runs" / "micro" / "esft" / "model"
    stored = sum(p.stat().st_size for p in installed.rglob("*.safetensors"))
    whole = sum(p.stat().st_size for p in output.rglob("*.safetensors"))
    assert stored < whole / 2, (stored, whole)

    model, processor = zoo.load("micro-esft")
    ref, _ = load_model(output)
    got, want = model.state_dict(), ref.eval().state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), "base + adapter != merged"
    base_model, _ = zoo.load("micro-moe")
    differs = [k for k in got if not torch.equal(got[k], base_model.state_dict()[k])]
    assert differs and all(".experts." in k for k in differs), differs  # only expert rows changed
    batch = _batch(processor)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref(**batch).logits)
    assert main(["load", "micro-esft"]) == 0
    assert "micro-esft@1.0.0: micro-zoo," in capsys.readouterr().out

    # The same adapter over another base (micro-vqa: the moe-tune model with a LoRA merged in) is refused.
    cards = tmp_path / "cards"
    shutil.copytree(built[0]["ZOO_MODEL_CARDS"], cards)
    text = (cards / "micro-esft-1.0.0.md").read_text().replace("base: micro-moe@^1.0", "base: micro-vqa@1.0.0")
    (cards / "micro-esft-1.0.0.md").write_text(text)
    monkeypatch.setenv("ZOO_MODEL_CARDS", str(cards))
    other = weights_identity(home / "models" / "micro-vqa" / "1.0.0")
    with pytest.raises(CheckpointError, match=rf"made for base {adapter.base_sha256}, but .* is {other}"):
        zoo.load("micro-esft")
    (cards / "micro-esft-1.0.0.md").write_text(text.replace("base: micro-vqa@1.0.0", "base: micro-esft@1.0.0"))
    with pytest.raises(LoadError, match=r"its base micro-esft@1.0.0 is itself an expert adapter"):
        zoo.load("micro-esft")


def test_registry_errors_and_not_built(built, capsys):
    with pytest.raises(CatalogError, match=r"unknown model 'micro-vq'.*did you mean \['micro-vqa'"):
        zoo.load("micro-vq")
    with pytest.raises(CatalogError, match=r"no version of 'micro-vqa' satisfies version '\^2.0'; available: 1.0.0, 1.1.0"):
        zoo.load("micro-vqa", "^2.0")
    with pytest.raises(NotBuiltError, match=r"micro-other@1.0.0 is not built yet.*; build it with `zoo build micro-other@1.0.0`"):
        zoo.load("micro-other")
    assert main(["load", "micro-other"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("zoo: error: micro-other@1.0.0 is not built yet") and "zoo build micro-other@1.0.0" in err
    assert main(["load", "micro-vqa", "--version", "3.0.0"]) == 1
    assert "no version of 'micro-vqa' satisfies version '3.0.0'" in capsys.readouterr().err
    assert main(["load", "micro-vqa@1.0.0"]) == 0
    assert "micro-vqa@1.0.0: micro-zoo," in capsys.readouterr().out


def _corrupt(kind: str, directory: Path) -> str:
    if kind == "truncated":
        path = directory / "model.safetensors"
        path.write_bytes(path.read_bytes()[:-100])
        return r"file 'model.safetensors' has \d+ bytes, the manifest says \d+ \(truncated"
    if kind == "flipped":
        path = directory / "tokenizer" / "tokenizer.json"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        return r"file 'tokenizer/tokenizer.json' is corrupted: sha256"
    (directory / "config.json").unlink()
    return r"file 'config.json' listed in the manifest is missing"


@pytest.mark.parametrize("kind", ["truncated", "flipped", "missing"])
def test_corrupted_install_is_named_with_the_fix(built, tmp_path, monkeypatch, kind):
    home = tmp_path / "home"
    shutil.copytree(Path(built[0]["ZOO_HOME"]) / "models" / "micro-asr", home / "models" / "micro-asr")
    monkeypatch.setenv("ZOO_HOME", str(home))
    message = _corrupt(kind, home / "models" / "micro-asr" / "1.0.0")
    with pytest.raises(CheckpointError, match=message) as info:
        zoo.load("micro-asr")
    assert "zoo build micro-asr@1.0.0 --force" in str(info.value)


def _tar(directory: Path, path: Path) -> str:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(directory, arcname="micro-asr")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _archive_card(cards: Path, uri: str, sha: str) -> None:
    for p in cards.glob("*.md"):
        p.unlink()
    _write_card(cards, "micro-asr", uri=uri, sha256=f"'{sha}'", task_family="asr")


def test_archive_uri_unpacks_atomically_and_refuses_bad_archives(built, tmp_path, monkeypatch):
    good_dir = Path(built[0]["ZOO_HOME"]) / "models" / "micro-asr" / "1.0.0"
    cards, home = tmp_path / "cards", tmp_path / "home"
    cards.mkdir()
    monkeypatch.setenv("ZOO_MODEL_CARDS", str(cards))
    monkeypatch.setenv("ZOO_HOME", str(home))
    target = home / "models" / "micro-asr"

    # A corrupted file inside an archive whose own hash is right: refused, nothing installed.
    bad = tmp_path / "bad"
    shutil.copytree(good_dir, bad)
    _corrupt("flipped", bad)
    _archive_card(cards, str(tmp_path / "bad.tar.gz"), _tar(bad, tmp_path / "bad.tar.gz"))
    with pytest.raises(CheckpointError, match="tokenizer/tokenizer.json' is corrupted"):
        zoo.load("micro-asr")
    assert not target.exists() or not list(target.iterdir()), "a half-unpacked checkpoint was left in the cache"

    # A truncated archive (hash of the full one): sha256 mismatch, nothing installed.
    sha = _tar(good_dir, tmp_path / "good.tar.gz")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes((tmp_path / "good.tar.gz").read_bytes()[:-500])
    _archive_card(cards, f"file://{cut}", sha)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        zoo.load("micro-asr")
    assert not target.exists() or not list(target.iterdir())

    # The good archive over HTTP from a server on 127.0.0.1: downloaded, verified, unpacked, loaded.
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/good.tar.gz"
        _archive_card(cards, url, "0" * 64)
        with pytest.raises(IntegrityError, match="the downloaded file was removed"):
            zoo.load("micro-asr")
        assert not list((home / "downloads").rglob("*.tar.gz*"))
        _archive_card(cards, url, sha)
        model, _ = zoo.load("micro-asr")
    finally:
        server.shutdown()
    verify_checkpoint(target / "1.0.0")
    from zoo.catalog import load_directory

    ref, processor, _ = load_directory(good_dir)
    batch = _batch(processor)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref(**batch).logits)


def test_set_card_metrics_keeps_the_checkpoint_verifiable(built, tmp_path, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(Path(built[0]["ZOO_HOME"]) / "models" / "micro-asr", home / "models" / "micro-asr")
    directory = home / "models" / "micro-asr" / "1.0.0"
    set_card_metrics(directory, {"exact_match": {"value": 0.5, "command": "zoo eval micro-asr", "dataset": "asr/test"}})
    verify_checkpoint(directory)
    assert read_card(directory)["metrics"] == [
        {"name": "exact_match", "value": 0.5, "command": "zoo eval micro-asr", "dataset": "asr/test"}
    ]


def test_export_hf_loads_in_plain_transformers(built, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", "micro-moe", "--format", "hf", "--out", str(out)]) == 0
    assert "exported micro-moe@1.0.0" in capsys.readouterr().out
    verify_checkpoint(out)
    readme = (out / "README.md").read_text()
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    for rel in ("language_model/", "encoders/image.safetensors", "encoders/audio.safetensors",
                "connectors/image.safetensors", "connectors/audio.safetensors", "multimodal_config.json",
                "processor/", "MODEL_CARD.md", "Qwen2MoeForCausalLM", "cannot represent"):
        assert rel in readme, rel
    assert {"language_model/config.json", "language_model/tokenizer.json", "processor/processor.json"} <= files

    model, processor = zoo.load("micro-moe")
    for kind in ("encoders", "connectors"):
        for modality, module in getattr(model, kind).items():
            saved = load_file(str(out / kind / f"{modality}.safetensors"))
            want = module.state_dict()
            assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in saved)
    ids = processor(text=["a red shirt", "one two"])["input_ids"]
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    script = textwrap.dedent(f"""
        import sys, torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
        d = {str(out / "language_model")!r}
        model = AutoModelForCausalLM.from_pretrained(d).eval()
        tok = AutoTokenizer.from_pretrained(d)
        ids = load_file({str(tmp_path / "ids.safetensors")!r})["ids"]
        assert tok(["a red shirt", "one two"], padding=True, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
        with torch.no_grad():
            logits = model(ids).logits.contiguous()
        assert type(model).__name__ == "Qwen2MoeForCausalLM", type(model).__name__
        assert not [m for m in sys.modules if m == "zoo" or m.startswith("zoo.")], "zoo was imported"
        save_file({{"logits": logits}}, {str(tmp_path / "logits.safetensors")!r})
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        want = model.language_model(ids).logits
    torch.testing.assert_close(load_file(str(tmp_path / "logits.safetensors"))["logits"], want, rtol=1e-5, atol=1e-5)
    meta = json.loads((out / "multimodal_config.json").read_text())
    assert meta["language_model"]["class"] == "Qwen2MoeForCausalLM" and meta["placeholder_ids"] == {"image": 3, "audio": 4}

    assert main(["export", "micro-moe", "--format", "hf", "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "micro-moe", "--format", "llava", "--out", str(tmp_path / "llava")]) == 1
    err = capsys.readouterr().err
    assert "LlavaForConditionalGeneration" in err and "encoders.audio: a whisper audio encoder" in err and "--format hf" in err
    assert not (tmp_path / "llava").exists()


def test_zoo_eval_scores_a_card_and_every_command_names_its_error(built, tmp_path, capsys):
    """`zoo eval` on a built card; then one bad input per error class the commands can raise."""
    import json
    import shutil

    from zoo.pipelines.data.shards import shard_paths

    assert main(["eval", "micro-vqa", "--family", "vqa", "--limit", "2", "--quiet"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    result = json.loads(line)
    assert (result["family"], result["metric"], result["n"]) == ("vqa", "exact_match", 2)
    run = Path(built[0]["ZOO_HOME"]) / "runs" / "micro"
    assert main(["eval", str(run / "lora" / "vqa" / "model"), "--family", "vqa", "--limit", "1", "--quiet"]) == 0
    capsys.readouterr()

    data = tmp_path / "data"
    shutil.copytree(run / "data", data)
    shard = shard_paths(data / "vqa", "test")[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    bad_recipe = tmp_path / "bad.yaml"
    bad_recipe.write_text(MICRO.read_text().replace("../models/micro-zoo.yaml", str(ROOT / "configs/models/micro-zoo.yaml"))
                          .replace("batch_size: 4, train: {steps: 3", "batchsize: 4, train: {steps: 3"))
    nan_recipe = tmp_path / "nan.yaml"
    nan_recipe.write_text(f"name: nan\nmodel: {ROOT / 'configs/models/micro-zoo.yaml'}\ntokenizer_vocab: 512\nstages:\n"
                          "  - {name: p, kind: pretrain-lm, data: {corpus: 1.0}, batch_size: 2,\n"
                          "     train: {steps: 3, optim: {lr: 1.0e+30, grad_clip: 0}}}\n")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(run / "lora" / "vqa" / "model", corrupt)
    (corrupt / "config.json").write_text("{}\n")
    cases = [
        (["eval", "micro-nothing", "--family", "vqa"], "unknown model 'micro-nothing'"),  # CatalogError
        (["eval", str(corrupt), "--family", "vqa", "--data", str(run / "data")], "file 'config.json' has"),  # CheckpointError
        (["eval", str(corrupt), "--family", "vqa"], "no data directory for"),  # FileNotFoundError
        (["eval", "micro-vqa", "--family", "poetry"], "no metric for task family ['poetry']"),  # ValueError
        (["eval", str(run / "lora" / "vqa" / "model"), "--family", "vqa", "--data", str(data)], shard.name),  # CorruptShardError
        (["eval", "micro-other", "--family", "vqa"], "micro-other@1.0.0 is not built yet"),  # NotBuiltError
        (["train", str(tmp_path / "absent.yaml")], "recipe"),  # FileNotFoundError
        (["train", "no-such-recipe"], "no shipped recipes config 'no-such-recipe'; shipped: ['micro', "),
        (["train", str(bad_recipe), "--out", str(tmp_path / "r1")], "StageConfig: unknown config key(s) ['batchsize']"),
        (["train", str(nan_recipe), "--out", str(tmp_path / "r2"), "--data-dir", str(run / "data")], "loss is nan"),  # NonFiniteError
        (["train", "micro", "--stage", "polish", "--out", str(tmp_path / "r3")], "has no stage 'polish'"),
        (["export", "micro-vqa", "--format", "llava", "--out", str(tmp_path / "x")], "cannot export as LlavaForConditionalGeneration"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # after any progress bar
        assert last.startswith("zoo: error: ") and message in last and "Traceback" not in err, (argv, err)
