"""Validate the balancer's TOML configuration.

A parsed document is checked completely and turned into frozen dataclasses;
nothing else in the balancer looks at raw TOML.  Every problem is reported as
a `ConfigError` naming the key (``timeouts.connect``, ``backend "gpu1".url``)
and the reason, so `tts-lb --check` can print one precise line and exit 2.
Mistakes that still make a working balancer (the same server twice, a URL
without a port) are `Config.warnings`, printed by `--check` and logged at
start.  Finding and reading the file is `lb.config_file`'s.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any, Callable, Mapping

# The types are named here too: this is where the rest of the balancer looks.
from ..config_model import (Active, Admin, BackendConfig, Balancing, Cartesia,  # noqa: F401
                           Config, ConfigError, Limits, Listen, Log, Passive, Pool, Retry,
                           Route, Timeouts)
from ..wire import engines
from .config_tables import checked_keys, NAME, array_of_tables, entry_name
from .config_cluster import parse_cluster
from .config_speech import BACKEND_SPEECH_KEYS, SPEECH_KEYS, speech
from .config_tcp import parse_tcp
from .config_values import (POLICY_NAMES, address, backend_url, base_url, boolean, bracket,
                            choice, date, env_name, file_path, fraction, health_path, integer,
                            language, networks, seconds, seconds_or_zero, show, statuses,
                            voices, worker_count)

SECTIONS: dict[str, dict[str, tuple[Any, Callable[[Any], Any]]]] = {
    "listen": {
        "address": ("0.0.0.0:6095", address),
        "workers": (1, worker_count),
        "drain_timeout": (30.0, seconds),
        "http": ("auto", choice("auto", "httptools", "h11")),
    },
    "limits": {
        "nofile": (65536, integer(1)),
        "max_connections": (0, integer(0)),
        "max_header_bytes": (16384, integer(1024, 1 << 20)),
        "max_body_bytes": (10 * 1024 * 1024, integer(0)),
        "write_buffer_high": (256 * 1024, integer(4096, 64 << 20)),
        "max_response_header_bytes": (64 * 1024, integer(1024, 1 << 24)),
    },
    "timeouts": {
        "client_header": (10.0, seconds),
        "connect": (2.0, seconds),
        "first_byte": (60.0, seconds),
        "idle": (60.0, seconds),
        "client_body": (30.0, seconds),
        "tunnel_idle": (300.0, seconds),
    },
    "pool": {
        "max_idle": (32, integer(0)),
        # Below uvicorn's 5 s keep-alive so we rarely pick a connection the
        # backend is about to close.
        "idle_timeout": (4.0, seconds),
    },
    "log": {
        "access": (True, boolean),
        "level": ("info", choice("debug", "info", "warning", "error")),
    },
    "balancer": {
        "policy": ("least_conn", choice(*POLICY_NAMES)),
        "max_concurrency": (4, integer(1, 100_000)),
        "queue_limit": (1024, integer(0, 1_000_000)),
        "queue_timeout": (10.0, seconds),
        "slow_start": (10.0, seconds_or_zero),
    },
    "health.passive": {
        "consecutive_failures": (3, integer(0)),
        "consecutive_5xx": (5, integer(0)),
        "statuses": ([500, 502, 503, 504], statuses(500)),
        "base_ejection": (10.0, seconds),
        "max_ejection": (120.0, seconds),
        "jitter": (0.1, fraction),
        "max_ejected_percent": (50, integer(0, 100)),
    },
    "health.active": {
        "interval": (2.0, seconds),
        "timeout": (1.0, seconds),
        "rise": (2, integer(1, 100)),
        "fall": (3, integer(1, 100)),
        # The probe path of backends that set no health_path of their own
        # (those from --backend / TTS_LB_BACKENDS among them); "" = no probes.
        "path": ("", health_path),
    },
    "retry": {
        "attempts": (2, integer(1, 10)),
        "statuses": ([502, 503, 504], statuses(500)),
        "budget_percent": (20, integer(0, 100)),
        "budget_min": (3, integer(0)),
        "backoff_base": (0.025, seconds),
        "backoff_max": (0.25, seconds),
        "replay_max_bytes": (1024 * 1024, integer(0)),
    },
    "admin": {
        # Who may POST /lb/backends/<name>/drain|ready|maint.
        "allow": (["127.0.0.0/8", "::1"], networks),
    },
    "fallback.cartesia": {
        "enabled": (False, boolean),
        "url": ("https://api.cartesia.ai", base_url),
        "api_key_env": ("CARTESIA_API_KEY", env_name),
        "version": ("2026-03-01", date),
        "model_id": ("sonic-3", choice("sonic-3", "sonic-3.5", "sonic-latest")),
        "language": ("en", language),
        "max_concurrency": (3, integer(1, 10_000)),
        "timeout": (30.0, seconds),
        "spillover": (False, boolean),
        "ca_file": ("", file_path),
        "voices": ({}, voices),
    },
}

ROUTE_KINDS = ("chatterbox", "openai", "chattts")


def _engine(choice: str) -> str:
    """`[listen] http`, checked: an engine named must be installed ("auto"
    is settled when the balancer starts: `engines.resolve`)."""
    try:
        engines.resolve(choice)
    except ValueError as exc:
        raise ConfigError("listen.http", str(exc)) from None
    return choice

# Sections written as [a.b] in TOML: a table of tables.
_PARENTS = sorted({name.split(".", 1)[0] for name in SECTIONS if "." in name})

BACKEND_NAME = NAME    # (what --backend names are checked against too)


def parse(raw: dict[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """Validate an already-parsed TOML document (`environ`: for TTS_LB_REDIS_URL)."""
    top = {name for name in SECTIONS if "." not in name} | set(_PARENTS) | {"backend", "route",
                                                                          "tcp", "cluster"}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ConfigError(unknown[0], f"unknown section or key (known: "
                          f"{', '.join(sorted(top))})")
    for parent in _PARENTS:
        table = raw.get(parent, {})
        if not isinstance(table, dict):
            raise ConfigError(parent, f"must be a table ([{parent}.*]), got {show(table)}")
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
    active = Active(**values["health.active"])
    backends, warnings = _backends(raw.get("backend"), balancing.max_concurrency, active.path)
    _not_ourselves(backends, host, port)
    return Config(
        listen=Listen(host=host, port=port, workers=values["listen"]["workers"],
                      drain_timeout=values["listen"]["drain_timeout"],
                      http=_engine(values["listen"]["http"])),
        limits=Limits(**values["limits"]),
        timeouts=Timeouts(**values["timeouts"]),
        pool=Pool(**values["pool"]),
        log=Log(**values["log"]),
        balancer=balancing,
        passive=Passive(**passive),
        active=active,
        retry=Retry(**retry),
        admin=Admin(**values["admin"]),
        cartesia=Cartesia(**cartesia),
        backends=backends,
        routes=_routes(raw.get("route", [])),
        tcp=parse_tcp(raw.get("tcp"), (host, port)),
        cluster=parse_cluster(raw.get("cluster"), environ),
        warnings=tuple(warnings),
    )


def _table(raw: dict[str, Any], name: str) -> Any:
    parent, _, child = name.partition(".")
    return raw.get(parent, {}).get(child, {}) if child else raw.get(name, {})


def _section(name: str, table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(name, f"must be a table ([{name}]), got {show(table)}")
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
    "max_concurrency": integer(1, 100_000),
    "weight": integer(1, 1000),
    "health_path": health_path,
    **BACKEND_SPEECH_KEYS,
}


def _backends(entries: Any, max_concurrency: int,
              default_health_path: str) -> tuple[tuple[BackendConfig, ...], list[str]]:
    if entries is None or (isinstance(entries, list) and not entries):
        raise ConfigError("backend", "no backends configured (add at least one [[backend]] "
                          "table, or give --backend URL / TTS_LB_BACKENDS)")
    seen: set[str] = set()
    urls: dict[str, str] = {}           # url -> the first backend at it
    out, warnings = [], []
    for where, entry in array_of_tables(entries, "backend", ("name", "url", *BACKEND_KEYS)):
        name = entry_name(entry, where, seen, "backend")
        where = backend_key(name)     # from here on, messages name it by name
        extra = {"max_concurrency": max_concurrency, "health_path": default_health_path,
                 **checked_keys(entry, BACKEND_KEYS, where)}
        try:
            host, port = backend_url(entry.get("url"))
        except ValueError as exc:
            raise ConfigError(f"{where}.url", str(exc)) from None
        if port is None:
            port = 80
            warnings.append(f"{where}.url: {entry['url']!r} has no port: port 80 is used "
                            "(TTS servers seldom listen there)")
        url = f"http://{bracket(host)}:{port}"
        if url in urls:
            # Two names for one server: the balancer would allow it twice the
            # calls its GPU can take.
            warnings.append(f"{where}.url: {url} is also backend {urls[url]!r}: that server "
                            "gets the limits of both")
        urls.setdefault(url, name)
        out.append(BackendConfig(name=name, url=url, host=host, port=port, **extra))
    return tuple(out), warnings


def warnings_for(config: Config, environ: Mapping[str, str]) -> list[str]:
    """The file's warnings, and what the file cannot know: is the fallback's
    key in this environment?"""
    cartesia = config.cartesia
    if cartesia.enabled and not environ.get(cartesia.api_key_env, "").strip():
        return [*config.warnings,
                f"fallback.cartesia.api_key_env: the fallback is enabled but "
                f"{cartesia.api_key_env} is not set in this environment: calls the fleet "
                "cannot serve will get 503 instead of a voice"]
    return list(config.warnings)


def backend_key(name: str) -> str:
    """How messages name a backend: by its name, not its place in the file."""
    return f'backend "{name}"'


LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def _this_machine(host: str, names: set[str]) -> bool:
    """Is `host` (lower case) a loopback or unspecified address (an IPv4 one
    written as IPv6 included), or one of `names`?"""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host in names
    mapped = ip.ipv4_mapped if ip.version == 6 else None
    return ip.is_loopback or ip.is_unspecified or (mapped is not None and mapped.is_loopback)


def _not_ourselves(backends: tuple[BackendConfig, ...], host: str, port: int) -> None:
    """A backend at the balancer's own listen address would send every call
    back into the balancer, round and round, until the queue filled."""
    if port == 0:
        return   # a port chosen at start cannot be anyone's backend yet
    listen = host.lower()
    # Listening on every address (0.0.0.0, ::) or on loopback: a backend on
    # this machine at the same port is us.  This machine's host name counts
    # only for the backend: listening on the address it names is not loopback.
    listen_local = not listen or _this_machine(listen, LOCAL_NAMES)
    here = LOCAL_NAMES | {socket.gethostname().lower()}
    for backend in backends:
        target = backend.host.lower()
        if backend.port == port and (target == listen or (
                listen_local and _this_machine(target, here))):
            raise ConfigError(f"{backend_key(backend.name)}.url",
                              f"{backend.url} is the balancer's own listen address "
                              f"(listen.address {bracket(host)}:{port}): every call would "
                              "come back to it")


def _routes(entries: Any) -> tuple[Route, ...]:
    """[[route]] path = "/synthesize-json", kind = "chatterbox": which calls are TTS
    calls of which kind (those are the ones that can fall back to Cartesia);
    `slot = false`: requests and tunnels on the path hold no backend slot."""
    seen: set[str] = set()
    out = []
    for where, entry in array_of_tables(entries, "route", ("path", "kind", "slot",
                                                           *SPEECH_KEYS)):
        path = entry.get("path")
        if not isinstance(path, str) or not re.fullmatch(r"/[\x21-\x22\x24-\x3e\x40-\x7e]*",
                                                         path):
            raise ConfigError(f"{where}.path", f"must be a path starting with '/', without "
                              f"spaces, '?' or '#', got {show(path)}")
        if path in seen:
            raise ConfigError(f"{where}.path", f"duplicate route {path!r}")
        seen.add(path)
        # kind may be left out only by a route that exists for its slot.
        kind = entry.get("kind", "")
        if kind not in ROUTE_KINDS and ("kind" in entry or "slot" not in entry):
            raise ConfigError(f"{where}.kind", f"must be one of {', '.join(ROUTE_KINDS)}, "
                              f"got {show(entry.get('kind'))}")
        try:
            slot = boolean(entry.get("slot", True))
        except ValueError as exc:
            raise ConfigError(f"{where}.slot", str(exc)) from None
        extra = sorted(set(entry) & set(SPEECH_KEYS))
        if extra and kind != "openai":
            raise ConfigError(f"{where}.{extra[0]}", 'only a kind = "openai" route has a '
                              "front door (voices, split, models...)")
        out.append(Route(path=path, kind=kind, slot=slot,
                         speech=speech(entry, where) if kind == "openai" else None))
    return tuple(out)
