"""One line per error: what the CLIs print instead of a traceback (`zoo: error: <cause>`).

`describe(e)` turns an exception into one line that names its cause, by class:

- the zoo's own errors and `ValueError` / `TypeError` / `KeyError` raised for bad input: their
  message (a `ConfigError` names the file and key path);
- OS errors (read-only file system, disk full, not a directory, permission denied, ...): the
  operation, the path and the reason;
- YAML syntax errors: the file, line and column;
- huggingface_hub / network errors: that the command needs the network (or what the Hub refused);
- torch device errors (an absent CUDA or MPS device): that the device is absent;
- anything else: its class and message, marked as unexpected.

`check_device(name)` refuses a device that does not exist on this machine before any work starts.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback

# Phrases for the OS errors a user causes (by errno).
_REASONS = {
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "no space left on the device (disk full)",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "it is a directory",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EEXIST: "it already exists",
    errno.ENOENT: "no such file or directory",
    errno.ENOTEMPTY: "the directory is not empty",
    errno.EXDEV: "it is on another file system",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EMFILE: "too many open files",
    errno.EIO: "input/output error",
}

# Function names (in the traceback) -> the operation, for the message.
_OPERATIONS = {
    "mkdir": "create the directory", "makedirs": "create the directory", "mkdtemp": "create a temporary directory in",
    "mkstemp": "create a temporary file in", "NamedTemporaryFile": "create a temporary file in",
    "TemporaryDirectory": "create a temporary directory in",
    "write_text": "write", "write_bytes": "write", "write": "write", "flush": "write", "save_file": "write",
    "save": "write", "dump": "write", "read_text": "read", "read_bytes": "read", "read": "read", "load_file": "read",
    "open": "open", "touch": "create", "rename": "rename", "replace": "rename", "move": "move",
    "unlink": "remove", "remove": "remove", "rmtree": "remove", "rmdir": "remove",
    "copyfile": "copy", "copy": "copy", "copy2": "copy", "copytree": "copy",
    "symlink_to": "link", "symlink": "link", "iterdir": "list", "listdir": "list", "scandir": "list",
    "stat": "read", "chmod": "change the permissions of",
}

_NETWORK_NAMES = ("OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError", "ConnectError", "ConnectTimeout",
                  "ReadTimeout", "Timeout", "TimeoutException", "MaxRetryError", "NewConnectionError", "NameResolutionError",
                  "gaierror", "URLError")


def _names(e: BaseException) -> list[str]:
    return [c.__name__ for c in type(e).__mro__]


def _operation(e: BaseException) -> str | None:
    """The operation that failed, read from the innermost traceback frame that names one."""
    frames = traceback.extract_tb(e.__traceback__) if e.__traceback__ is not None else []
    for frame in reversed(frames):
        if frame.name in _OPERATIONS:
            return _OPERATIONS[frame.name]
        line = frame.line or ""
        for name, op in _OPERATIONS.items():
            if f".{name}(" in line or line.startswith(f"{name}(") or f" {name}(" in line:
                return op
    return None


def describe_os_error(e: OSError) -> str:
    """`cannot <operation> <path>: <reason>` for an OS error (what a read-only or full disk raises)."""
    if e.errno is None:  # raised with a message of our own
        return str(e)
    reason = _REASONS.get(e.errno) or (e.strerror or str(e)).rstrip(".").lower()
    op = _operation(e) or "access"
    if e.filename is not None and e.filename2 is not None:
        return f"cannot {op} {os.fsdecode(e.filename)!r} to {os.fsdecode(e.filename2)!r}: {reason}"
    if e.filename is not None:
        return f"cannot {op} {os.fsdecode(e.filename)!r}: {reason}"
    return f"cannot {op} a file: {reason}" + (f" ({e.strerror})" if e.strerror and e.strerror.lower() != reason else "")


def _is_network(e: BaseException) -> bool:
    names = _names(e)
    if any(n in _NETWORK_NAMES for n in names):
        return True
    module = type(e).__module__ or ""
    return module.startswith(("requests", "httpx", "urllib3")) and any("Connect" in n or "Timeout" in n for n in names)


def _hub_error(e: BaseException) -> bool:
    return (type(e).__module__ or "").startswith("huggingface_hub")


def describe(e: BaseException, command: str | None = None) -> str:
    """One line naming the cause of `e` (see the module docstring for the classes it knows)."""
    what = f"`{command}`" if command else "this command"
    if _is_network(e):
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline or "Offline" in type(e).__name__ else f"the network is unreachable ({type(e).__name__})"
        return f"{what} needs the network, but {why}: {_first_line(e)}"
    if _hub_error(e):
        return f"the Hugging Face Hub refused: {_first_line(e)}"
    try:
        import yaml

        if isinstance(e, yaml.YAMLError):
            from zoo.config import yaml_error

            mark = getattr(e, "problem_mark", None)
            name = getattr(mark, "name", None)
            return str(yaml_error(e, name if name and not name.startswith("<") else None))
    except ImportError:  # pragma: no cover
        pass
    if isinstance(e, OSError):
        return describe_os_error(e)
    if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) and len(e.args) == 1:
        return e.args[0]
    device = _device_error(e)
    if device is not None:
        return device
    if isinstance(e, (ValueError, TypeError, RuntimeError, LookupError)) or type(e).__module__.startswith("zoo"):
        return _first_line(e) if str(e) else type(e).__name__
    return f"unexpected {type(e).__name__}: {_first_line(e)} (set ZOO_DEBUG=1 for the traceback)"


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0] if len(lines) <= 1 else lines[0] + " ..."


def _device_error(e: BaseException) -> str | None:
    text = str(e)
    if "not compiled with CUDA" in text or "Found no NVIDIA driver" in text or "no CUDA GPUs are available" in text:
        return f"no CUDA device is available on this machine ({_first_line(e)})"
    if "Expected one of" in text and "device type at start of device string" in text:
        return f"unknown device: {_first_line(e)}"
    if "invalid device ordinal" in text.lower():
        return f"that CUDA device does not exist ({_first_line(e)})"
    return None


def check_device(name: str) -> str:
    """`name` if torch can use that device here, else a `ValueError` saying why (unknown type, absent device).

    Raises:
        ValueError: `--device cuda` on a machine without CUDA, `cuda:3` with two GPUs, a typo.
    """
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {name!r}: {_first_line(e)}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} is absent: this machine has no usable CUDA device (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} is absent: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"device {name!r} is absent: MPS is not available on this machine (use --device cpu)")
    elif device.type not in ("cpu", "meta"):
        accel = getattr(torch, device.type, None)
        if accel is None or not getattr(accel, "is_available", lambda: False)():
            raise ValueError(f"device {name!r} is absent on this machine (use --device cpu)")
    return name


def report_errors(prog: str, fn, errors: tuple[type[BaseException], ...] = (), command: str | None = None) -> int:
    """Call `fn()`; an error prints one line `prog: error: <cause>` and gives status 1, not a traceback.

    `errors` (bad input: the zoo's errors, `ValueError`, ...) print their message; every other
    exception is named by its class through `zoo.errors.describe` (an OS error names the operation
    and path, a YAML error the file, line and column, a network error that `command` needs the
    network). Set `ZOO_DEBUG=1` to get the traceback anyway.

    Returns:
        `fn()`'s status if it returned an int, else 0; 1 after an error.
    """
    try:
        status = fn()
    except Exception as e:  # noqa: BLE001 - every error ends in one line (ZOO_DEBUG=1: the traceback)
        if os.environ.get("ZOO_DEBUG"):
            raise
        plain = isinstance(e, errors) and not isinstance(e, (OSError, KeyError)) and str(e).strip()
        print(f"{prog}: error: {_first_line(e) if plain else describe(e, command)}", file=sys.stderr)
        return 1
    return status if isinstance(status, int) else 0


__all__ = ["check_device", "describe", "describe_os_error", "report_errors"]
