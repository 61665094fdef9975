"""Config dataclass machinery: dict round trips that name unknown keys.

Every config in the zoo is a small dataclass (a model size is a config entry, never a class).
`config_from_dict` rejects unknown keys by name, so a typo in a recipe fails loudly instead of
silently falling back to a default. The configs themselves live with what they configure:
`zoo.moe.MoEConfig`, `zoo.models.ModelConfig`, the stage and recipe configs in `zoo.pipelines`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

C = TypeVar("C")


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build dataclass `cls` from `data`, naming any key `cls` does not have."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config key(s) {unknown}; known keys are {sorted(known)}")
    return cls(**data)


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


def sub_config(cls: type[C], value: Any, where: str) -> C:
    """A nested config from a dict (or as is), prefixing errors with where it sits (`encoders.image`)."""
    if isinstance(value, cls):
        return value
    try:
        return config_from_dict(cls, value)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from None


__all__ = ["config_from_dict", "config_to_dict", "sub_config", "to_plain"]
