"""Class names that survive the trip through `classes.txt` (one name a line) and through folder names.

A name with a line break splits into two classes in `classes.txt` and shifts every label after it; surrounding
spaces are lost when the file is read back; a path separator (or "." / "..") names another folder. Such names are
refused where a dataset's classes are first found (folders, a CSV's labels, a `classes.txt`), naming the name.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

# Cc: control characters (\n, \r, \t, \x1c-\x1e and \x85 among them); Zl, Zp: the line and paragraph separators
# that str.splitlines also splits on.
_BREAKING = ("Cc", "Zl", "Zp")


def class_name_problem(name: object) -> str | None:
    """Why `name` cannot round-trip as a class name, or None when it can."""
    if not isinstance(name, str):
        return f"a {type(name).__name__}, not text"
    if not name.strip():
        return "empty or only spaces"
    if name != name.strip():
        return "leading or trailing white space"
    bad = next((c for c in name if unicodedata.category(c) in _BREAKING), None)
    if bad is not None:
        return f"control character {bad!r}"
    if "/" in name or "\\" in name or name in (".", ".."):
        return "a path separator or a relative folder name"
    return None


def check_class_names(names: Iterable[object], source: str) -> None:
    """Refuse the first name of `names` that cannot round-trip (see the module notes).

    Raises:
        ValueError: naming `source`, the name and the reason.
    """
    for name in names:
        problem = class_name_problem(name)
        if problem is not None:
            raise ValueError(
                f"{source}: class name {name!r} cannot be written to classes.txt or a folder name and read back "
                f"({problem}); rename that class"
            )
