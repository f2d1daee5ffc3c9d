"""The `[cluster]` section: backend slots shared through Redis.

`redis_url` unset (and no TTS_LB_REDIS_URL) is one process alone, exactly
as without the section.  When it is set, `replicas` must be too: it is the
static share a process falls back to when Redis does not answer.  Neither
the password nor a query string is ever quoted in a message.
"""

from __future__ import annotations

import re
from typing import Any, Mapping
from urllib.parse import urlsplit

from ..config_model import Cluster, ConfigError
from ..tts import redact
from .config_tables import checked_keys
from .config_values import integer, show

ENV_REDIS_URL = "TTS_LB_REDIS_URL"

SCHEMES = ("redis", "rediss", "unix")
DEFAULT_FLEET = "tts-lb"
DEFAULT_LEASE = 10.0
DEFAULT_TIMEOUT = 0.05
_FLEET = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z")


def redis_url(value: Any) -> tuple[str, str]:
    """-> (the URL, the URL as messages show it)."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string like \"redis://127.0.0.1:6379/0\", got {show(value)}")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError("cannot parse it as a URL (want redis://[:password@]host:port/db, "
                         "rediss://... or unix:///path/to/redis.sock)") from None
    if parts.scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, "
                         f"got {parts.scheme or 'none'!r}")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("unix:// needs the socket's path, like unix:///run/redis.sock")
        shown = f"unix://{parts.path}"
    else:
        if not parts.hostname:
            raise ValueError(f"no host in the URL ({parts.scheme}://host:port/db)")
        if port == 0:
            raise ValueError("port 0 cannot be connected to")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"the path must be a database number like /0, got {db[:20]!r}")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        shown = f"{parts.scheme}://{host}:{port or 6379}/{db or 0}"
    if parts.password:
        redact.register(parts.password)   # in case a library's message quotes it
    return value, shown


def seconds_between(lo: float, hi: float):
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number of seconds, got {show(value)}")
        if not lo <= value <= hi:
            raise ValueError(f"must be from {lo:g} to {hi:g} seconds, got {value}")
        return float(value)
    return check


def fleet_name(value: Any) -> str:
    if not isinstance(value, str) or not _FLEET.match(value):
        raise ValueError(f"must be a name of letters, digits, '_', '.', ':' or '-' "
                         f"(at most 64), got {show(value)}")
    return value


KEYS = {
    "redis_url": lambda value: value if value == "" else redis_url(value),
    "fleet": fleet_name,
    "lease": seconds_between(1.0, 3600.0),
    "timeout": seconds_between(0.001, 5.0),
    "replicas": integer(1, 1000),
}


def parse_cluster(table: Any, environ: Mapping[str, str] | None = None) -> Cluster | None:
    """[cluster] (with TTS_LB_REDIS_URL, which replaces its redis_url) ->
    Cluster, or None when no Redis is named."""
    if table is None:
        table = {}
    if not isinstance(table, dict):
        raise ConfigError("cluster", f"must be a table ([cluster]), got {show(table)}")
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise ConfigError(f"cluster.{unknown[0]}", f"unknown key (known: {', '.join(KEYS)})")
    values = checked_keys(table, KEYS, "cluster")
    url = values.get("redis_url", "")
    from_env = (environ or {}).get(ENV_REDIS_URL, "").strip()
    if from_env:   # the environment's Redis replaces the file's
        try:
            url = redis_url(from_env)
        except ValueError as exc:
            raise ConfigError(ENV_REDIS_URL, str(exc)) from None
    if not url:
        return None
    if "replicas" not in values:
        raise ConfigError("cluster.replicas",
                          "required when a Redis is set: how many balancer replicas run "
                          "(each takes floor(limit / replicas) of a backend while Redis "
                          "cannot be reached)")
    timeout = values.get("timeout", DEFAULT_TIMEOUT)
    lease = values.get("lease", DEFAULT_LEASE)
    if timeout * 10 > lease:
        raise ConfigError("cluster.timeout", f"must be at most a tenth of cluster.lease "
                          f"({lease:g}s), got {timeout:g}")
    full, shown = url
    return Cluster(redis_url=full, shown_url=shown, fleet=values.get("fleet", DEFAULT_FLEET),
                   lease=lease, timeout=timeout, replicas=values["replicas"])
