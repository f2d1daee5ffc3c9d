"""The shape of `[[backend]]`, `[[route]]` and `[[tcp]]` arrays of tables,
and the names their entries go by, checked the same way for each."""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator

from ..config_model import ConfigError
from .config_values import show

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def array_of_tables(entries: Any, section: str,
                    known: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    """(`section[i]`, table) for each [[section]] table, after checking the shape."""
    if not isinstance(entries, list):
        raise ConfigError(section, f"must be an array of tables ([[{section}]])")
    for i, entry in enumerate(entries):
        where = f"{section}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(where, f"must be a table ([[{section}]])")
        unknown = sorted(set(entry) - set(known))
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}", f"unknown key (known: {', '.join(known)})")
        yield where, entry


def entry_name(entry: dict, where: str, seen: set[str], what: str) -> str:
    """The entry's `name`, which must be a NAME not used by another `what`."""
    name = entry.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(f"{where}.name", "must be 1-64 letters, digits, '.', '_' or '-' "
                          f"(starting with a letter or digit), got {show(name)}")
    if name in seen:
        raise ConfigError(f"{where}.name", f"duplicate {what} name {name!r}")
    seen.add(name)
    return name


def checked_keys(entry: dict, keys: dict[str, Callable[[Any], Any]], where: str) -> dict:
    """The optional `keys` present in a table, each through its check; a bad
    value is a ConfigError naming `where`.KEY."""
    out = {}
    for key, check in keys.items():
        if key in entry:
            try:
                out[key] = check(entry[key])
            except ValueError as exc:
                raise ConfigError(f"{where}.{key}", str(exc)) from None
    return out
