"""Finding the configuration file and reading it without harm.

Where: the first of `-c PATH`, `$TTS_LB_CONFIG`, `./conf/lb.toml`,
`/etc/tts-lb/lb.toml`, and the documented default that ships inside the
package (`lb/lb.toml`, what `tts-lb --print-config` prints).  A path named
by `-c` or the environment must be there: falling through to another file
would run a configuration nobody asked for.

How: the file is read at start and again on every SIGHUP, while traffic
flows, so reading must not be able to hurt.  Only a regular file is read
(checked before opening, and again on the open descriptor: opened
non-blocking, a FIFO swapped in meanwhile cannot block), at most
MAX_FILE_BYTES of it, and no array or table in it may hold more than
MAX_ITEMS entries.  Every failure, whatever it is, is a ConfigError naming
the file -- never a traceback, never a half-applied file.  (The reload runs
this off the event loop; see lb.__main__.)
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .backend_list import ENV_BACKENDS, from_entries, from_environment
from .config import Config, ConfigError, parse

ENV_CONFIG = "TTS_LB_CONFIG"
LOCAL_PATH = "conf/lb.toml"
SYSTEM_PATH = "/etc/tts-lb/lb.toml"
PACKAGED_PATH = str(Path(__file__).parent.parent / "lb.toml")
MAX_FILE_BYTES = 1 << 20     # 1 MiB: the documented default is 8 KiB
MAX_ITEMS = 1024             # entries in any one array or table


@dataclass(frozen=True)
class Source:
    """Which file, and why that one (for the start-up log)."""
    path: str
    why: str


def find(cli_path: str | None, environ: Mapping[str, str]) -> Source:
    if cli_path is not None:
        if not cli_path.strip():
            raise ConfigError("-c", "names no file")
        return Source(cli_path, "-c")
    if ENV_CONFIG in environ:
        named = environ[ENV_CONFIG]
        if not named.strip():
            raise ConfigError(ENV_CONFIG, "is set but empty: name a configuration file, "
                              "or unset it")
        return Source(named, f"${ENV_CONFIG}")
    for path, why in ((LOCAL_PATH, f"./{LOCAL_PATH}"), (SYSTEM_PATH, SYSTEM_PATH)):
        if os.path.exists(path):
            return Source(path, why)
    return Source(PACKAGED_PATH, "the packaged default")


class Loader:
    """Loads the chosen file, each time the same way: with the backends
    from `--backend` or TTS_LB_BACKENDS (which replace the file's list)."""

    def __init__(self, source: Source, cli_backends: list[str], environ: Mapping[str, str],
                 http: str | None = None):
        self.source = source
        self.http = http        # --http: replaces [listen] http, on every reload too
        self.environ = environ  # TTS_LB_REDIS_URL, read on every load
        # Checked once, at start: a bad entry stops the start with its name.
        if cli_backends:
            self.backends, self.backends_from = from_entries(cli_backends), "--backend"
        else:
            self.backends = from_environment(environ)
            self.backends_from = ENV_BACKENDS if self.backends is not None else ""

    def load(self) -> Config:
        try:
            raw = read(self.source.path)
        except ConfigError as exc:
            if self.source.why.startswith("$") and not exc.key:
                # Say where the path came from: the variable may be long forgotten.
                raise ConfigError("", f"{exc.reason} (named by {self.source.why})") from None
            raise
        if self.backends is not None:
            raw["backend"] = [dict(table) for table in self.backends]
        if self.http is not None and isinstance(raw.setdefault("listen", {}), dict):
            raw["listen"]["http"] = self.http
        return parse(raw, self.environ)


def load(path: str) -> Config:
    """Read and validate the file at `path`."""
    return parse(read(path))


def read(path: str) -> dict[str, Any]:
    """The TOML document at `path`, or ConfigError."""
    try:
        raw = tomllib.loads(_read_text(path))
    except ConfigError:
        raise
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{path}: TOML syntax error: {exc}") from None
    except RecursionError:
        raise ConfigError("", f"{path}: nested too deeply to read") from None
    except MemoryError:
        raise ConfigError("", f"{path}: too large to read") from None
    except Exception as exc:   # whatever else: refuse the file, say so in one line
        raise ConfigError("", f"{path}: cannot read ({type(exc).__name__})") from None
    try:
        _check_sizes(raw, "")
    except ConfigError as exc:
        raise ConfigError(exc.key, f"{exc.reason} (in {path})") from None
    return raw


def _read_text(path: str) -> str:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ConfigError("", f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError("", f"{path}: cannot read: {exc.strerror}") from None
    _regular(path, info)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise ConfigError("", f"{path}: cannot read: {exc.strerror}") from None
    try:
        _regular(path, os.fstat(fd))
        chunks, size = [], 0
        while size <= MAX_FILE_BYTES:
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ConfigError("", f"{path}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if size > MAX_FILE_BYTES:
        raise ConfigError("", f"{path}: larger than {MAX_FILE_BYTES // 1024} KiB, the most a "
                          "configuration file may be")
    data = b"".join(chunks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _regular(path: str, info: os.stat_result) -> None:
    if stat.S_ISREG(info.st_mode):
        if info.st_size > MAX_FILE_BYTES:
            raise ConfigError("", f"{path}: {info.st_size} bytes, larger than "
                              f"{MAX_FILE_BYTES // 1024} KiB, the most a configuration "
                              "file may be")
        return
    kind = ("a directory" if stat.S_ISDIR(info.st_mode) else
            "a FIFO" if stat.S_ISFIFO(info.st_mode) else
            "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else
            "a socket" if stat.S_ISSOCK(info.st_mode) else "not a file")
    raise ConfigError("", f"{path}: {kind}, not a regular file: only a regular file is read")


def _check_sizes(value: Any, where: str) -> None:
    """No array or table over MAX_ITEMS entries, at any depth."""
    if isinstance(value, (list, dict)):
        if len(value) > MAX_ITEMS:
            raise ConfigError(where or "(top level)", f"has {len(value)} entries; at most "
                              f"{MAX_ITEMS} are allowed in any array or table")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(item, (list, dict)):
                _check_sizes(item, f"{where}.{key}" if isinstance(key, str) and where else
                             key if isinstance(key, str) else f"{where}[{key}]")


def packaged_default() -> str:
    """The documented default configuration, as shipped (for --print-config)."""
    with open(PACKAGED_PATH, encoding="utf-8") as f:
        return f.read()
