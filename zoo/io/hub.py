"""Resolve a checkpoint URI to a verified local path: local files, `file://`, `http(s)://`, `hf://`.

Downloads are streamed to `<name>.part` beside their final place in the cache, resume a partial
file with an HTTP Range request, are checked against the full sha256 the caller gives (never a
prefix, never a hash parsed from the URL), and only then renamed to their final name. The cache
lives at `$ZOO_HOME` (default `~/.cache/zoo`), content-addressed as
`downloads/<sha256>/<file name>`; a file under its final name there has always been verified.

`hf://org/repo[@revision][/path/in/repo]` goes through huggingface_hub and its own cache.

Downloads show a byte progress bar on a terminal (`zoo.progress`); `ZOO_QUIET=1` turns it off,
huggingface_hub's own bars included.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from zoo.io.checkpoint import fsync_dir, sha256_file
from zoo.progress import is_quiet, progress

logger = logging.getLogger(__name__)

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


class HubError(Exception):
    """A URI cannot be resolved (bad form, missing file, unsupported scheme)."""


class DownloadError(HubError):
    """A download failed (HTTP error, connection cut off after all retries)."""


class IntegrityError(HubError):
    """A file's sha256 is not the expected one."""


def zoo_home() -> Path:
    """The zoo's cache root: `$ZOO_HOME` if set, else `~/.cache/zoo`."""
    home = os.environ.get("ZOO_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "zoo"


def normalize_sha256(sha256: str) -> str:
    """Lower-case a full sha256 hex digest; anything but 64 hex digits is an error."""
    if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256.strip().lower()):
        raise HubError(f"sha256 must be the full 64-hex-digit digest, got {sha256!r}")
    return sha256.strip().lower()


def verify_file(path: str | os.PathLike, sha256: str) -> None:
    """Raise `IntegrityError` (expected vs actual) unless the file's full sha256 is `sha256`."""
    expected = normalize_sha256(sha256)
    actual = sha256_file(path)
    if actual != expected:
        raise IntegrityError(f"sha256 mismatch for {str(path)!r}: expected {expected}, got {actual}")


@dataclass(frozen=True)
class HFLocation:
    """A parsed `hf://org/repo[@revision][/path]` URI.

    Attributes:
        repo_id: `org/repo` (model repositories).
        revision: branch, tag or commit; None means the repository's default branch.
        path: a file inside the repository, or None for the whole snapshot.
    """

    repo_id: str
    revision: str | None
    path: str | None


def parse_hf_uri(uri: str) -> HFLocation:
    """Parse `hf://org/repo[@revision][/path/in/repo]` (a revision cannot contain `/`)."""
    if not uri.startswith("hf://"):
        raise HubError(f"not an hf:// URI: {uri!r}")
    parts = uri[len("hf://") :].split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise HubError(f"hf:// URI {uri!r} must look like hf://org/repo[@revision][/path/in/repo]")
    repo, _, revision = parts[1].partition("@")
    if not repo or (_ and not revision):
        raise HubError(f"hf:// URI {uri!r}: empty repository name or revision")
    path = "/".join(parts[2:]) or None
    if path is not None and any(p in ("", ".", "..") for p in path.split("/")):
        raise HubError(f"hf:// URI {uri!r}: bad path inside the repository: {path!r}")
    return HFLocation(f"{parts[0]}/{repo}", revision or None, path)


def _filename_from_url(url: str) -> str:
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".")
    return name or "download"


@contextmanager
def _locked(path: Path):
    """An exclusive advisory lock on `path` (so two processes do not append to one `.part`)."""
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class _TransientHTTPError(OSError):
    """A 5xx answer: retried like a broken connection."""


def _content_range_start(value: str | None) -> int | None:
    m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (value or "").strip())
    return int(m.group(1)) if m else None


def _hash_prefix(path: Path) -> hashlib._Hash:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest


def _fetch_once(url: str, part: Path, timeout: float, quiet: bool | None = None) -> hashlib._Hash:
    """One HTTP attempt that appends to `part` (resuming it if non-empty); returns the running hash.

    Shows a byte progress bar (`zoo.progress`; a resumed transfer starts at the bytes kept).

    Raises:
        DownloadError: on an HTTP error status (the partial file is removed on a 4xx).
        OSError / http.client.HTTPException: when the transfer breaks; `part` keeps what arrived.
    """
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "moe-zoo"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # our partial file is not a prefix the server can extend
            logger.warning("server refused to resume %s at byte %d; starting over", url, offset)
            part.unlink()
            return _fetch_once(url, part, timeout, quiet)
        if e.code >= 500:  # the server may recover: let the caller retry (and resume)
            raise _TransientHTTPError(f"HTTP {e.code} {e.reason}") from None
        part.unlink(missing_ok=True)  # the resource is gone or forbidden: a partial file is useless
        raise DownloadError(f"HTTP {e.code} {e.reason} for {url}") from None
    with response:
        if offset and response.status == 206 and _content_range_start(response.headers.get("Content-Range")) == offset:
            digest = _hash_prefix(part)
            mode = "ab"
        else:  # 200 (Range ignored) or a range we did not ask for: start from the beginning
            if offset:
                logger.info("server did not resume %s at byte %d; downloading it whole", url, offset)
            digest = hashlib.sha256()
            mode = "wb"
        length = response.headers.get("Content-Length")
        length = int(length) if length is not None and length.isdigit() else None
        kept = offset if mode == "ab" else 0
        received = 0
        with open(part, mode) as f, progress(total=None if length is None else kept + length, initial=kept, unit="B",
                                             desc=part.name.removesuffix(".part"), quiet=quiet) as bar:
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
        # http.client's read(n) returns b"" when the connection closes early, even with bytes
        # still owed under Content-Length: check the count ourselves.
        if length is not None and received < length:
            raise http.client.IncompleteRead(b"", length - received)
    return digest


def download(
    url: str,
    sha256: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    filename: str | None = None,
    retries: int = 3,
    retry_wait: float = 1.0,
    timeout: float = 60.0,
    quiet: bool | None = None,
) -> Path:
    """Download `url` into the cache, verify its sha256, and return its cached path.

    A verified file already in the cache is returned without a request (after re-checking its
    hash). A partial file left by an earlier, interrupted call is resumed with a Range request.

    Args:
        url: an `http://` or `https://` URL.
        sha256: the file's full expected sha256 (64 hex digits).
        cache_dir: cache root (default `zoo_home()`); the file goes to
            `<cache_dir>/downloads/<sha256>/<filename>`.
        filename: file name in the cache (default: the URL's last path segment).
        retries: extra attempts after a broken transfer, each resuming where the last stopped.
        retry_wait: seconds before the first retry, doubling after each.
        timeout: socket timeout in seconds.
        quiet: the byte progress bar (`zoo.progress.progress`): True off, False on, None: on
            only when stderr is a terminal and `ZOO_QUIET` is unset.

    Raises:
        DownloadError: HTTP error status (e.g. 404), or the transfer kept breaking; in the latter
            case the partial `.part` file is kept so that the next call resumes it.
        IntegrityError: the downloaded bytes have another sha256; the file is removed.
    """
    expected = normalize_sha256(sha256)
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise HubError(f"download() takes http(s) URLs, got {url!r}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else zoo_home()
    folder = root / "downloads" / expected
    name = filename or _filename_from_url(url)
    if "/" in name or name in (".", ".."):
        raise HubError(f"bad cache file name {name!r}")
    final, part = folder / name, folder / f"{name}.part"
    (root / "locks").mkdir(parents=True, exist_ok=True)

    with _locked(root / "locks" / f"{expected}.lock"):
        try:
            return _download_locked(url, expected, folder, final, part, retries, retry_wait, timeout, quiet)
        finally:
            try:
                folder.rmdir()  # only succeeds when the folder is empty (a failed first attempt)
            except OSError:
                pass


def _download_locked(
    url: str, expected: str, folder: Path, final: Path, part: Path, retries: int, retry_wait: float, timeout: float,
    quiet: bool | None,
) -> Path:
    """`download` once the lock is held."""
    folder.mkdir(parents=True, exist_ok=True)
    if final.exists():
        try:
            verify_file(final, expected)
            return final
        except IntegrityError as e:
            logger.warning("cached file is corrupted (%s); removed it, downloading again", e)
            final.unlink()
    attempt = 0
    while True:
        try:
            digest = _fetch_once(url, part, timeout, quiet)
            break
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS):
                raise
            have = part.stat().st_size if part.exists() else 0
            if attempt >= retries:
                raise DownloadError(
                    f"download of {url} broke off after {attempt + 1} attempt(s) ({type(e).__name__}: {e}); "
                    f"{have} bytes are kept in {str(part)!r} and the next call resumes from there"
                ) from e
            attempt += 1
            logger.warning("download of %s broke off at %d bytes (%s); resuming (attempt %d)", url, have, e, attempt)
            time.sleep(retry_wait * 2 ** (attempt - 1))
    actual = digest.hexdigest()
    if actual != expected:
        part.unlink(missing_ok=True)
        raise IntegrityError(
            f"sha256 mismatch for {url}: expected {expected}, got {actual}; the downloaded file was removed"
        )
    os.replace(part, final)
    fsync_dir(folder)
    return final


@contextmanager
def _hf_bars_off_when_quiet():
    """huggingface_hub draws its own bars: off inside the block when `zoo.progress.is_quiet()`."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    turn_off = is_quiet() and not are_progress_bars_disabled()
    if turn_off:
        disable_progress_bars()
    try:
        yield
    finally:
        if turn_off:
            enable_progress_bars()


def _hf_fetch(loc: HFLocation, cache_dir: str | os.PathLike | None) -> Path:
    import huggingface_hub

    kwargs = {"repo_id": loc.repo_id, "revision": loc.revision}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(Path(cache_dir).expanduser() / "hf")
    try:
        with _hf_bars_off_when_quiet():
            if loc.path is None:
                return Path(huggingface_hub.snapshot_download(**kwargs))
            return Path(huggingface_hub.hf_hub_download(filename=loc.path, **kwargs))
    except Exception as e:  # huggingface_hub raises many types (offline, not found, auth, HTTP)
        what = f"{loc.repo_id}/{loc.path}" if loc.path else loc.repo_id
        raise DownloadError(
            f"cannot fetch hf://{what} at revision {loc.revision or 'main'}: {type(e).__name__}: {e}"
        ) from e


def resolve(
    uri: str | os.PathLike,
    *,
    sha256: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    retries: int = 3,
    timeout: float = 60.0,
) -> Path:
    """Turn a checkpoint URI into a local, verified path.

    Args:
        uri: a local path, `file:///abs/path`, `https://...` (or `http://`), or
            `hf://org/repo[@revision][/path/in/repo]`.
        sha256: the full expected sha256 of the file. Required for http(s); checked for local
            files and `hf://` files when given. Directories are not hashed here (a checkpoint
            directory carries its own manifest, checked when it is loaded).
        cache_dir: cache root (default `$ZOO_HOME` or `~/.cache/zoo`).
        retries: extra attempts for a broken http(s) transfer.
        timeout: socket timeout for http(s), seconds.

    Returns:
        The local path (a file, or a directory for local directories and `hf://` snapshots).
    """
    text = os.fspath(uri)
    scheme = urllib.parse.urlsplit(text).scheme if "://" in text else ""
    if scheme in ("http", "https"):
        if sha256 is None:
            raise HubError(f"refusing to download {text} without its sha256: pass sha256= (the full digest)")
        return download(text, sha256, cache_dir=cache_dir, retries=retries, timeout=timeout)
    if scheme == "hf":
        path = _hf_fetch(parse_hf_uri(text), cache_dir)
    elif scheme == "file":
        parts = urllib.parse.urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise HubError(f"file:// URI {text!r} names host {parts.netloc!r}; only local files are supported")
        path = Path(urllib.request.url2pathname(parts.path))
    elif scheme == "":
        path = Path(text).expanduser()
    else:
        raise HubError(f"unsupported URI scheme {scheme!r} in {text!r}; use a path, file://, https://, or hf://")
    if not path.exists():
        raise HubError(f"{text!r}: no such file or directory ({str(path)!r})")
    if sha256 is not None:
        if path.is_dir():
            raise HubError(f"{text!r} is a directory; sha256= applies to a single file")
        verify_file(path, sha256)
    return path


__all__ = [
    "DownloadError",
    "HFLocation",
    "HubError",
    "IntegrityError",
    "download",
    "normalize_sha256",
    "parse_hf_uri",
    "resolve",
    "verify_file",
    "zoo_home",
]
