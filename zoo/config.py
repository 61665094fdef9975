"""Config dataclass machinery: dict round trips that name unknown keys and check every value's type.

Every config in the zoo is a small dataclass (a model size is a config entry, never a class).
`config_from_dict` rejects unknown keys by name (with close matches), so a typo in a recipe fails
loudly instead of silently falling back to a default, and checks every value against its field's
type hint before the dataclass sees it: a string where a number belongs, a float where an int
belongs, a list where a mapping belongs are refused with the key path (`stages[2].train.optim.lr`)
and the accepted type. YAML reads `3e-3` (no dot) as a string; a numeric string where a float
belongs is read as the number, and an int is accepted where a float belongs.

A config dataclass with a `config_label` class attribute (`StageConfig.config_label = "stage"`)
is named in errors by its `name` key too (`stages[2]: stage 'lora': ...`).

Errors are `ConfigError`s (a `ValueError`; `ConfigTypeError` is also a `TypeError`) that carry the
key path and, once a loader sets it, the file: `str(e)` is `<file>: <key path>: <cause>`. The
configs themselves live with what they configure: `zoo.moe.MoEConfig`, `zoo.models.ModelConfig`,
the stage and recipe configs in `zoo.pipelines`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")

_NUMBER = re.compile(r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$")


class ConfigError(ValueError):
    """A config value or key is wrong.

    Args:
        message: the cause (what was expected, what was found).
        path: key path from the config's root, e.g. `("stages[2]", "train", "optim", "lr")`.
        file: the file the config was read from (set by the loader; None if unknown).
    """

    def __init__(self, message: str, path: tuple[str, ...] | list[str] = (), file: str | os.PathLike | None = None):
        super().__init__(message)
        self.message = message
        self.path = tuple(path)
        self.file = None if file is None else str(file)

    @property
    def key_path(self) -> str:
        """The key path as written in YAML terms: `stages[2].train.optim.lr`."""
        out = ""
        for part in self.path:
            out += part if part.startswith("[") or not out else f".{part}"
        return out

    def within(self, *parts: str) -> ConfigError:
        """This error seen from the config that holds `parts` (a path inside a file is kept as is)."""
        if self.file is not None:
            return self
        return type(self)(self.message, (*parts, *self.path))

    def in_file(self, file: str | os.PathLike) -> ConfigError:
        """This error, naming `file` (the innermost file wins: a model file named by a recipe)."""
        if self.file is not None:
            return self
        return type(self)(self.message, self.path, file)

    def context(self, text: str) -> ConfigError:
        """This error with `text: ` before its cause (what was being checked), path and file kept."""
        return type(self)(f"{text}: {self.message}", self.path, self.file)

    def __str__(self) -> str:
        where = [w for w in (self.file, self.key_path) if w]
        return ": ".join([*where, self.message])

    def __reduce__(self):
        return type(self), (self.message, self.path, self.file)


class ConfigTypeError(ConfigError, TypeError):
    """A config value has the wrong type (also a `TypeError`)."""


def as_config_error(e: BaseException) -> ConfigError:
    """`e` as a `ConfigError` (a `TypeError` becomes a `ConfigTypeError`)."""
    if isinstance(e, ConfigError):
        return e
    return (ConfigTypeError if isinstance(e, TypeError) else ConfigError)(str(e))


def rewrap(e: BaseException, text: str) -> BaseException:
    """`e` with `text: ` before its cause, keeping a `ConfigError`'s key path and file."""
    if isinstance(e, ConfigError):
        return e.context(text)
    return type(e)(f"{text}: {e}")


@contextlib.contextmanager
def key_path(*parts: str, context: str | None = None):
    """Errors raised inside (`ValueError`, `TypeError`) are `ConfigError`s at `parts` below the current key."""
    try:
        yield
    except (ValueError, TypeError) as e:
        err = as_config_error(e)
        if context:
            err = err.context(context)
        raise err.within(*parts) from None


def in_file(path: str | os.PathLike):
    """Context manager: a `ConfigError` raised inside names `path` (a loader's `with in_file(p): ...`)."""
    return _InFile(path)


class _InFile(contextlib.AbstractContextManager):
    def __init__(self, path):
        self.path = path

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and isinstance(exc, ConfigError) and exc.file is None:
            raise exc.in_file(self.path) from None
        return False


def close_matches(word: str, candidates, n: int = 3) -> str:
    """` (did you mean 'x'?)` for the closest of `candidates`, or `''`."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=n)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def _type_name(hint: Any) -> str:
    """What a type hint accepts, in words a YAML writer knows."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is type(None) or hint is None:
        return "null"
    if hint is bool:
        return "a boolean (true/false)"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if hint in (Path, os.PathLike):
        return "a path (string)"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, tuple) or hint in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
        inner = args[0] if args else Any
        return "a list" + ("" if inner is Any else f" of {_plural(inner)}")
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return "a mapping" + (f" of {_plural(args[1])}" if len(args) == 2 and args[1] is not Any else "")
    if dataclasses.is_dataclass(hint):
        return f"a mapping ({hint.__name__})"
    return getattr(hint, "__name__", str(hint))


def _plural(hint: Any) -> str:
    name = _type_name(hint)
    for a in ("an ", "a "):
        if name.startswith(a):
            return name[len(a):] + "s" if " " not in name[len(a):] else name[len(a):]
    return name


def _got(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})" if not isinstance(value, (dict, list)) else f"a {type(value).__name__}"


def check_value(value: Any, hint: Any, path: tuple[str, ...] = ()) -> Any:
    """`value` checked against type hint `hint` (and converted where YAML falls short).

    Accepts: an int where a float belongs (kept an int), a numeric string where a float belongs
    (YAML's `3e-3`, read as the number), a list where a tuple belongs (as a tuple), a mapping
    where a config dataclass belongs (built with `config_from_dict`). Refuses a bool where a
    number belongs and a float where an int belongs.

    Raises:
        ConfigTypeError: the value does not fit, naming the key path and the accepted type.
    """
    if hint is Any or hint is object or isinstance(hint, TypeVar):
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    def fail():
        return ConfigTypeError(f"expected {_type_name(hint)}, got {_got(value)}", path)

    if hint is type(None) or hint is None:
        if value is None:
            return None
        raise fail()
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        # an exact kind first (a str for `str | list[int]`), then the converting ones
        plain = [m for m in members if _plainly(value, m)]
        if len(plain) == 1:  # the right shape: its error (a wrong inner value) is the one to show
            return check_value(value, plain[0], path)
        for member in plain or members:
            try:
                return check_value(value, member, path)
            except ConfigError:
                continue
        raise fail()
    if origin is typing.Literal:
        if value in args and not (isinstance(value, bool) and True in args and value is not True):
            return value
        raise ConfigTypeError(f"expected {_type_name(hint)}, got {_got(value)}", path)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            raise ConfigTypeError(f"expected an integer, got {_got(value)}; write {int(value)}", path)
        raise fail()
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _NUMBER.match(value):
            number = float(value)
            if math.isfinite(number):
                return number
        raise fail()
    if hint is str:
        if isinstance(value, str):
            return value
        raise fail()
    if hint in (Path, os.PathLike):
        if isinstance(value, (str, os.PathLike)):
            return value
        raise fail()
    if origin is tuple or hint is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail()
        if args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigTypeError(f"expected {_type_name(hint)}, got {len(value)} values {list(value)!r}", path)
            return tuple(check_value(v, a, (*path, f"[{i}]")) for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        return tuple(check_value(v, inner, (*path, f"[{i}]")) for i, v in enumerate(value))
    if origin in (list, typing.Sequence) or hint is list:
        if not isinstance(value, (list, tuple)):
            raise fail()
        inner = args[0] if args else Any
        return [check_value(v, inner, (*path, f"[{i}]")) for i, v in enumerate(value)]
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise fail()
        kt, vt = args if len(args) == 2 else (Any, Any)
        out = {}
        for k, v in value.items():
            key = check_value(k, kt, (*path, str(k)))
            out[key] = check_value(v, vt, (*path, str(k)))
        return out
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            try:
                return config_from_dict(hint, dict(value))
            except ConfigError as e:
                label, name = getattr(hint, "config_label", None), value.get("name")
                if label and isinstance(name, str) and f"{label} {name!r}" not in e.message:
                    e = e.context(f"{label} {name!r}")  # which one, by name: `stages[2]: stage 'lora': ...`
                raise e.within(*path) from None
        raise fail()
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise fail()
    return value  # a hint this checker does not know (a Protocol, a callable): the dataclass checks it


def _plainly(value: Any, hint: Any) -> bool:
    """Is `value` plainly of the kind `hint` names (no conversion)? Picks a union member first."""
    origin = typing.get_origin(hint) or hint
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, float)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin in (dict, Mapping):
        return isinstance(value, Mapping)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (hint, Mapping))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    return False


_HINTS: dict[type, dict[str, Any]] = {}


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type hint of dataclass `cls` (a hint that cannot be resolved: `Any`)."""
    if cls not in _HINTS:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # a forward reference the module cannot resolve: per field, best effort
            import sys

            module = vars(sys.modules.get(cls.__module__, object())) if cls.__module__ in sys.modules else {}
            hints = {}
            for f in dataclasses.fields(cls):
                try:
                    hints[f.name] = eval(f.type, dict(module), {}) if isinstance(f.type, str) else f.type  # noqa: S307
                except Exception:
                    hints[f.name] = Any
        _HINTS[cls] = {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}
    return _HINTS[cls]


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build dataclass `cls` from `data`: unknown keys named, every value checked against its field's type.

    Raises:
        ConfigError: an unknown key (with close matches and the known keys), a value of the wrong
            type (`ConfigTypeError`, naming the key path and the accepted type), or what the
            dataclass itself refuses (its `__post_init__`), with the key path below `cls`.
    """
    if not isinstance(data, Mapping):
        raise ConfigTypeError(f"{cls.__name__}: expected a mapping, got {_got(data)}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known), key=str)
    if unknown:
        hints = "".join(close_matches(k, known) for k in unknown)
        raise ConfigError(f"{cls.__name__}: unknown config key(s) {unknown}{hints}; known keys are {sorted(known)}")
    types_ = field_types(cls)
    values = {k: check_value(v, types_[k], (str(k),)) for k, v in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise as_config_error(e) from None


def to_plain(value: Any) -> Any:
    """Recursively turn dataclasses/tuples into dicts/lists (YAML/JSON-safe)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form of a config dataclass (nested dataclasses become dicts, tuples lists)."""
    return to_plain(cfg)


def _split_where(where: str) -> tuple[str, ...]:
    """`encoders.image` / `adapters[0]` -> key path parts; free text (`recipe 'x': ...`) stays one part."""
    if re.fullmatch(r"[A-Za-z_][\w\-]*(\[\d+\])*(\.[A-Za-z_][\w\-]*(\[\d+\])*)*", where):
        return tuple(p for p in re.split(r"\.|(?=\[)", where) if p)
    return (where,)


def sub_config(cls: type[C], value: Any, where: str) -> C:
    """A nested config from a dict (or as is), its errors at key path `where` (`encoders.image`, `stages[2]`)."""
    if isinstance(value, cls):
        return value
    try:
        return config_from_dict(cls, value)
    except ConfigError as e:
        raise e.within(*_split_where(where)) from None
    except (TypeError, ValueError) as e:
        raise as_config_error(e).within(*_split_where(where)) from None


def load_yaml(path: str | os.PathLike) -> Any:
    """Parse a YAML file; a syntax error is a `ConfigError` naming the file, line and column."""
    import yaml

    p = Path(path)
    text = p.read_text(encoding="utf-8")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise yaml_error(e, p) from None


def yaml_error(e: Exception, path: str | os.PathLike | None) -> ConfigError:
    """A PyYAML error as one line: `<file>:<line>:<column>: YAML syntax error: <problem>`."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    cause = f"YAML syntax error: {problem}" + (f" ({context})" if context else "")
    return ConfigError(f"line {mark.line + 1}, column {mark.column + 1}: {cause}" if mark is not None else cause,
                       file=path if path is not None else None)


__all__ = [
    "ConfigError", "ConfigTypeError", "as_config_error", "check_value", "close_matches", "config_from_dict",
    "config_to_dict", "field_types", "in_file", "key_path", "load_yaml", "rewrap", "sub_config", "to_plain",
    "yaml_error",
]
