"""Resolution and verified downloads, against a real HTTP server on 127.0.0.1 started by the test."""

from __future__ import annotations

import hashlib
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from zoo.io import hub
from zoo.io.hub import DownloadError, HubError, IntegrityError, download, parse_hf_uri, resolve

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # ~1 MiB, not a multiple of the read size
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Server:
    """Serves PAYLOAD at /file.bin (with Range support), cut off half-way at /cut/file.bin."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.cut_remaining = 0  # how many more /cut requests are cut off half-way
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                if self.path not in ("/file.bin", "/cut/file.bin"):
                    self.send_error(404, "Not Found")
                    return
                start = 0
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(PAYLOAD):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
                else:
                    self.send_response(200)
                body = PAYLOAD[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if self.path.startswith("/cut/") and server.cut_remaining > 0:
                    server.cut_remaining -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True  # promised Content-Length, sent half: a cut transfer
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with _Server() as s:
        yield s


def _cache_files(cache: Path) -> list[str]:
    if not (cache / "downloads").exists():
        return []
    return sorted(p.relative_to(cache).as_posix() for p in (cache / "downloads").rglob("*") if p.is_file())


def test_good_download_is_cached_and_reused(server, tmp_path):
    path = download(f"{server.url}/file.bin", SHA, cache_dir=tmp_path)
    assert path == tmp_path / "downloads" / SHA / "file.bin"
    assert path.read_bytes() == PAYLOAD
    assert _cache_files(tmp_path) == [f"downloads/{SHA}/file.bin"]
    n = len(server.requests)
    assert resolve(f"{server.url}/file.bin", sha256=SHA.upper(), cache_dir=tmp_path) == path
    assert len(server.requests) == n  # served from the verified cache, no request


def test_zoo_home_is_the_default_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "home"))
    assert hub.zoo_home() == tmp_path / "home"
    path = resolve(f"{server.url}/file.bin", sha256=SHA)
    assert path == tmp_path / "home" / "downloads" / SHA / "file.bin"


def test_cut_transfer_is_resumed_with_a_range_request(server, tmp_path):
    url = f"{server.url}/cut/file.bin"
    server.cut_remaining = 1
    with pytest.raises(DownloadError, match=r"broke off after 1 attempt.*bytes are kept.*resumes"):
        download(url, SHA, cache_dir=tmp_path, retries=0)
    part = tmp_path / "downloads" / SHA / "file.bin.part"
    assert part.stat().st_size == len(PAYLOAD) // 2
    assert not (tmp_path / "downloads" / SHA / "file.bin").exists()  # nothing under the final name

    path = download(url, SHA, cache_dir=tmp_path, retries=0)
    assert path.read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/cut/file.bin", f"bytes={len(PAYLOAD) // 2}-")
    assert _cache_files(tmp_path) == [f"downloads/{SHA}/file.bin"]


def test_cut_transfer_is_retried_within_one_call(server, tmp_path):
    server.cut_remaining = 2
    path = download(f"{server.url}/cut/file.bin", SHA, cache_dir=tmp_path, retries=2, retry_wait=0)
    assert path.read_bytes() == PAYLOAD
    assert [r for _, r in server.requests] == [None, f"bytes={len(PAYLOAD) // 2}-", f"bytes={3 * len(PAYLOAD) // 4}-"]


def test_wrong_hash_removes_the_file_and_says_so(server, tmp_path):
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(IntegrityError, match=rf"expected {wrong}, got {SHA}; the downloaded file was removed"):
        download(f"{server.url}/file.bin", wrong, cache_dir=tmp_path)
    assert _cache_files(tmp_path) == []


def test_wrong_hash_after_resume_removes_the_partial_file(server, tmp_path):
    wrong = "0" * 64
    server.cut_remaining = 1
    with pytest.raises(DownloadError):
        download(f"{server.url}/cut/file.bin", wrong, cache_dir=tmp_path, retries=0)
    with pytest.raises(IntegrityError, match=f"expected {wrong}"):
        download(f"{server.url}/cut/file.bin", wrong, cache_dir=tmp_path, retries=0)
    assert _cache_files(tmp_path) == []


def test_404_is_a_clear_error_and_leaves_nothing(server, tmp_path):
    with pytest.raises(DownloadError, match=rf"HTTP 404 Not Found for {server.url}/missing.bin"):
        download(f"{server.url}/missing.bin", SHA, cache_dir=tmp_path)
    assert _cache_files(tmp_path) == []


def test_corrupted_cache_entry_is_replaced(server, tmp_path):
    path = download(f"{server.url}/file.bin", SHA, cache_dir=tmp_path)
    path.write_bytes(b"bit rot")
    again = download(f"{server.url}/file.bin", SHA, cache_dir=tmp_path)
    assert again.read_bytes() == PAYLOAD


def test_hash_must_be_full_and_given(server, tmp_path):
    with pytest.raises(HubError, match="full 64-hex-digit digest"):
        download(f"{server.url}/file.bin", SHA[:16], cache_dir=tmp_path)
    with pytest.raises(HubError, match="without its sha256"):
        resolve(f"{server.url}/file.bin", cache_dir=tmp_path)
    assert server.requests == []


def test_local_paths_and_file_uris(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(PAYLOAD)
    assert resolve(str(f)) == f
    assert resolve(f.as_uri(), sha256=SHA) == f
    assert resolve(tmp_path) == tmp_path
    with pytest.raises(IntegrityError, match=f"expected {'1' * 64}, got {SHA}"):
        resolve(f, sha256="1" * 64)
    assert f.exists()  # a user's own file is never deleted
    with pytest.raises(HubError, match="no such file"):
        resolve(tmp_path / "nope.bin")
    with pytest.raises(HubError, match="unsupported URI scheme 's3'"):
        resolve("s3://bucket/key")


def test_parse_hf_uri():
    loc = parse_hf_uri("hf://org/repo@v1.2/sub/model.safetensors")
    assert (loc.repo_id, loc.revision, loc.path) == ("org/repo", "v1.2", "sub/model.safetensors")
    assert parse_hf_uri("hf://org/repo") == hub.HFLocation("org/repo", None, None)
    for bad in ("hf://org", "hf://org/repo@", "hf://org/repo/../x"):
        with pytest.raises(HubError):
            parse_hf_uri(bad)


def test_hf_uri_goes_through_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub

    f = tmp_path / "config.json"
    f.write_bytes(b"{}")
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kw: calls.append(kw) or str(f))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: calls.append(kw) or str(tmp_path))
    assert resolve("hf://org/repo@abc123/config.json", sha256=hashlib.sha256(b"{}").hexdigest()) == f
    assert resolve("hf://org/repo") == tmp_path
    assert calls == [
        {"repo_id": "org/repo", "revision": "abc123", "filename": "config.json"},
        {"repo_id": "org/repo", "revision": None},
    ]


def test_hf_offline_error_names_the_repo(tmp_path):
    with pytest.raises(DownloadError, match=r"cannot fetch hf://zoo-test/does-not-exist/x.json at revision main"):
        resolve("hf://zoo-test/does-not-exist/x.json", cache_dir=tmp_path)
