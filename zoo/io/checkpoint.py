"""Versioned checkpoint directories: safetensors weights, a JSON config, extra files, a manifest.

Layout of a checkpoint directory::

    manifest.json                         format version + sha256 and size of every other file
    config.json                           the model config (plain JSON)
    model.safetensors                     weights, or when larger than `max_shard_bytes`:
    model-00001-of-00003.safetensors ...  shards, plus
    model.safetensors.index.json          {"metadata": {"total_size": N}, "weight_map": {name: shard}}
    <extra files>                         tokenizer / processor files, README.md (model card), ...

Writes are atomic: everything goes to a temporary directory beside the target, every file is
fsynced, the manifest is written last, and only then is the directory renamed to its final name,
so a crash never leaves a half checkpoint under that name. Loading checks every file against the
manifest (size, then full sha256) before reading a byte of weights, refuses files the manifest
does not list, and never unpickles: weights are read with safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_NAME = "moe-zoo-checkpoint"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

_HASH_CHUNK = 1 << 20


class CheckpointError(Exception):
    """A checkpoint directory is missing, malformed, or does not match its manifest."""


class LoadedCheckpoint(NamedTuple):
    """What `load_checkpoint` returns; unpacks as `state_dict, config, paths = ...`.

    Attributes:
        state_dict: tensor name -> tensor, bit-exact as saved.
        config: the config dict saved in `config.json`.
        paths: relative name -> absolute path of every extra file (tokenizer, model card, ...).
    """

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    paths: dict[str, Path]


def sha256_file(path: str | os.PathLike) -> str:
    """Full hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (new names, renames) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def check_extra_name(name: str) -> str:
    """Validate and return an extra file's name: relative, POSIX separators, no `..`, not reserved."""
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or "\\" in name or any(p in ("", ".", "..") for p in name.split("/")):
        raise CheckpointError(f"extra file name {name!r} must be a plain relative path like 'tokenizer.json'")
    reserved = {MANIFEST_NAME, CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME}
    if name in reserved or (pure.parent == PurePosixPath(".") and pure.name.startswith("model-") and pure.suffix == ".safetensors"):
        raise CheckpointError(f"extra file name {name!r} is reserved for the checkpoint's own files")
    return name


def _dedupe_shared(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split tensors into ones to store and aliases (tied weights) of stored ones.

    Tensors that are the very same view of one storage (tied embeddings) are stored once and
    recorded as `alias -> stored name`; other tensors that merely share storage are copied, since
    safetensors stores each tensor on its own.
    """
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen_views: dict[tuple, str] = {}
    seen_storages: set[tuple] = set()
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"state_dict[{name!r}] is a {type(tensor).__name__}, not a tensor")
        t = tensor.detach()
        if t.device.type == "meta":
            raise CheckpointError(f"state_dict[{name!r}] is on the meta device and has no data to save")
        storage_key = (t.device.type, t.device.index, t.untyped_storage().data_ptr())
        view_key = (*storage_key, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() > 0 and view_key in seen_views:
            aliases[name] = seen_views[view_key]
            continue
        if t.numel() > 0 and storage_key in seen_storages:
            t = t.clone()
        else:
            seen_storages.add(storage_key)
            seen_views[view_key] = name
        stored[name] = t.contiguous().cpu()
    return stored, aliases


def _plan_shards(tensors: Mapping[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split of tensor names, in order, into shards of at most `max_shard_bytes` each.

    A single tensor larger than the limit gets a shard of its own.
    """
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")


def copy_extra_file(dest: Path, source: str | os.PathLike | bytes) -> None:
    """Write an extra file at `dest` from a source path or from bytes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(source, bytes):
        dest.write_bytes(source)
        return
    src = Path(source)
    if not src.is_file():
        raise CheckpointError(f"extra file source {str(src)!r} does not exist or is not a file")
    shutil.copyfile(src, dest)


def build_manifest(directory: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Manifest dict for every file under `directory` (except the manifest itself).

    Args:
        directory: a finished checkpoint (or export) directory.
        **fields: extra top-level fields (e.g. `tensor_aliases`).
    """
    root = Path(directory)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST_NAME:
            continue
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "files": files, **fields}


def write_manifest(directory: str | os.PathLike, **fields: Any) -> Path:
    """Hash every file under `directory` and write `manifest.json` there (fsynced)."""
    root = Path(directory)
    path = root / MANIFEST_NAME
    _write_json(path, build_manifest(root, **fields))
    _fsync_file(path)
    return path


def atomic_directory_write(target: str | os.PathLike, write, *, overwrite: bool = False) -> Path:
    """Create directory `target` atomically: `write(tmp_dir)` fills a temp dir that is then renamed.

    Every file the callback wrote is fsynced before the rename. If `write` raises, the temporary
    directory is removed and `target` is untouched. With `overwrite=True` an existing `target` is
    moved aside, replaced, and only then deleted, so the name never holds a mix of the two.

    Args:
        target: final directory path.
        write: callable taking the temporary directory `Path`.
        overwrite: replace an existing `target`; otherwise an existing `target` is an error.

    Returns:
        The final path.
    """
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise CheckpointError(f"{str(target)!r} already exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync_file(path)
        for path in [*(p for p in tmp.rglob("*") if p.is_dir()), tmp]:
            fsync_dir(path)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "replaced")
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_checkpoint(
    directory: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    extra_files: Mapping[str, str | os.PathLike | bytes] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint directory atomically.

    Args:
        directory: the checkpoint's final path; must not exist unless `overwrite`.
        state_dict: tensor name -> tensor (any device; saved from CPU). Tied tensors (the same
            view of one storage) are stored once and restored as one tensor on load.
        config: JSON-serializable model config, written to `config.json`.
        extra_files: relative name (e.g. `"tokenizer.json"`, `"README.md"`) -> source file path
            or the file's bytes.
        max_shard_bytes: weights above this size are split into shards with an index.
        overwrite: replace an existing checkpoint at `directory`.

    Returns:
        The checkpoint's path.
    """
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    try:
        config_text = json.dumps(dict(config), indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config is not plain JSON: {e}") from e
    extras = {check_extra_name(name): src for name, src in (extra_files or {}).items()}
    tensors, aliases = _dedupe_shared(state_dict)

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(config_text + "\n", encoding="utf-8")
        shards = _plan_shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, names in enumerate(shards, start=1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file({n: tensors[n] for n in names}, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(names, fname))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            _write_json(tmp / WEIGHTS_INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        for name, src in extras.items():
            copy_extra_file(tmp / name, src)
        write_manifest(tmp, tensor_aliases=aliases)

    return atomic_directory_write(directory, write, overwrite=overwrite)


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Parse and check the shape of a directory's `manifest.json` (no file hashing)."""
    root = Path(directory)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {str(root)!r} does not exist")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{str(root)!r} has no {MANIFEST_NAME}; it is not a complete moe-zoo checkpoint")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{str(path)!r} is not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise CheckpointError(
            f"{str(path)!r} has format_version {version!r}; this moe-zoo reads versions 1..{FORMAT_VERSION}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("size"), int)
        for e in files.values()
    ):
        raise CheckpointError(f"{str(path)!r}: 'files' must map names to {{sha256, size}}")
    return manifest


def verify_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """Check every file against the manifest; return the manifest.

    Raises:
        CheckpointError: naming the first file that is missing, has the wrong size (truncated or
            grown), has the wrong sha256 (expected vs actual), or is not listed in the manifest.
    """
    root = Path(directory)
    manifest = read_manifest(root)
    files = manifest["files"]
    for rel, entry in files.items():
        _check_listed_name(rel, root)
        path = root / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint {str(root)!r}: file {rel!r} listed in the manifest is missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(
                f"checkpoint {str(root)!r}: file {rel!r} has {size} bytes, the manifest says {entry['size']} "
                "(truncated or modified)"
            )
        actual = sha256_file(path)
        if actual != entry["sha256"].lower():
            raise CheckpointError(
                f"checkpoint {str(root)!r}: file {rel!r} is corrupted: sha256 {actual} does not match the "
                f"manifest's {entry['sha256']}"
            )
    unlisted = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).as_posix() not in (*files, MANIFEST_NAME)
    )
    if unlisted:
        raise CheckpointError(f"checkpoint {str(root)!r}: file(s) {unlisted} are not in the manifest")
    return manifest


def is_weight_file(rel: str) -> bool:
    """Whether a checkpoint-relative name is one of its weight files (`model.safetensors`, a shard, the index)."""
    return rel in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME) or (
        "/" not in rel and rel.startswith("model-") and rel.endswith(".safetensors") and "-of-" in rel)


def weights_identity(directory: str | os.PathLike) -> str:
    """A checkpoint's weights' identity: sha256 over its weight files' (verified) sha256s.

    Unlike the manifest's own hash it ignores the extra files (model card, tokenizer, ...), so a
    checkpoint installed under another card, or re-carded with measured metrics, keeps it; any
    changed weight changes it. What expert adapters name as their base.
    """
    files = verify_checkpoint(directory)["files"]
    weights = {rel: entry["sha256"].lower() for rel, entry in sorted(files.items()) if is_weight_file(rel)}
    if not weights:
        raise CheckpointError(f"checkpoint {str(directory)!r} has no weight files ({WEIGHTS_NAME} or shards)")
    return hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()


def _check_listed_name(rel: str, root: Path) -> None:
    if PurePosixPath(rel).is_absolute() or ".." in rel.split("/"):
        raise CheckpointError(f"checkpoint {str(root)!r}: manifest lists a path outside the directory: {rel!r}")


def _read_safetensors(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    out = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    except Exception as e:  # safetensors raises its own SafetensorError / OSError types
        raise CheckpointError(f"cannot read weights file {path.name!r}: {e}") from e
    return out


def load_checkpoint(
    directory: str | os.PathLike, *, device: str | torch.device = "cpu", verify: bool = True
) -> LoadedCheckpoint:
    """Verify a checkpoint directory against its manifest and read it (safetensors only).

    Args:
        directory: a directory written by `save_checkpoint`.
        device: where to put the tensors.
        verify: check sizes and full sha256 of every file first (leave on unless the caller has
            just verified the directory itself).

    Returns:
        `LoadedCheckpoint(state_dict, config, paths)`.
    """
    root = Path(directory)
    manifest = verify_checkpoint(root) if verify else read_manifest(root)
    files = manifest["files"]
    if CONFIG_NAME not in files:
        raise CheckpointError(f"checkpoint {str(root)!r} has no {CONFIG_NAME} in its manifest")
    try:
        config = json.loads((root / CONFIG_NAME).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {str(root)!r}: {CONFIG_NAME} is not valid JSON: {e}") from e

    state: dict[str, torch.Tensor] = {}
    weight_files: set[str]
    if WEIGHTS_INDEX_NAME in files:
        index = json.loads((root / WEIGHTS_INDEX_NAME).read_text(encoding="utf-8"))
        weight_map: dict[str, str] = index.get("weight_map", {})
        weight_files = set(weight_map.values())
        for fname in sorted(weight_files):
            if fname not in files:
                raise CheckpointError(f"checkpoint {str(root)!r}: shard {fname!r} in the index is not in the manifest")
            shard = _read_safetensors(root / fname, device)
            expected = {n for n, f in weight_map.items() if f == fname}
            if set(shard) != expected:
                diff = sorted(set(shard) ^ expected)[:5]
                raise CheckpointError(
                    f"checkpoint {str(root)!r}: shard {fname!r} does not hold the tensors the index says "
                    f"(differences include {diff})"
                )
            state.update(shard)
    elif WEIGHTS_NAME in files:
        weight_files = {WEIGHTS_NAME}
        state = _read_safetensors(root / WEIGHTS_NAME, device)
    else:
        raise CheckpointError(f"checkpoint {str(root)!r} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}")

    for alias, target in manifest.get("tensor_aliases", {}).items():
        if target not in state:
            raise CheckpointError(f"checkpoint {str(root)!r}: tensor alias {alias!r} points to missing {target!r}")
        state[alias] = state[target]

    own = {MANIFEST_NAME, CONFIG_NAME, WEIGHTS_INDEX_NAME, *weight_files}
    paths = {rel: root / rel for rel in files if rel not in own}
    return LoadedCheckpoint(state, config, paths)


def load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str | os.PathLike) -> torch.nn.Module:
    """Load `state` into `model` with every key matched (the one strict loader of the zoo).

    Args:
        model: the model its config built.
        state: tensor name -> tensor.
        where: the checkpoint (path or description) for the error.

    Returns:
        `model`.

    Raises:
        CheckpointError: naming the checkpoint and the first missing / unexpected keys, or a shape
            mismatch.
    """
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"checkpoint {str(where)!r} does not fit the model its config builds: {e}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {str(where)!r} does not match the model its config builds: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model


__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "FORMAT_VERSION",
    "atomic_directory_write",
    "build_manifest",
    "check_extra_name",
    "copy_extra_file",
    "load_checkpoint",
    "load_strict",
    "read_manifest",
    "save_checkpoint",
    "sha256_file",
    "weights_identity",
    "verify_checkpoint",
    "write_manifest",
]
