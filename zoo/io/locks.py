"""Locks on directories a process writes into (a run directory), and the temporaries a kill leaves.

`hold_lock(directory)` takes an exclusive `fcntl.flock` on `directory/.zoo-lock` for as long as the
`with` block runs and writes the holder's pid into it. The kernel drops the lock when its process
ends, however it ends (kill -9 included), so a lock is never stale; the file stays behind, empty of
meaning. A second process is refused at once with `DirectoryBusy` naming the holder's pid, or,
with `wait=True`, blocks until the holder ends.

`remove_stale_temporaries(directory)` removes what an interrupted atomic write leaves: the
`.<name>.tmp-*` / `.<name>.old-*` directories of `zoo.io.checkpoint`, DeepSpeed's `.tmp-<tag>`
checkpoint directories, and `mkstemp` files ending in `.tmp`. Call it only while holding the lock:
then no live process is writing them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK_NAME = ".zoo-lock"

# What an interrupted atomic write leaves (zoo.io.checkpoint, the DeepSpeed engine, mkstemp writers).
_STALE_DIR = re.compile(r"^\..+\.(tmp|old)-[A-Za-z0-9_]+$|^\.tmp-.+$")
_STALE_FILE = re.compile(r"^(\..+\.[A-Za-z0-9_]+\.tmp|tmp[A-Za-z0-9_]+\.tmp|.+\.json\.tmp)$")


class DirectoryBusy(RuntimeError):
    """Another live process holds the directory's lock.

    Attributes:
        pid: the holder's process id (0 if it could not be read).
        path: the locked directory.
    """

    def __init__(self, message: str, pid: int, path: Path):
        super().__init__(message)
        self.pid = pid
        self.path = path


def _holder(fd: int) -> int:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return int(os.read(fd, 32).decode().strip() or 0)
    except (OSError, ValueError):
        return 0


@contextlib.contextmanager
def hold_lock(directory: str | os.PathLike, what: str | None = None, *, wait: bool | float = False,
              on_wait: Callable[[int], None] | None = None, hint: str = "wait for it to end, or pass --wait") -> Iterator[Path]:
    """Hold an exclusive lock on `directory` (created if absent) while the block runs.

    Args:
        directory: the directory to lock (its `.zoo-lock` file holds the lock and the pid).
        what: how messages name it (default: `directory <path>`).
        wait: False: refuse at once if held; True: wait until free; a number: wait that many seconds.
        on_wait: called once with the holder's pid when this process starts waiting.
        hint: what the refusal tells the user to do.

    Yields:
        The directory.

    Raises:
        DirectoryBusy: a live process holds it (after `wait` seconds, if a number).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    what = what or f"directory {str(directory)!r}"
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            if wait is False:
                raise DirectoryBusy(f"{what} is in use by process {pid or '(unknown)'}, which is writing into it; {hint}",
                                    pid, directory) from None
            if on_wait is not None:
                on_wait(pid)
            deadline = None if wait is True else time.monotonic() + float(wait)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if deadline is not None else 0))
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        pid = _holder(fd)
                        raise DirectoryBusy(f"{what} is still in use by process {pid or '(unknown)'} after waiting "
                                            f"{float(wait):g} s", pid, directory) from None
                    time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, str(os.getpid()).encode())
        try:
            yield directory
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: str | os.PathLike, *, skip: tuple[str, ...] = ("data",)) -> list[Path]:
    """Remove the temporaries an interrupted write left under `directory` (hold its lock first).

    Args:
        directory: the run directory.
        skip: top-level folders not searched (built data holds no temporaries of the writers above).

    Returns:
        The removed paths.
    """
    root = Path(directory)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == root:
            dirnames[:] = [d for d in dirnames if d not in skip]
        for d in list(dirnames):
            if _STALE_DIR.match(d):
                shutil.rmtree(here / d, ignore_errors=True)
                removed.append(here / d)
                dirnames.remove(d)
        for f in filenames:
            if _STALE_FILE.match(f) and f != LOCK_NAME:
                with contextlib.suppress(FileNotFoundError):
                    (here / f).unlink()
                    removed.append(here / f)
    return removed


__all__ = ["DirectoryBusy", "LOCK_NAME", "hold_lock", "remove_stale_temporaries"]
