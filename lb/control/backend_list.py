"""Backends from the command line or the environment.

`--backend URL` (repeatable) and `TTS_LB_BACKENDS="http://a:10129,http://b:10130"`
replace the configuration file's `[[backend]]` list; every other setting
still comes from the file.  This is the list that apps calling TTS servers
directly keep in `CHATTTS_API_URLS`, so a migration is one line:
`TTS_LB_BACKENDS=$CHATTTS_API_URLS tts-lb`.

An entry is `[name=]URL`.  Without a name, the backend is named after its
host and port (`http://10.0.0.5:10129` -> `10.0.0.5-10129`).  A bare
`host:port` is taken as `http://host:port`.  A bad entry stops the start
with one line naming that entry.
"""

from __future__ import annotations

import re
from typing import Mapping

from .config import BACKEND_NAME, ConfigError
from .config_values import backend_url, without_password

ENV_BACKENDS = "TTS_LB_BACKENDS"


def from_entries(entries: list[str]) -> list[dict]:
    """`--backend` values -> [[backend]] tables."""
    return _tables([(f"--backend {_shown(entry)}", entry) for entry in entries])


def from_environment(environ: Mapping[str, str]) -> list[dict] | None:
    """TTS_LB_BACKENDS -> [[backend]] tables; None when it is not set."""
    if ENV_BACKENDS not in environ:
        return None
    entries = [part.strip() for part in environ[ENV_BACKENDS].split(",")]
    if not any(entries):
        # `TTS_LB_BACKENDS=$CHATTTS_API_URLS` with the latter unset: running the
        # file's backends instead would hide the mistake.
        raise ConfigError(ENV_BACKENDS, "is set but lists no backends (expected URLs "
                          "separated by commas, like http://a:10129,http://b:10130)")
    return _tables([(f"{ENV_BACKENDS} entry {i} {_shown(entry)}", entry)
                    for i, entry in enumerate(entries, 1) if entry])


def _tables(entries: list[tuple[str, str]]) -> list[dict]:
    tables: list[dict] = []
    names: dict[str, str] = {}
    for where, entry in entries:
        name, url = _split(where, entry)
        try:
            host, port = backend_url(url)
        except ValueError as exc:
            raise ConfigError(where, str(exc)) from None
        if port is None:
            raise ConfigError(where, "needs a port (like http://host:10129): a TTS server "
                              "is seldom on port 80")
        name = name or _derived_name(host, port)
        if name in names:
            raise ConfigError(where, f"the backend name {name!r} is taken by {names[name]}"
                              " (give each a name: name=URL)")
        names[name] = where
        tables.append({"name": name, "url": url})
    return tables


def _split(where: str, entry: str) -> tuple[str, str]:
    name, sep, url = entry.partition("=")
    if not sep or "://" in name or ":" in name:
        name, url = "", entry   # no name= prefix ('=' may sit later in a bad URL)
    elif not BACKEND_NAME.fullmatch(name):
        raise ConfigError(where, "the name before '=' must be 1-64 letters, digits, '.', '_' "
                          "or '-' (starting with a letter or digit)")
    if url and "://" not in url:
        url = "http://" + url
    if not url:
        raise ConfigError(where, "has no URL")
    return name, url


def _derived_name(host: str, port: int) -> str:
    base = re.sub(r"[^A-Za-z0-9.-]+", "-", host).strip("-.") or "backend"
    return f"{base}-{port}"[-64:].lstrip("-.")


def _shown(entry: str) -> str:
    """The entry as messages quote it: without a password, if it holds one."""
    return repr(without_password(entry))
