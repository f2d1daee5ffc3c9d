"""Validate the `[[tcp]]` tables: plain TCP listeners, each with its own backends.

    [[tcp]]
    name = "grpc"                  address = "0.0.0.0:7000"
    policy, queue_limit, queue_timeout, check, health_path, health_port
      [[tcp.backend]]
      name = "gpu1"                address = "10.0.0.5:7001"
      weight, max_connections

Problems are ConfigErrors naming the key: `tcp[0].name`, then (once a
listener has a good name) `tcp "grpc".address`, `tcp "grpc".backend "gpu1".weight`.
"""

from __future__ import annotations

from typing import Any, Callable

from ..config_model import ConfigError, TcpBackendConfig, TcpListener
from .config_tables import array_of_tables, checked_keys, entry_name
from .config_values import POLICY_NAMES, address, choice, health_path, integer, seconds

CHECKS = ("none", "connect", "http")

LISTENER_KEYS: dict[str, Callable[[Any], Any]] = {
    "policy": choice(*POLICY_NAMES),
    "queue_limit": integer(0, 1_000_000),
    "queue_timeout": seconds,
    "check": choice(*CHECKS),
    "health_path": health_path,
    "health_port": integer(0, 65535),
}
BACKEND_KEYS: dict[str, Callable[[Any], Any]] = {
    "weight": integer(1, 1000),
    "max_connections": integer(0, 1_000_000),
}


def _address(entry: dict, where: str) -> tuple[str, int]:
    if "address" not in entry:
        raise ConfigError(f"{where}.address", "required: HOST:PORT")
    try:
        return address(entry["address"])
    except ValueError as exc:
        raise ConfigError(f"{where}.address", str(exc)) from None


def parse_tcp(entries: Any, http_listen: tuple[str, int]) -> tuple[TcpListener, ...]:
    if entries is None:
        return ()
    names: set[str] = set()
    ports: dict[int, str] = {}
    if http_listen[1]:
        ports[http_listen[1]] = "listen.address"
    out = []
    for where, entry in array_of_tables(entries, "tcp", ("name", "address", "backend",
                                                 *LISTENER_KEYS)):
        name = entry_name(entry, where, names, "tcp listener")
        where = f'tcp "{name}"'
        host, port = _address(entry, where)
        if port and port in ports:
            raise ConfigError(f"{where}.address", f"port {port} is also {ports[port]}")
        if port:
            ports[port] = f"{where}.address"
        extra = checked_keys(entry, LISTENER_KEYS, where)
        if extra.get("check") == "http" and not extra.get("health_path"):
            extra["health_path"] = "/health"
        if extra.get("health_path") and "check" not in extra:
            extra["check"] = "http"
        if extra.get("check", "none") != "http" and extra.get("health_path"):
            raise ConfigError(f"{where}.health_path", f"is for check = \"http\" (check is "
                              f"{extra['check']!r})")
        backends = _backends(entry.get("backend"), where)
        out.append(TcpListener(name=name, host=host, port=port, backends=backends, **extra))
    return tuple(out)


def _backends(entries: Any, listener: str) -> tuple[TcpBackendConfig, ...]:
    where = f"{listener}.backend"
    if entries is None or (isinstance(entries, list) and not entries):
        raise ConfigError(where, "no backends (add at least one [[tcp.backend]] table)")
    seen: set[str] = set()
    out = []
    for here, entry in array_of_tables(entries, where, ("name", "address", *BACKEND_KEYS)):
        name = entry_name(entry, here, seen, "backend")
        here = f'{where} "{name}"'
        host, port = _address(entry, here)
        if port == 0:
            raise ConfigError(f"{here}.address", "port must be 1-65535, got 0")
        out.append(TcpBackendConfig(name=name, host=host, port=port,
                                    **checked_keys(entry, BACKEND_KEYS, here)))
    return tuple(out)
