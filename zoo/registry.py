"""Component registries: a name -> builder table per method slot (routers, experts, stages, ...).

One small class serves every slot, so every slot behaves alike for users and for tests::

    ROUTERS = Registry("router")

    @ROUTERS.register("topk", options=TopKOptions)
    class TopKRouter(nn.Module): ...

    ROUTERS.names()                                   # ['topk', ...]
    ROUTERS.get("topk")                               # the class; an unknown name lists the registered ones
    ROUTERS.build("topk", {"top_k": 2}, hidden_size=64, num_experts=8)

`build(name, options, **context)` validates `options` (a mapping) and calls the entry with the
context keywords and the options as keywords. An entry registered with an options dataclass is
validated by it (an unknown option is named with the accepted ones, and the dataclass checks
ranges); an entry without one is validated against its call signature. Context keywords are what
the caller knows and the user does not choose (the model width, the expert count, ...).

Entries may carry an `example`: options that build a tiny instance, which the registry-driven tests
use when the defaults are not enough (a timm encoder needs a model name). A new entry is then
tested by every registry-driven test without editing them.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from zoo.config import config_from_dict, rewrap

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered component.

    Attributes:
        name: the registered name.
        target: the class or function `build` calls.
        options: the options dataclass, or None (options are checked against `target`'s signature).
        example: options that build a tiny instance for tests (default: the options' defaults).
        context: keywords the caller passes that are not options (excluded from the accepted options).
    """

    name: str
    target: T
    options: type | None = None
    example: Mapping[str, Any] = field(default_factory=dict)
    context: tuple[str, ...] = ()

    def accepted_options(self) -> list[str]:
        """Option names this entry accepts (sorted)."""
        if self.options is not None:
            return sorted(f.name for f in dataclasses.fields(self.options))
        params = inspect.signature(self.target).parameters.values()
        kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return sorted(p.name for p in params if p.kind in kinds and p.name not in self.context)

    def takes_any_option(self) -> bool:
        """True when `target` accepts arbitrary keywords (`**kwargs`) and has no options dataclass."""
        if self.options is not None:
            return False
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(self.target).parameters.values())


class Registry(Generic[T]):
    """Named components of one kind.

    Args:
        kind: what the entries are ("router", "stage", ...), used in error messages.
        context: keyword names every `build` passes besides the options (e.g. `hidden_size`).
    """

    def __init__(self, kind: str, *, context: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.context = tuple(context)
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self, name: str, *, options: type | None = None, example: Mapping[str, Any] | None = None
    ) -> Callable[[T], T]:
        """Decorator: register a class or function under `name`.

        Args:
            name: the name configs use.
            options: a dataclass whose fields are the entry's options (validated in `build`).
            example: options that build a tiny instance (registry-driven tests).

        Raises:
            ValueError: the name is taken, or `options` is not a dataclass.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} registry: a name must be a non-empty string, got {name!r}")
        if options is not None and not dataclasses.is_dataclass(options):
            raise ValueError(f"{self.kind} {name!r}: options must be a dataclass, got {options!r}")

        def deco(target: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._entries[name].target!r})")
            self._entries[name] = Entry(name, target, options, dict(example or {}), self.context)
            return target

        return deco

    def unregister(self, name: str) -> None:
        """Remove an entry (for tests that register a temporary one)."""
        self.entry(name)
        del self._entries[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, name: str) -> Entry[T]:
        """The `Entry` for `name`.

        Raises:
            ValueError: unknown name; the message lists the registered names (and close matches).
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            close = difflib.get_close_matches(str(name), self._entries, n=3)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown {self.kind} {name!r}; registered {self.kind}s: {self.names()}{hint}") from None

    def get(self, name: str) -> T:
        """The registered class or function (see `entry` for the error)."""
        return self.entry(name).target

    def options(self, name: str, options: Mapping[str, Any] | Any | None = None) -> Any:
        """Validated options of `name`: its options dataclass instance, or a plain dict.

        Raises:
            ValueError: an unknown option (named with the accepted ones) or a value the options reject.
        """
        entry = self.entry(name)
        if entry.options is not None:
            if isinstance(options, entry.options):
                return options
            try:
                return config_from_dict(entry.options, dict(options or {}))
            except (TypeError, ValueError) as e:
                raise rewrap(e, f"{self.kind} {name!r}") from None
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"{self.kind} {name!r}: options must be a mapping, got {type(options).__name__}")
        opts = dict(options or {})
        if not entry.takes_any_option():
            accepted = entry.accepted_options()
            unknown = sorted(set(opts) - set(accepted))
            if unknown:
                raise ValueError(f"{self.kind} {name!r}: unknown option(s) {unknown}; accepted options are {accepted}")
        return opts

    def build(self, name: str, options: Mapping[str, Any] | Any | None = None, **context: Any) -> Any:
        """Validate `options` for `name` and call the entry with `**context, **options`.

        Args:
            name: the registered name.
            options: a mapping of option values (or an instance of the entry's options dataclass).
            **context: keywords supplied by the caller, not by the user's config.
        """
        entry = self.entry(name)
        opts = self.options(name, options)
        kwargs = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)} if entry.options is not None else opts
        clash = sorted(set(kwargs) & set(context))
        if clash:
            raise ValueError(f"{self.kind} {name!r}: {clash} are set by the caller, not by options")
        return entry.target(**context, **kwargs)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


__all__ = ["Entry", "Registry"]
