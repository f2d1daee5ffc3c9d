"""Load and validate the balancer's TOML configuration.

The file is read once, checked completely, and turned into frozen dataclasses;
nothing else in the balancer looks at raw TOML.  Every problem is reported as
a `ConfigError` naming the key (``timeouts.connect``, ``backend[1].url``) and
the reason, so `python -m lb --check` can print one precise line and exit 2.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

DEFAULT_PATH = "conf/lb.toml"


class ConfigError(Exception):
    """A configuration problem: which key, and why."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class Listen:
    host: str
    port: int


@dataclass(frozen=True)
class Limits:
    nofile: int
    max_connections: int  # 0: derive from the fd limit actually granted
    max_header_bytes: int
    max_body_bytes: int
    write_buffer_high: int  # per transport; reading the other side pauses above it


@dataclass(frozen=True)
class Timeouts:
    client_header: float
    connect: float
    first_byte: float
    idle: float


@dataclass(frozen=True)
class Pool:
    max_idle: int  # idle upstream connections kept per backend
    idle_timeout: float


@dataclass(frozen=True)
class Log:
    access: bool
    level: str


@dataclass(frozen=True)
class BackendConfig:
    name: str
    url: str
    host: str
    port: int


@dataclass(frozen=True)
class Config:
    listen: Listen
    limits: Limits
    timeouts: Timeouts
    pool: Pool
    log: Log
    backends: tuple[BackendConfig, ...]


# --- value checkers: each takes the raw TOML value and returns the clean one,
# or raises ValueError with a reason phrased for the user.

def _integer(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {_show(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and <= {maximum}" if maximum is not None else ""
            raise ValueError(f"must be >= {minimum}{upper}, got {value}")
        return value
    return check


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number of seconds, got {_show(value)}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"must be a positive, finite number of seconds, got {value}")
    return float(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {_show(value)}")
    return value


def _choice(*allowed: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {_show(value)}")
        return value
    return check


def _address(value: Any) -> tuple[str, int]:
    """'0.0.0.0:6095' or '[::1]:6095' -> (host, port)."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string like \"0.0.0.0:6095\", got {_show(value)}")
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]+)|([A-Za-z0-9.-]+):([0-9]+)",
                         value)
    if not match:
        raise ValueError(f"must be HOST:PORT (IPv6 as [ADDR]:PORT), got {value!r}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if match.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    if port > 65535:
        raise ValueError(f"port must be 0-65535, got {port}")
    return host, port


def _show(value: Any) -> str:
    if value is None:
        return "nothing (the key is missing)"
    kind = {str: "string", bool: "boolean", int: "integer", float: "number",
            list: "array", dict: "table"}.get(type(value), type(value).__name__)
    return f"{kind} {value!r}" if not isinstance(value, (list, dict)) else kind


# Section -> key -> (default, checker).  The single source of truth for which
# keys exist; anything else in the file is an error that names it.
SECTIONS: dict[str, dict[str, tuple[Any, Callable[[Any], Any]]]] = {
    "listen": {
        "address": ("0.0.0.0:6095", _address),
    },
    "limits": {
        "nofile": (65536, _integer(1)),
        "max_connections": (0, _integer(0)),
        "max_header_bytes": (16384, _integer(1024, 1 << 20)),
        "max_body_bytes": (10 * 1024 * 1024, _integer(0)),
        "write_buffer_high": (256 * 1024, _integer(4096, 64 << 20)),
    },
    "timeouts": {
        "client_header": (10.0, _seconds),
        "connect": (2.0, _seconds),
        "first_byte": (60.0, _seconds),
        "idle": (60.0, _seconds),
    },
    "pool": {
        "max_idle": (32, _integer(0)),
        # Below uvicorn's 5 s keep-alive so we rarely pick a connection the
        # backend is about to close.
        "idle_timeout": (4.0, _seconds),
    },
    "log": {
        "access": (True, _boolean),
        "level": ("info", _choice("debug", "info", "warning", "error")),
    },
}

BACKEND_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def load(path: str) -> Config:
    """Read and validate the file at `path`."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("", f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError("", f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{path}: TOML syntax error: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise ConfigError("", f"{path}: nested too deeply to read") from None
    return parse(raw)


def parse(raw: dict[str, Any]) -> Config:
    """Validate an already-parsed TOML document."""
    unknown = sorted(set(raw) - set(SECTIONS) - {"backend"})
    if unknown:
        raise ConfigError(unknown[0], f"unknown section or key (known: "
                          f"{', '.join(sorted(SECTIONS) + ['backend'])})")
    values = {name: _section(name, raw.get(name, {})) for name in SECTIONS}
    host, port = values["listen"]["address"]
    return Config(
        listen=Listen(host=host, port=port),
        limits=Limits(**values["limits"]),
        timeouts=Timeouts(**values["timeouts"]),
        pool=Pool(**values["pool"]),
        log=Log(**values["log"]),
        backends=_backends(raw.get("backend")),
    )


def _section(name: str, table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(name, f"must be a table ([{name}]), got {_show(table)}")
    schema = SECTIONS[name]
    unknown = sorted(set(table) - set(schema))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}",
                          f"unknown key (known: {', '.join(schema)})")
    out = {}
    for key, (default, check) in schema.items():
        try:
            out[key] = check(table.get(key, default))
        except ValueError as exc:
            raise ConfigError(f"{name}.{key}", str(exc)) from None
    return out


def _backends(entries: Any) -> tuple[BackendConfig, ...]:
    if entries is None:
        raise ConfigError("backend", "no backends configured (add at least one [[backend]] table)")
    if not isinstance(entries, list):
        raise ConfigError("backend", "must be an array of tables ([[backend]])")
    if not entries:
        raise ConfigError("backend", "no backends configured (add at least one [[backend]] table)")
    seen: set[str] = set()
    out = []
    for i, entry in enumerate(entries):
        where = f"backend[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(where, "must be a table ([[backend]])")
        unknown = sorted(set(entry) - {"name", "url"})
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}", "unknown key (known: name, url)")
        name = entry.get("name")
        if not isinstance(name, str) or not BACKEND_NAME.fullmatch(name):
            raise ConfigError(f"{where}.name", "must be 1-64 letters, digits, '.', '_' or '-' "
                              f"(starting with a letter or digit), got {_show(name)}")
        if name in seen:
            raise ConfigError(f"{where}.name", f"duplicate backend name {name!r}")
        seen.add(name)
        host, port = _backend_url(f"{where}.url", entry.get("url"))
        out.append(BackendConfig(name=name, url=f"http://{_bracket(host)}:{port}",
                                 host=host, port=port))
    return tuple(out)


def _backend_url(key: str, url: Any) -> tuple[str, int]:
    if not isinstance(url, str):
        raise ConfigError(key, f"must be a string like \"http://127.0.0.1:6093\", got {_show(url)}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(key, f"cannot parse URL {url!r}: {exc}") from None
    if parts.scheme != "http":
        raise ConfigError(key, f"scheme must be http (got {parts.scheme or 'none'!r} in {url!r})")
    if not parts.hostname:
        raise ConfigError(key, f"no host in URL {url!r}")
    try:
        # Stored in its ASCII form: it goes into Host headers and log lines.
        host = parts.hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise ConfigError(key, f"invalid host name {parts.hostname!r} in {url!r}") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ConfigError(key, f"must be scheme://host:port only, got {url!r}")
    if port == 0:
        raise ConfigError(key, f"port 0 cannot be connected to, in {url!r}")
    return host, 80 if port is None else port


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
