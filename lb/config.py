"""Load and validate the balancer's TOML configuration.

The file is read once, checked completely, and turned into frozen dataclasses;
nothing else in the balancer looks at raw TOML.  Every problem is reported as
a `ConfigError` naming the key (``timeouts.connect``, ``backend[1].url``) and
the reason, so `python -m lb --check` can print one precise line and exit 2.
"""

from __future__ import annotations

import datetime
import ipaddress
import math
import os
import re
import tomllib
from dataclasses import dataclass
from typing import Any, Callable, Iterator
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
    workers: int = 1            # processes, each with its own SO_REUSEPORT socket
    drain_timeout: float = 30.0  # on SIGTERM, how long in-flight requests may finish


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
class Balancing:
    policy: str
    max_concurrency: int    # default per-backend limit of requests at once
    queue_limit: int        # requests that may wait for a free slot (0: none wait)
    queue_timeout: float    # longest wait in the queue -> 503 with Retry-After
    slow_start: float       # seconds to ramp a readmitted backend's limit (0: off)


@dataclass(frozen=True)
class Passive:
    consecutive_failures: int   # connect errors, resets, timeouts in a row (0: ignore)
    consecutive_5xx: int        # `statuses` answers in a row (0: ignore)
    statuses: tuple[int, ...]
    base_ejection: float
    max_ejection: float
    jitter: float               # ejection time is shortened by up to this fraction
    max_ejected_percent: int    # of the fleet; a fleet of one or two may still eject one


@dataclass(frozen=True)
class Active:
    interval: float
    timeout: float
    rise: int
    fall: int


@dataclass(frozen=True)
class Retry:
    attempts: int               # tries in all, the first included
    statuses: tuple[int, ...]
    budget_percent: int         # of active requests that may be retries ...
    budget_min: int             # ... but always at least this many
    backoff_base: float
    backoff_max: float
    replay_max_bytes: int       # request body kept for a retry; larger ones are not retried


@dataclass(frozen=True)
class Admin:
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


@dataclass(frozen=True)
class Cartesia:
    enabled: bool
    url: str                    # scheme://host[:port], no path
    api_key_env: str            # the environment variable holding the key (never the key)
    version: str                # Cartesia-Version header
    model_id: str
    language: str
    max_concurrency: int        # the plan's limit of simultaneous requests
    timeout: float              # seconds for a whole fallback call
    spillover: bool             # also serve calls that waited past queue_timeout
    ca_file: str                # CA bundle to verify the server with ("" = the system's)
    voices: dict[str, str]      # local voice name -> Cartesia voice id; "default" for the rest


@dataclass(frozen=True)
class Route:
    path: str                   # request path, exact
    kind: str                   # chatterbox | openai | chattts


@dataclass(frozen=True)
class BackendConfig:
    name: str
    url: str
    host: str
    port: int
    max_concurrency: int = 4
    weight: int = 1
    health_path: str = ""       # "" : no active probes


@dataclass(frozen=True)
class Config:
    listen: Listen
    limits: Limits
    timeouts: Timeouts
    pool: Pool
    log: Log
    balancer: Balancing
    passive: Passive
    active: Active
    retry: Retry
    admin: Admin
    cartesia: Cartesia
    backends: tuple[BackendConfig, ...]
    routes: tuple[Route, ...] = ()


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


def _seconds_or_zero(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number of seconds, got {_show(value)}")
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"must be 0 (off) or a positive, finite number of seconds, got {value}")
    return float(value)


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number from 0 to 1, got {_show(value)}")
    if not 0 <= value <= 1:
        raise ValueError(f"must be from 0 to 1, got {value}")
    return float(value)


def _statuses(lowest: int) -> Callable[[Any], tuple[int, ...]]:
    def check(value: Any) -> tuple[int, ...]:
        if not isinstance(value, list):
            raise ValueError(f"must be an array of HTTP status codes, got {_show(value)}")
        for code in value:
            if isinstance(code, bool) or not isinstance(code, int) or not lowest <= code <= 599:
                raise ValueError(f"must hold status codes from {lowest} to 599, got {_show(code)}")
        return tuple(sorted(set(value)))
    return check


def _networks(value: Any) -> tuple:
    if not isinstance(value, list):
        raise ValueError(f"must be an array of addresses or networks, got {_show(value)}")
    out = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"must hold strings like \"127.0.0.0/8\", got {_show(item)}")
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network") from None
    return tuple(out)


def _health_path(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a path like \"/health\", got {_show(value)}")
    if value and not re.fullmatch(r"/[\x21-\x22\x24-\x7e]*", value):
        raise ValueError(f"must start with '/' and be ASCII without spaces, control "
                         f"characters or '#', got {value!r}")
    return value


def _base_url(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a URL like \"https://api.cartesia.ai\", got {_show(value)}")
    if not value.isascii() or not value.isprintable() or " " in value:
        raise ValueError(f"must be a URL without spaces or control characters, got {value!r}")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"cannot parse URL {value!r}: {exc}") from None
    if port == 0:
        raise ValueError(f"port 0 cannot be connected to, in {value!r}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be http(s)://host[:port], got {value!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"must be scheme://host[:port] only, got {value!r}")
    return value.rstrip("/")


def _env_name(value: Any) -> str:
    # Capitals only: a pasted key (sk_car_...) is lower case and must not pass.
    if not isinstance(value, str) or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", value):
        # A string is not shown: it may be the key itself.
        got = "" if isinstance(value, str) else f", got {_show(value)}"
        raise ValueError(f"must be an environment variable name in capitals, like "
                         f"CARTESIA_API_KEY (the key itself never goes in this file){got}")
    return value


def _date(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
        try:
            datetime.date.fromisoformat(value)
            return value
        except ValueError:
            pass
    raise ValueError(f"must be a dated version like \"2026-03-01\", got {_show(value)}")


def _language(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z]{2}(-[A-Za-z]{2,4})?", value):
        raise ValueError(f"must be a language code like \"en\", got {_show(value)}")
    return value


def _file_path(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a file path (or \"\" for none), got {_show(value)}")
    return value


def _voices(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"must be a table of voice name = Cartesia voice id, got {_show(value)}")
    for name, voice in value.items():
        if not isinstance(voice, str) or not re.fullmatch(r"[A-Za-z0-9-]{1,64}", voice):
            raise ValueError(f"voice {name!r} must map to a Cartesia voice id (a UUID), "
                             f"got {_show(voice)}")
    return dict(value)


def worker_count(value: Any) -> int:
    """A number of worker processes, or "auto": one per CPU this process may use."""
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count() or 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise ValueError(f"must be \"auto\" or a number of processes from 1 to 256, "
                         f"got {_show(value)}")
    return value


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
        "workers": (1, worker_count),
        "drain_timeout": (30.0, _seconds),
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
    "balancer": {
        "policy": ("least_conn", _choice("least_conn", "p2c", "random", "round_robin")),
        "max_concurrency": (4, _integer(1, 100_000)),
        "queue_limit": (1024, _integer(0, 1_000_000)),
        "queue_timeout": (10.0, _seconds),
        "slow_start": (10.0, _seconds_or_zero),
    },
    "health.passive": {
        "consecutive_failures": (3, _integer(0)),
        "consecutive_5xx": (5, _integer(0)),
        "statuses": ([500, 502, 503, 504], _statuses(500)),
        "base_ejection": (10.0, _seconds),
        "max_ejection": (120.0, _seconds),
        "jitter": (0.1, _fraction),
        "max_ejected_percent": (50, _integer(0, 100)),
    },
    "health.active": {
        "interval": (2.0, _seconds),
        "timeout": (1.0, _seconds),
        "rise": (2, _integer(1, 100)),
        "fall": (3, _integer(1, 100)),
    },
    "retry": {
        "attempts": (2, _integer(1, 10)),
        "statuses": ([502, 503, 504], _statuses(500)),
        "budget_percent": (20, _integer(0, 100)),
        "budget_min": (3, _integer(0)),
        "backoff_base": (0.025, _seconds),
        "backoff_max": (0.25, _seconds),
        "replay_max_bytes": (1024 * 1024, _integer(0)),
    },
    "admin": {
        # Who may POST /lb/backends/<name>/drain|ready|maint.
        "allow": (["127.0.0.0/8", "::1"], _networks),
    },
    "fallback.cartesia": {
        "enabled": (False, _boolean),
        "url": ("https://api.cartesia.ai", _base_url),
        "api_key_env": ("CARTESIA_API_KEY", _env_name),
        "version": ("2026-03-01", _date),
        "model_id": ("sonic-3", _choice("sonic-3", "sonic-3.5", "sonic-latest")),
        "language": ("en", _language),
        "max_concurrency": (3, _integer(1, 10_000)),
        "timeout": (30.0, _seconds),
        "spillover": (False, _boolean),
        "ca_file": ("", _file_path),
        "voices": ({}, _voices),
    },
}

ROUTE_KINDS = ("chatterbox", "openai", "chattts")

# Sections written as [a.b] in TOML: a table of tables.
_PARENTS = sorted({name.split(".", 1)[0] for name in SECTIONS if "." in name})

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
    top = {name for name in SECTIONS if "." not in name} | set(_PARENTS) | {"backend", "route"}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ConfigError(unknown[0], f"unknown section or key (known: "
                          f"{', '.join(sorted(top))})")
    for parent in _PARENTS:
        table = raw.get(parent, {})
        if not isinstance(table, dict):
            raise ConfigError(parent, f"must be a table ([{parent}.*]), got {_show(table)}")
        children = {name.split(".", 1)[1] for name in SECTIONS if name.startswith(parent + ".")}
        extra = sorted(set(table) - children)
        if extra:
            raise ConfigError(f"{parent}.{extra[0]}",
                              f"unknown section (known: {', '.join(sorted(children))})")
    values = {name: _section(name, _table(raw, name)) for name in SECTIONS}
    host, port = values["listen"]["address"]
    passive, retry = values["health.passive"], values["retry"]
    if passive["max_ejection"] < passive["base_ejection"]:
        raise ConfigError("health.passive.max_ejection",
                          f"must be >= base_ejection ({passive['base_ejection']:g}), "
                          f"got {passive['max_ejection']:g}")
    if retry["backoff_max"] < retry["backoff_base"]:
        raise ConfigError("retry.backoff_max", f"must be >= backoff_base "
                          f"({retry['backoff_base']:g}), got {retry['backoff_max']:g}")
    balancing = Balancing(**values["balancer"])
    cartesia = values["fallback.cartesia"]
    if cartesia["enabled"] and "default" not in cartesia["voices"]:
        raise ConfigError("fallback.cartesia.voices.default",
                          "required when the fallback is enabled: the Cartesia voice for "
                          "every voice name not listed")
    return Config(
        listen=Listen(host=host, port=port, workers=values["listen"]["workers"],
                      drain_timeout=values["listen"]["drain_timeout"]),
        limits=Limits(**values["limits"]),
        timeouts=Timeouts(**values["timeouts"]),
        pool=Pool(**values["pool"]),
        log=Log(**values["log"]),
        balancer=balancing,
        passive=Passive(**passive),
        active=Active(**values["health.active"]),
        retry=Retry(**retry),
        admin=Admin(**values["admin"]),
        cartesia=Cartesia(**cartesia),
        backends=_backends(raw.get("backend"), balancing.max_concurrency),
        routes=_routes(raw.get("route", [])),
    )


def _table(raw: dict[str, Any], name: str) -> Any:
    parent, _, child = name.partition(".")
    return raw.get(parent, {}).get(child, {}) if child else raw.get(name, {})


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


# Per-backend keys beyond name and url: key -> checker (defaults come from
# [balancer] or the dataclass).
BACKEND_KEYS: dict[str, Callable[[Any], Any]] = {
    "max_concurrency": _integer(1, 100_000),
    "weight": _integer(1, 1000),
    "health_path": _health_path,
}


def _array_of_tables(entries: Any, section: str,
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


def _backends(entries: Any, max_concurrency: int) -> tuple[BackendConfig, ...]:
    if entries is None:
        raise ConfigError("backend", "no backends configured (add at least one [[backend]] table)")
    if isinstance(entries, list) and not entries:
        raise ConfigError("backend", "no backends configured (add at least one [[backend]] table)")
    seen: set[str] = set()
    out = []
    for where, entry in _array_of_tables(entries, "backend", ("name", "url", *BACKEND_KEYS)):
        extra = {"max_concurrency": max_concurrency}
        for key, check in BACKEND_KEYS.items():
            if key in entry:
                try:
                    extra[key] = check(entry[key])
                except ValueError as exc:
                    raise ConfigError(f"{where}.{key}", str(exc)) from None
        name = entry.get("name")
        if not isinstance(name, str) or not BACKEND_NAME.fullmatch(name):
            raise ConfigError(f"{where}.name", "must be 1-64 letters, digits, '.', '_' or '-' "
                              f"(starting with a letter or digit), got {_show(name)}")
        if name in seen:
            raise ConfigError(f"{where}.name", f"duplicate backend name {name!r}")
        seen.add(name)
        host, port = _backend_url(f"{where}.url", entry.get("url"))
        out.append(BackendConfig(name=name, url=f"http://{_bracket(host)}:{port}",
                                 host=host, port=port, **extra))
    return tuple(out)


def _routes(entries: Any) -> tuple[Route, ...]:
    """[[route]] path = "/synthesize-json", kind = "chatterbox": which calls are TTS
    calls of which kind (those are the ones that can fall back to Cartesia)."""
    seen: set[str] = set()
    out = []
    for where, entry in _array_of_tables(entries, "route", ("path", "kind")):
        path = entry.get("path")
        if not isinstance(path, str) or not re.fullmatch(r"/[\x21-\x22\x24-\x3e\x40-\x7e]*",
                                                         path):
            raise ConfigError(f"{where}.path", f"must be a path starting with '/', without "
                              f"spaces, '?' or '#', got {_show(path)}")
        if path in seen:
            raise ConfigError(f"{where}.path", f"duplicate route {path!r}")
        seen.add(path)
        kind = entry.get("kind")
        if kind not in ROUTE_KINDS:
            raise ConfigError(f"{where}.kind", f"must be one of {', '.join(ROUTE_KINDS)}, "
                              f"got {_show(kind)}")
        out.append(Route(path=path, kind=kind))
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
