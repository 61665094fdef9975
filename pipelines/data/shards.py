"""Webdataset shards for `Sample`: a deterministic writer, a validating reader, a manifest.

Layout of one family directory::

    <dir>/train-000000.tar, train-000001.tar, val-000000.tar, test-000000.tar
    <dir>/manifest.json   {"task_family", "source", "params", "splits": {split: {"count", "shards": [...]}}}

Each sample is stored as tar members sharing its key: ``<key>.json`` (task_family, split,
instruction, answer, a list of media kinds with their sha256, and ``subtype`` only when the sample
has one) and ``<key>.<i>.png`` /
``<key>.<i>.wav`` for media item ``i``. Tar headers have fixed mtime/owner, so the same samples
give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from .schema import MEDIA_KINDS, SPLITS, Media, Sample, SchemaError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CorruptShardError(RuntimeError):
    """A shard cannot be read or holds a sample that fails validation.

    Attributes:
        shard: Path of the shard file.
        key: Key of the failing sample, or of the last good one when the failure is between
            samples (None if nothing could be read).
    """

    def __init__(self, shard: str | os.PathLike, key: str | None, reason: str):
        self.shard, self.key, self.reason = str(shard), key, reason
        where = f"sample {key!r}" if key else "its first sample"
        super().__init__(f"corrupt shard {self.shard} at {where}: {reason}")


def encode_sample(sample: Sample) -> dict[str, bytes | str]:
    """Turn a sample into the webdataset dict (``__key__`` plus one bytes value per tar member)."""
    sample.validate()
    meta = {
        "format": FORMAT_VERSION,
        "task_family": sample.task_family,
        "split": sample.split,
        "instruction": sample.instruction,
        "answer": sample.answer,
        "media": [{"kind": m.kind, "sha256": m.sha256} for m in sample.media],
    }
    if sample.subtype:  # optional: absent for families without subtypes (their shards stay byte-identical)
        meta["subtype"] = sample.subtype
    out: dict[str, bytes | str] = {"__key__": sample.key, "json": json.dumps(meta, sort_keys=True).encode()}
    for i, m in enumerate(sample.media):
        out[f"{i}{m.ext}"] = m.data
    return out


def decode_sample(raw: dict) -> Sample:
    """Inverse of `encode_sample`, verifying every field and media checksum.

    Raises:
        SchemaError: If anything is missing, extra, or does not match its checksum.
    """
    key = raw.get("__key__")
    if "json" not in raw:
        raise SchemaError(f"sample {key!r} has no .json member (members: {sorted(k for k in raw if not k.startswith('__'))})")
    try:
        meta = json.loads(raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SchemaError(f"sample {key!r}: unreadable json: {e}") from e
    for name in ("task_family", "split", "instruction", "answer", "media"):
        if name not in meta:
            raise SchemaError(f"sample {key!r}: json lacks field {name!r}")
    media = []
    for i, entry in enumerate(meta["media"]):
        kind = entry.get("kind")
        if kind not in MEDIA_KINDS:
            raise SchemaError(f"sample {key!r}: media {i} has unknown kind {kind!r}")
        member = f"{i}{MEDIA_KINDS[kind]}"
        if member not in raw:
            raise SchemaError(f"sample {key!r}: media member {key}.{member} is missing")
        data = bytes(raw[member])
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise SchemaError(f"sample {key!r}: {key}.{member} does not match its sha256 {entry.get('sha256')}")
        media.append(Media(kind, data))
    known = {"json", *(f"{i}{MEDIA_KINDS[m.kind]}" for i, m in enumerate(media))}
    extra = sorted(k for k in raw if not k.startswith("__") and k not in known)
    if extra:
        raise SchemaError(f"sample {key!r}: unexpected members {extra}")
    sample = Sample(key, meta["task_family"], meta["split"], meta["instruction"], meta["answer"], tuple(media),
                    subtype=meta.get("subtype", ""))
    sample.validate()
    return sample


@dataclass(frozen=True)
class ShardInfo:
    """One written shard: file name (relative to the family dir), sample count, file sha256."""

    name: str
    count: int
    sha256: str


def write_shards(samples: Iterable[Sample], out_dir: str | os.PathLike, prefix: str, max_per_shard: int = 1000) -> list[ShardInfo]:
    """Write samples into ``<out_dir>/<prefix>-NNNNNN.tar`` shards, byte-reproducibly.

    Args:
        samples: Samples in the order to store them.
        out_dir: Directory (created if needed).
        prefix: Shard name prefix, usually the split name.
        max_per_shard: Samples per shard.

    Returns:
        The shards written (none if `samples` is empty).
    """
    if max_per_shard < 1:
        raise ValueError(f"max_per_shard must be >= 1, got {max_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    infos: list[ShardInfo] = []
    writer, count, seen = None, 0, set()

    def close():
        nonlocal writer
        if writer is not None:
            writer.close()
            name = f"{prefix}-{len(infos):06d}.tar"
            infos.append(ShardInfo(name, count, hashlib.sha256((out / name).read_bytes()).hexdigest()))
            writer = None

    for sample in samples:
        if sample.key in seen:
            raise SchemaError(f"duplicate sample key {sample.key!r} in {out}/{prefix}-*")
        seen.add(sample.key)
        if writer is None:
            count = 0
            writer = wds.TarWriter(str(out / f"{prefix}-{len(infos):06d}.tar"), encoder=False, mtime=0.0, user="moe-zoo", group="moe-zoo")
        writer.write(encode_sample(sample))
        count += 1
        if count >= max_per_shard:
            close()
    close()
    return infos


def write_dataset(
    splits: dict[str, Iterable[Sample]],
    out_dir: str | os.PathLike,
    *,
    task_family: str,
    source: str,
    params: dict | None = None,
    max_per_shard: int = 1000,
) -> dict:
    """Write one family directory: shards per split plus ``manifest.json``.

    Args:
        splits: ``{split: samples}``; each sample's `split` must equal its key here.
        out_dir: The family directory.
        task_family: Family name recorded in the manifest; every sample must carry it.
        source: Where the data came from (e.g. ``"debian:dataset-fashion-mnist"``).
        params: Builder parameters recorded in the manifest (JSON-serializable).
        max_per_shard: Samples per shard.

    Returns:
        The manifest dict (also written to disk).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.tar"):
        stale.unlink()
    manifest = {"format": FORMAT_VERSION, "task_family": task_family, "source": source, "params": params or {}, "splits": {}}
    for split, samples in splits.items():
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")

        def checked(it=samples, split=split):
            for s in it:
                if s.split != split or s.task_family != task_family:
                    raise SchemaError(f"sample {s.key!r} is {s.task_family}/{s.split} but is being written to {task_family}/{split}")
                yield s

        infos = write_shards(checked(), out, split, max_per_shard)
        manifest["splits"][split] = {"count": sum(i.count for i in infos), "shards": [i.__dict__ for i in infos]}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest


def read_manifest(family_dir: str | os.PathLike) -> dict:
    """Load ``manifest.json`` of a family directory (FileNotFoundError names the path)."""
    path = Path(family_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {family_dir}: not a built data directory")
    return json.loads(path.read_text())


def shard_paths(family_dir: str | os.PathLike, split: str) -> list[Path]:
    """The shard files of one split, in order, as listed in the family's manifest."""
    manifest = read_manifest(family_dir)
    if split not in manifest["splits"]:
        raise KeyError(f"{family_dir} has no split {split!r}; it has {sorted(manifest['splits'])}")
    return [Path(family_dir) / s["name"] for s in manifest["splits"][split]["shards"]]


def _every_node(shards):
    return shards


def _read_one(shard: Path, expected_count: int | None) -> Iterator[Sample]:
    last_key = None
    count = 0
    try:
        # nodesplitter: every rank of a multi-process run reads whole splits (they are loaded in memory
        # and each data-parallel rank then draws its own batches); webdataset refuses without one.
        stream = iter(wds.WebDataset(str(shard), shardshuffle=False, empty_check=False, nodesplitter=_every_node))
    except Exception as e:  # opening the stream: missing file, bad URL
        raise CorruptShardError(shard, None, f"{type(e).__name__}: {e}") from e
    while True:
        try:
            raw = next(stream)
        except StopIteration:
            break
        except Exception as e:  # tarfile.ReadError, truncated member, bad header ...
            raise CorruptShardError(shard, last_key, f"{type(e).__name__}: {e}") from e
        key = raw.get("__key__")
        try:
            sample = decode_sample(raw)
        except SchemaError as e:
            raise CorruptShardError(shard, key, str(e)) from e
        last_key = key
        count += 1
        yield sample
    if count == 0 and expected_count != 0:
        raise CorruptShardError(shard, None, "no readable samples (not a tar file, or empty)")
    if expected_count is not None and count != expected_count:
        raise CorruptShardError(shard, last_key, f"ended after {count} samples; the manifest says {expected_count} (truncated?)")


def read_shards(shards: Iterable[str | os.PathLike], expected_counts: Iterable[int] | None = None) -> Iterator[Sample]:
    """Iterate validated samples from shard files, in order.

    Args:
        shards: Shard paths.
        expected_counts: Optional sample count per shard (from the manifest); a shard that ends
            early is reported as truncated.

    Yields:
        Samples, each checked against the schema and its media sha256.

    Raises:
        CorruptShardError: Naming the shard file and the sample key when a shard is unreadable,
            truncated, or holds an invalid sample.
    """
    shards = [Path(s) for s in shards]
    counts = list(expected_counts) if expected_counts is not None else [None] * len(shards)
    if len(counts) != len(shards):
        raise ValueError(f"{len(shards)} shards but {len(counts)} expected counts")
    for shard, n in zip(shards, counts):
        if not shard.is_file():
            raise CorruptShardError(shard, None, "file does not exist")
        yield from _read_one(shard, n)


def iter_split(family_dir: str | os.PathLike, split: str) -> Iterator[Sample]:
    """Iterate one split of a built family directory, checking shard lengths against the manifest."""
    manifest = read_manifest(family_dir)
    if split not in manifest["splits"]:
        raise KeyError(f"{family_dir} has no split {split!r}; it has {sorted(manifest['splits'])}")
    shards = manifest["splits"][split]["shards"]
    return read_shards([Path(family_dir) / s["name"] for s in shards], [s["count"] for s in shards])


def load_split(family_dir: str | os.PathLike, split: str) -> list[Sample]:
    """All samples of one split in memory (our data sets are small)."""
    return list(iter_split(family_dir, split))
