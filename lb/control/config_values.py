"""Value checkers for the configuration: each takes a raw TOML value and
returns the clean one, or raises ValueError with a reason phrased for the
user (`lb.config` adds the key).  Shared with the command line, which checks
`--backend` entries and `--workers` with the same words."""

from __future__ import annotations

import datetime
import ipaddress
import math
import os
import re
from typing import Any, Callable
from urllib.parse import urlsplit

def integer(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {show(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and <= {maximum}" if maximum is not None else ""
            raise ValueError(f"must be >= {minimum}{upper}, got {value}")
        return value
    return check


def seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number of seconds, got {show(value)}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"must be a positive, finite number of seconds, got {value}")
    return float(value)


def seconds_or_zero(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number of seconds, got {show(value)}")
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"must be 0 (off) or a positive, finite number of seconds, got {value}")
    return float(value)


def fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number from 0 to 1, got {show(value)}")
    if not 0 <= value <= 1:
        raise ValueError(f"must be from 0 to 1, got {value}")
    return float(value)


def statuses(lowest: int) -> Callable[[Any], tuple[int, ...]]:
    def check(value: Any) -> tuple[int, ...]:
        if not isinstance(value, list):
            raise ValueError(f"must be an array of HTTP status codes, got {show(value)}")
        for code in value:
            if isinstance(code, bool) or not isinstance(code, int) or not lowest <= code <= 599:
                raise ValueError(f"must hold status codes from {lowest} to 599, got {show(code)}")
        return tuple(sorted(set(value)))
    return check


def networks(value: Any) -> tuple:
    if not isinstance(value, list):
        raise ValueError(f"must be an array of addresses or networks, got {show(value)}")
    out = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"must hold strings like \"127.0.0.0/8\", got {show(item)}")
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network") from None
    return tuple(out)


def health_path(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a path like \"/health\", got {show(value)}")
    if value and not re.fullmatch(r"/[\x21-\x22\x24-\x7e]*", value):
        raise ValueError(f"must start with '/' and be ASCII without spaces, control "
                         f"characters or '#', got {value!r}")
    return value


def base_url(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a URL like \"https://api.cartesia.ai\", got {show(value)}")
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


def env_name(value: Any) -> str:
    # Capitals only: a pasted key (sk_car_...) is lower case and must not pass.
    if not isinstance(value, str) or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", value):
        # A string is not shown: it may be the key itself.
        got = "" if isinstance(value, str) else f", got {show(value)}"
        raise ValueError(f"must be an environment variable name in capitals, like "
                         f"CARTESIA_API_KEY (the key itself never goes in this file){got}")
    return value


def date(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
        try:
            datetime.date.fromisoformat(value)
            return value
        except ValueError:
            pass
    raise ValueError(f"must be a dated version like \"2026-03-01\", got {show(value)}")


def language(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z]{2}(-[A-Za-z]{2,4})?", value):
        raise ValueError(f"must be a language code like \"en\", got {show(value)}")
    return value


def file_path(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a file path (or \"\" for none), got {show(value)}")
    return value


def voices(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"must be a table of voice name = Cartesia voice id, got {show(value)}")
    for name, voice in value.items():
        if not isinstance(voice, str) or not re.fullmatch(r"[A-Za-z0-9-]{1,64}", voice):
            raise ValueError(f"voice {clip(name)} must map to a Cartesia voice id (a UUID), "
                             f"got {show(voice)}")
    return dict(value)


def worker_count(value: Any) -> int:
    """A number of worker processes, or "auto": one per CPU this process may use."""
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count() or 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise ValueError(f"must be \"auto\" or a number of processes from 1 to 256, "
                         f"got {show(value)}")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {show(value)}")
    return value


# balancer.policy and [[tcp]] policy (lb.scheduling.policy.POLICIES; named
# here so that checking a file needs no part of the running balancer).
POLICY_NAMES = ("least_conn", "p2c", "random", "round_robin")


def choice(*allowed: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {show(value)}")
        return value
    return check


def address(value: Any) -> tuple[str, int]:
    """'0.0.0.0:6095' or '[::1]:6095' -> (host, port)."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string like \"0.0.0.0:6095\", got {show(value)}")
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


def show(value: Any) -> str:
    if value is None:
        return "nothing (the key is missing)"
    kind = {str: "string", bool: "boolean", int: "integer", float: "number",
            list: "array", dict: "table"}.get(type(value), type(value).__name__)
    return f"{kind} {clip(value)}" if not isinstance(value, (list, dict)) else kind


SHOWN_CHARS = 80   # a value quoted in a message: enough to recognise it, one line


def clip(value: Any) -> str:
    """repr(value), cut to SHOWN_CHARS so one bad value cannot make a huge line."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


# Section -> key -> (default, checker).  The single source of truth for which
# keys exist; anything else in the file is an error that names it.

def without_password(url: str) -> str:
    """`url` as a message may quote it: any user:password@ shown as ***@."""
    return re.sub(r"//[^/@]*@", "//***@", url)


def backend_url(url: Any) -> tuple[str, int | None]:
    """'http://host:port' -> (host in its ASCII form, port or None when the URL has none)."""
    if not isinstance(url, str):
        raise ValueError(f"must be a string like \"http://127.0.0.1:6093\", got {show(url)}")
    shown = without_password(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"cannot parse URL {shown!r}: {exc}") from None
    if parts.scheme != "http":
        raise ValueError(f"scheme must be http (got {parts.scheme or 'none'!r} in {shown!r})")
    if not parts.hostname:
        raise ValueError(f"no host in URL {shown!r}")
    try:
        # Stored in its ASCII form: it goes into Host headers and log lines.
        host = parts.hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"invalid host name {parts.hostname!r} in {shown!r}") from None
    if "@" in parts.netloc:
        raise ValueError(f"must not hold a user or password (http://host:port only), "
                         f"got {shown!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"must be scheme://host:port only, got {shown!r}")
    if port == 0:
        raise ValueError(f"port 0 cannot be connected to, in {shown!r}")
    return host, port


def bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host

