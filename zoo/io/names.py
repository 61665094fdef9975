"""Names that become path components: a recipe, a card, a stage name is one folder name, never a path.

`check_name` refuses a separator, `..`, an empty name and control characters, so a name read from
a config cannot place files outside the directory it is meant for (`ZOO_HOME/runs/<recipe name>`,
`OUT/<stage name>`, `ZOO_HOME/models/<card name>/<version>`).
"""

from __future__ import annotations

import os
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_name(name: object, what: str) -> str:
    """`name` if it is safe as one path component, else a `ValueError` naming `what` and why.

    Args:
        name: the name read from a config or the command line.
        what: what it names, for the message ("recipe name", "stage name", "card name").
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")
    seps = {"/", "\\", os.sep, *([os.altsep] if os.altsep else [])}
    found = sorted(c for c in seps if c in name)
    if found:
        raise ValueError(f"{what} {name!r} contains the path separator {found[0]!r}; it becomes a folder name, "
                         "so it must be one path component")
    if ".." in name or name in (".", "~") or name.startswith("~"):
        raise ValueError(f"{what} {name!r} may not contain '..' or be '.' or start with '~' (it becomes a folder name)")
    if _CONTROL.search(name):
        raise ValueError(f"{what} {name!r} contains a control character")
    return name


__all__ = ["check_name"]
