"""Progress bars (`zoo.progress`) on long work: quiet when asked or when stderr is no terminal.

Every user of the helper is checked the same two ways: quiet (`--quiet`, `ZOO_QUIET=1`, or a
stderr that is not a terminal) writes nothing to stderr; a terminal (a fake tty stderr) or
`quiet=False` (tqdm's `disable=False`) writes a bar whose total is the work's true size.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from zoo.io.hub import download
from zoo.pipelines import eval as eval_mod
from zoo.pipelines.data.__main__ import main as data_main
from zoo.pipelines.data.feature_cache import FeatureCache
from zoo.progress import QUIET_ENV, is_quiet, progress, quiet_while


class FakeTTY(io.StringIO):
    """A stderr that says it is a terminal and keeps what was written."""

    def isatty(self) -> bool:
        return True


def fake_tty(monkeypatch) -> FakeTTY:
    """Make stderr a terminal for the rest of the test (call it in the test body: pytest's capture
    swaps sys.stderr back in after fixtures run)."""
    monkeypatch.delenv(QUIET_ENV, raising=False)
    err = FakeTTY()
    monkeypatch.setattr(sys, "stderr", err)
    return err


def totals(text: str) -> list[int]:
    """The `n/total` counts of every bar refresh in `text` (tqdm writes `| 3/7 [`)."""
    return [int(t) for t in re.findall(r"\|\s*[\d.]+[kMG]?i?B?/([\d.]+)[kMG]?i?B?\s*\[", text)]


def test_quiet_writes_nothing_and_a_forced_bar_has_the_right_total(capfd, monkeypatch):
    monkeypatch.delenv(QUIET_ENV, raising=False)
    assert list(progress(range(7), desc="work", quiet=True)) == list(range(7))  # a quiet bar still iterates
    assert capfd.readouterr().err == ""
    assert list(progress(range(7), desc="work", quiet=False)) == list(range(7))
    err = capfd.readouterr().err
    assert "work" in err and totals(err) and set(totals(err)) == {7} and "7/7" in err


def test_no_terminal_means_no_bar_and_zoo_quiet_overrides_a_terminal(capfd, monkeypatch):
    monkeypatch.delenv(QUIET_ENV, raising=False)
    assert is_quiet() and not is_quiet(False)  # pytest's captured stderr is not a terminal
    for _ in progress(range(50), desc="loop"):  # non-tty log: no bar spam
        pass
    assert capfd.readouterr().err == ""
    err = fake_tty(monkeypatch)
    assert not is_quiet()
    monkeypatch.setenv(QUIET_ENV, "1")
    assert is_quiet()
    for _ in progress(range(5)):
        pass
    assert err.getvalue() == ""


def test_quiet_while_sets_and_restores_the_environment(monkeypatch):
    monkeypatch.delenv(QUIET_ENV, raising=False)
    with quiet_while(True):
        assert is_quiet() and os.environ[QUIET_ENV] == "1"  # what child processes inherit
    assert QUIET_ENV not in os.environ
    monkeypatch.setenv(QUIET_ENV, "0")
    with quiet_while(True):
        assert is_quiet()
    assert os.environ[QUIET_ENV] == "0"
    with quiet_while(False):
        assert os.environ[QUIET_ENV] == "0"


def test_a_cli_quiet_flag_quiets_the_command_and_only_while_it_runs(monkeypatch):
    import argparse

    from zoo.cli import run_cli

    monkeypatch.delenv(QUIET_ENV, raising=False)
    seen = []
    parser = argparse.ArgumentParser(prog="zoo")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("work")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=lambda args: seen.append(os.environ.get(QUIET_ENV)) or 0)
    assert run_cli(parser, ["work", "--quiet"], ()) == 0 and run_cli(parser, ["work"], ()) == 0
    assert seen == ["1", None] and QUIET_ENV not in os.environ


# --- data builds ------------------------------------------------------------------------------------


def test_data_build_shows_one_bar_per_family_on_a_terminal_and_none_with_quiet(monkeypatch, tmp_path, capsys):
    tty = fake_tty(monkeypatch)
    args = ["build", "--out", str(tmp_path / "a"), "--families", "caption", "asr", "--max-per-split", "2"]
    assert data_main(args) == 0
    text = tty.getvalue()
    for family in ("caption", "asr"):
        bars = [line for line in re.split(r"[\r\n]", text) if line.startswith(f"{family}:")]
        assert bars and set(totals("\n".join(bars))) == {6}, (family, bars)  # 2 per split x 3 splits
    assert "6/6" in text
    tty.seek(0)
    tty.truncate()
    assert data_main([*args[:2], str(tmp_path / "b"), *args[3:], "--quiet"]) == 0
    assert tty.getvalue() == ""
    out = capsys.readouterr().out
    assert "caption: {'train': 2, 'val': 2, 'test': 2}" in out  # the one summary line per family stays


# --- downloads --------------------------------------------------------------------------------------

PAYLOAD = bytes(range(256)) * 1024 + b"end"  # 256 KiB + 3 bytes


@pytest.fixture
def http_url():
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            start = int((self.headers.get("Range") or "bytes=0-").removeprefix("bytes=").split("-")[0])
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
            self.send_header("Content-Length", str(len(PAYLOAD) - start))
            self.end_headers()
            self.wfile.write(PAYLOAD[start:])

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/weights.bin"
    httpd.shutdown()
    httpd.server_close()


def test_download_bar_counts_bytes_and_starts_at_the_resumed_offset(http_url, tmp_path, capfd):
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    download(http_url, sha, cache_dir=tmp_path / "quiet", quiet=True)
    assert capfd.readouterr().err == ""

    kept = 100_000
    part = tmp_path / "c" / "downloads" / sha / "weights.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:kept])  # an interrupted earlier call
    path = download(http_url, sha, cache_dir=tmp_path / "c", quiet=False)
    assert path.read_bytes() == PAYLOAD
    err = capfd.readouterr().err
    assert "weights.bin" in err
    refreshes = [line for line in re.split(r"[\r\n]", err) if line.startswith("weights.bin")]
    assert "97.7k/256k" in refreshes[0], refreshes  # starts at the 100000 bytes kept, of 262147 (KiB units)
    assert "256k/256k" in refreshes[-1] and "100%" in refreshes[-1], refreshes


# --- feature-cache fills ----------------------------------------------------------------------------


def test_feature_cache_fill_bar_counts_the_misses(tmp_path, capfd):
    calls = []

    def encoder(items):
        calls.append(len(items))
        return torch.stack([torch.tensor([float(len(b))]) for b in items])

    cache = FeatureCache(tmp_path, "enc@v1", encoder)
    items = [bytes([i]) * (i + 1) for i in range(7)]
    cache.encode(items[:2])  # two are cached already
    calls.clear()
    assert cache.fill(items + items[:3], quiet=False) == 5  # duplicates and cached ones skipped
    assert calls == [1] * 5  # one item per encoder call, as `encode` (features independent of the batch)
    err = capfd.readouterr().err
    assert "features enc@v1" in err and set(totals(err)) == {5} and "5/5" in err
    assert cache.fill(items, quiet=True) == 0 and capfd.readouterr().err == ""
    assert [float(f) for f in cache.encode(items)] == [float(len(b)) for b in items]


# --- evaluation -------------------------------------------------------------------------------------


class _Tok:
    eos_token_id, pad_token_id = 0, 0

    def decode(self, row, skip_special_tokens=True):
        return "yes"


class _Processor:
    tokenizer = _Tok()


class _Model(torch.nn.Module):
    def generate(self, input_ids, **kw):
        return torch.ones(input_ids.shape[0], 1, dtype=torch.long)


def test_eval_bar_counts_batches_and_is_quiet_when_asked(monkeypatch, capfd):
    monkeypatch.setattr(eval_mod, "collate", lambda samples, processor, with_answers: {
        "input_ids": torch.zeros(len(samples), 2, dtype=torch.long)})
    samples = list(range(7))
    answers = eval_mod.generate_answers(_Model(), _Processor(), samples, batch_size=3, quiet=False, desc="eval vqa")
    assert answers == ["yes"] * 7
    err = capfd.readouterr().err
    assert "eval vqa" in err and set(totals(err)) == {3} and "3/3" in err  # ceil(7 / 3) batches
    eval_mod.generate_answers(_Model(), _Processor(), samples, batch_size=3, quiet=True)
    eval_mod.generate_answers(_Model(), _Processor(), samples, batch_size=3)  # recipe-time call, no terminal
    assert capfd.readouterr().err == ""
