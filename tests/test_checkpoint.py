"""Checkpoint directories: bit-exact round trips, manifest verification, atomic writes."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from zoo import upcycle
from zoo.io.checkpoint import (
    CONFIG_NAME,
    MANIFEST_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from zoo.io.moe_lm import load_moe_lm, save_moe_lm


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    return {
        "a.weight": torch.randn(16, 8, generator=g),
        "a.tied": None,  # filled below: same view as a.weight
        "b.bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "c.int": torch.randint(-5, 5, (7,), generator=g),
        "d.bool": torch.rand(4, generator=g) > 0.5,
        "e.empty": torch.empty(0, 4),
        "f.transposed": base.t(),  # non-contiguous
        "g.slice": base[1:3],  # shares storage with f but is a different view
    }


def _make_state() -> dict[str, torch.Tensor]:
    s = _state()
    s["a.tied"] = s["a.weight"]
    return s


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def _tiny_llama(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
    cfg.update(kw)
    return AutoModelForCausalLM.from_config(LlamaConfig(**cfg))


@pytest.mark.parametrize("max_shard_bytes", [2**30, 300])
def test_round_trip_is_bit_exact(tmp_path, max_shard_bytes):
    state = _make_state()
    config = {"name": "tiny", "layers": [1, 2], "nested": {"x": 0.5}}
    readme = tmp_path / "card.md"
    readme.write_text("# card\n")
    out = save_checkpoint(
        tmp_path / "ck", state, config,
        extra_files={"README.md": readme, "tokenizer/tokenizer.json": b'{"v": 1}'},
        max_shard_bytes=max_shard_bytes,
    )
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    if max_shard_bytes == 300:
        assert WEIGHTS_INDEX_NAME in names and WEIGHTS_NAME not in names
        assert len([n for n in names if n.startswith("model-")]) > 1
    else:
        assert WEIGHTS_NAME in names and WEIGHTS_INDEX_NAME not in names

    loaded, cfg, paths = load_checkpoint(out)
    _assert_same(state, loaded)
    assert loaded["a.tied"] is loaded["a.weight"]  # tied weights stay tied
    assert cfg == config
    assert set(paths) == {"README.md", "tokenizer/tokenizer.json"}
    assert paths["README.md"].read_text() == "# card\n"
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == 1
    assert set(manifest["files"]) == names - {MANIFEST_NAME}
    assert all(len(e["sha256"]) == 64 for e in manifest["files"].values())


@pytest.mark.parametrize(
    "build",
    [
        lambda: upcycle(_tiny_llama(tie_word_embeddings=True), num_experts=4, router_options={"top_k": 2}),
        lambda: upcycle(
            AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2), dtype=torch.bfloat16),
            num_experts=4, shared_expert_size=16, layers=[1], router_options={"top_k": 1, "norm_topk_prob": False}),
    ],
    ids=["llama-tied", "qwen2-bf16-shared-partial"],
)
def test_moe_lm_round_trip_rebuilds_offline(tmp_path, build):
    model = build().eval()
    with torch.no_grad():  # make the shared expert and router non-trivial
        for moe in model.moe_layers().values():
            for p in moe.parameters():
                p.add_(0.01 * torch.randn_like(p))
    out = save_moe_lm(model, tmp_path / "moe", extra_files={"README.md": b"card"}, max_shard_bytes=4096)
    loaded, paths = load_moe_lm(out)
    assert type(loaded.lm) is type(model.lm)
    assert loaded.moe_config == model.moe_config
    _assert_same(model.state_dict(), loaded.state_dict())
    assert set(paths) == {"README.md"}
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.fixture
def sharded(tmp_path):
    return save_checkpoint(tmp_path / "ck", _make_state(), {"k": 1}, max_shard_bytes=300,
                           extra_files={"README.md": b"card"})


def _first_shard(ck):
    return sorted(ck.glob("model-*.safetensors"))[0]


def test_truncated_file_is_named(sharded):
    shard = _first_shard(sharded)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*{len(data) // 2} bytes.*{len(data)}.*truncated"):
        load_checkpoint(sharded)


def test_flipped_byte_is_named_with_both_hashes(sharded):
    shard = _first_shard(sharded)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    expected = json.loads((sharded / MANIFEST_NAME).read_text())["files"][shard.name]["sha256"]
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*corrupted.*[0-9a-f]{{64}}.*{expected}"):
        load_checkpoint(sharded)


@pytest.mark.parametrize("victim", ["shard", CONFIG_NAME, WEIGHTS_INDEX_NAME, "README.md"])
def test_missing_file_is_named(sharded, victim):
    path = _first_shard(sharded) if victim == "shard" else sharded / victim
    path.unlink()
    with pytest.raises(CheckpointError, match=rf"{path.name!r} listed in the manifest is missing"):
        load_checkpoint(sharded)


def test_missing_manifest_unlisted_file_and_future_version(sharded):
    (sharded / "pytorch_model.bin").write_bytes(b"\x80\x04 pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*not in the manifest"):
        load_checkpoint(sharded)
    (sharded / "pytorch_model.bin").unlink()
    verify_checkpoint(sharded)

    manifest = json.loads((sharded / MANIFEST_NAME).read_text())
    manifest["format_version"] = 99
    (sharded / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(sharded)
    (sharded / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match="has no manifest.json"):
        load_checkpoint(sharded)


def test_crash_mid_write_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    import zoo.io.checkpoint as ck

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ck, "write_manifest", boom)  # fails after every weight file is written
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ck", _make_state(), {"k": 1}, max_shard_bytes=300)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_and_refuses_without_flag(tmp_path, monkeypatch):
    target = tmp_path / "ck"
    save_checkpoint(target, {"w": torch.zeros(3)}, {"v": 1})
    with pytest.raises(CheckpointError, match="already exists; pass overwrite=True"):
        save_checkpoint(target, {"w": torch.ones(3)}, {"v": 2})

    import zoo.io.checkpoint as ck

    monkeypatch.setattr(ck, "write_manifest", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError, match="crash"):
        save_checkpoint(target, {"w": torch.ones(3)}, {"v": 2}, overwrite=True)
    monkeypatch.undo()
    state, cfg, _ = load_checkpoint(target)  # the old checkpoint survived the failed overwrite
    assert cfg == {"v": 1} and torch.equal(state["w"], torch.zeros(3))

    save_checkpoint(target, {"w": torch.ones(3)}, {"v": 2}, overwrite=True)
    state, cfg, _ = load_checkpoint(target)
    assert cfg == {"v": 2} and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_bad_inputs_are_refused_by_name(tmp_path):
    with pytest.raises(CheckpointError, match="config is not plain JSON"):
        save_checkpoint(tmp_path / "a", {"w": torch.zeros(1)}, {"dtype": torch.float32})
    with pytest.raises(CheckpointError, match=r"'\.\./evil' must be a plain relative path"):
        save_checkpoint(tmp_path / "b", {"w": torch.zeros(1)}, {}, extra_files={"../evil": b"x"})
    with pytest.raises(CheckpointError, match="'config.json' is reserved"):
        save_checkpoint(tmp_path / "c", {"w": torch.zeros(1)}, {}, extra_files={"config.json": b"{}"})
    with pytest.raises(CheckpointError, match=r"state_dict\['w'\] is a list"):
        save_checkpoint(tmp_path / "d", {"w": [1, 2]}, {})
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    assert list(tmp_path.iterdir()) == []
