"""The configuration as the balancer sees it: frozen dataclasses, one per
section, built by `lb.config.parse` and never changed after (a reload builds
a new one)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


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
    http: str = "auto"          # the HTTP engine: auto | httptools | h11


@dataclass(frozen=True)
class Limits:
    nofile: int
    max_connections: int  # 0: derive from the fd limit actually granted
    max_header_bytes: int
    max_body_bytes: int
    write_buffer_high: int  # per transport; reading the other side pauses above it
    max_response_header_bytes: int = 65536   # a backend's response head


@dataclass(frozen=True)
class Timeouts:
    client_header: float
    connect: float
    first_byte: float
    idle: float
    client_body: float = 30.0   # the whole request body must arrive within this
    tunnel_idle: float = 300.0  # a WebSocket tunnel or TCP connection silent both ways this long ends


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
    path: str = ""              # health_path of backends that set none ("" = no probes)


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
class Voice:
    """What one voice name is on each backend API (None / empty: that API's default)."""
    openai: str | None = None           # the name sent to OpenAI-style servers (None: the caller's)
    chatterbox: tuple[tuple[str, object], ...] = ()   # /synthesize-json fields (seed, exaggeration..)
    chattts: int | None = None          # params_infer_code.manual_seed: ChatTTS's speaker


@dataclass(frozen=True)
class Split:
    """How a long input is cut into pieces synthesized in parallel."""
    enabled: bool = True
    min_chars: int = 300        # longer inputs are split (so are those over a backend's limit)
    parallel: int = 3           # pieces of one call synthesized at once (slots it may hold)


@dataclass(frozen=True)
class Speech:
    """The OpenAI front door of a kind = "openai" route."""
    voices: tuple[tuple[str, Voice], ...] = ()   # name -> Voice, in the file's order
    pass_unknown_voices: bool = False
    models: tuple[str, ...] = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
    max_input: int = 4096       # characters in `input` (OpenAI's own limit)
    split: Split = Split()


@dataclass(frozen=True)
class Route:
    path: str                   # request path, exact
    kind: str = ""              # chatterbox | openai | chattts ("": not a TTS call, no fallback)
    slot: bool = True           # requests and tunnels here hold a backend slot (GPU work)
    speech: Speech | None = None   # kind = "openai": the front door over every backend API


@dataclass(frozen=True)
class BackendConfig:
    name: str
    url: str
    host: str
    port: int
    max_concurrency: int = 4
    weight: int = 1
    health_path: str = ""       # "" : no active probes
    api: str = ""               # openai | chatterbox | chattts ("": the kind of the route)
    formats: tuple[str, ...] = ()   # response formats an OpenAI-style server makes itself
    max_chars: int = 0          # longest text it takes (0: its API's documented limit)


@dataclass(frozen=True)
class TcpBackendConfig:
    name: str
    host: str
    port: int
    weight: int = 1
    max_connections: int = 0    # at once (0: no limit)


@dataclass(frozen=True)
class TcpListener:
    """A [[tcp]] table: a plain TCP listener with its own backends."""
    name: str
    host: str
    port: int
    backends: tuple[TcpBackendConfig, ...]
    policy: str = "least_conn"
    queue_limit: int = 1024     # connections that may wait for a free backend
    queue_timeout: float = 10.0  # then the connection is closed
    check: str = "none"         # none | connect | http
    health_path: str = ""       # for check = "http"
    health_port: int = 0        # 0: the backend's own port


@dataclass(frozen=True)
class Cluster:
    """[cluster]: backend slots shared through Redis by every balancer
    process of a fleet (workers and replicas)."""
    redis_url: str              # as given: may hold a password; never shown
    shown_url: str              # for logs and /lb-stats: no password, no query
    fleet: str                  # key prefix: replicas of one fleet use the same name
    lease: float                # seconds a slot is held without renewal
    timeout: float              # longest wait on Redis for a slot
    replicas: int               # balancer replicas: the static share when Redis is gone


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
    tcp: tuple[TcpListener, ...] = ()
    cluster: Cluster | None = None   # None: this process alone (no [cluster] redis_url)
    warnings: tuple[str, ...] = ()   # not errors, but worth a look: `--check` prints them
