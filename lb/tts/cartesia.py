"""The client for Cartesia, the cloud TTS service the balancer falls back to.

One HTTPS (or, for a local fake, HTTP) connection per call, certificates
verified by the standard `ssl` module.  Calls are held to the plan's
`max_concurrency`; a 429 (the plan is full after all) is retried after a
short jittered wait while the call's deadline allows; 401/402/403 mean the
key is wrong or the plan cannot be used, and mark the fallback unusable
until the balancer restarts with a fixed key.

The API key comes from the environment variable named in the configuration
and is only ever written into the request header: never into a log line,
an error, /lb-stats or an exception message.  It is registered with
`redact` as soon as it is read, so every log line is masked for it.

Nothing Cartesia sends reaches a caller: a CartesiaError's `reason` (what the
caller, the access log and /health see) is fixed text of ours.  What the other
side said -- its error body, the h11 error that quotes a malformed status or
header line, which may echo the request's Authorization header -- is the
error's `detail`, masked, escaped and cut short, and is only logged here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import time
from collections import Counter
from typing import AsyncIterator
from urllib.parse import urlsplit

import h11

from . import redact
from ..config_model import Cartesia

log = logging.getLogger("lb")

READ_SIZE = 65536
MAX_ERROR_BODY = 4096
MAX_LOGGED_DETAIL = 300          # characters of what Cartesia said, in the log
THROTTLE_WAIT = (0.1, 0.5)       # seconds to wait after a 429, jittered
BEARER_SINCE = "2025-04-16"      # versions from this date authenticate with a Bearer token
UNUSABLE = (401, 402, 403)

# Cartesia requests by outcome (CartesiaClient.outcomes), besides
# http_outcome(NNN) for a status other than 200.
OUTCOME_OK = "ok"
OUTCOME_THROTTLED = "throttled"       # a 429, waited out and sent again
OUTCOME_TIMEOUT = "timeout"
OUTCOME_TLS = "tls"
OUTCOME_UNREACHABLE = "unreachable"
OUTCOME_INVALID = "invalid_response"  # an answer h11 could not parse


def http_outcome(status: int) -> str:
    return f"http_{status}"


# What /metrics shows from the start: the named ones and the statuses a plan or key
# problem (UNUSABLE) or a full plan (429) answer.
OUTCOMES = (OUTCOME_OK, OUTCOME_THROTTLED, OUTCOME_TIMEOUT, OUTCOME_TLS, OUTCOME_UNREACHABLE,
            OUTCOME_INVALID,
            *(http_outcome(s) for s in (*UNUSABLE, 429)))


class CartesiaError(Exception):
    """A fallback call that did not produce audio; `status` is what Cartesia
    answered (0 when it could not be reached or timed out).  `reason` is our
    own words, safe to show a caller; `detail` is what Cartesia said (already
    passed through `loggable`), for the log only."""

    def __init__(self, status: int, reason: str, detail: str = ""):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.detail = detail


def loggable(text: str) -> str:
    """Text from the other side, fit for one log line: control characters
    escaped (a newline in it must not forge a line), secrets masked, cut short."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    text = redact.mask(text)
    return text if len(text) <= MAX_LOGGED_DETAIL else text[:MAX_LOGGED_DETAIL] + "..."


class CartesiaClient:
    def __init__(self, cfg: Cartesia, environ: dict[str, str] | None = None):
        self.cfg = cfg
        parts = urlsplit(cfg.url)
        self.host = parts.hostname
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self._host_header = parts.netloc
        self._ssl: ssl.SSLContext | None = None
        if self.tls:
            self._ssl = ssl.create_default_context(cafile=cfg.ca_file or None)
        key = (os.environ if environ is None else environ).get(cfg.api_key_env, "").strip()
        if key:
            redact.register(key)   # before anything could log it
        self._key = key
        self.unusable_reason = ""
        if not key:
            self.unusable_reason = f"no API key: environment variable {cfg.api_key_env} is not set"
        elif not (key.isascii() and key.isprintable() and " " not in key):
            # h11 would refuse the header, quoting it: say so here, without the key.
            self.unusable_reason = (f"the key in environment variable {cfg.api_key_env} holds "
                                    "characters not allowed in an HTTP header")
        self._slots = asyncio.Semaphore(cfg.max_concurrency)
        self.in_flight = 0
        self.calls = 0
        self.outcomes: Counter[str] = Counter()     # by OUTCOME_* and http_outcome()
        self.characters = 0                           # transcript characters of calls that produced audio
        self._rng = random.Random()

    @property
    def usable(self) -> bool:
        return self.cfg.enabled and not self.unusable_reason

    def headers(self, body_length: int) -> list[tuple[str, str]]:
        auth = (("authorization", f"Bearer {self._key}") if self.cfg.version >= BEARER_SINCE
                else ("x-api-key", self._key))
        return [("host", self._host_header), ("cartesia-version", self.cfg.version), auth,
                ("content-type", "application/json"), ("content-length", str(body_length)),
                ("user-agent", "tts-lb"), ("connection", "close")]

    async def stream(self, body: bytes, characters: int, deadline: float) -> AsyncIterator[bytes]:
        """POST /tts/bytes and yield the audio as it arrives.

        Raises CartesiaError before the first chunk if no audio comes; a
        failure after that raises CartesiaError too (the caller has started
        answering by then and must cut its response visibly)."""
        self.calls += 1
        remaining = deadline - time.monotonic()
        try:
            await asyncio.wait_for(self._slots.acquire(), max(0.0, remaining))
        except asyncio.TimeoutError:
            self.outcomes[OUTCOME_TIMEOUT] += 1
            raise CartesiaError(0, f"Cartesia: all {self.cfg.max_concurrency} slots of the plan "
                                "stayed busy until the call's deadline "
                                "(fallback.cartesia.max_concurrency)") from None
        self.in_flight += 1
        try:
            while True:
                conn, reader, writer = await self._send(body, deadline)
                try:
                    status, head_done = await self._head(conn, reader, deadline)
                    if status == 429 and time.monotonic() + THROTTLE_WAIT[1] < deadline:
                        self.outcomes[OUTCOME_THROTTLED] += 1
                        writer.transport.abort()
                        await asyncio.sleep(self._rng.uniform(*THROTTLE_WAIT))
                        continue
                    if status != 200:
                        detail = await self._error_body(conn, reader, deadline)
                        self._refused(status, detail)
                    self.outcomes[OUTCOME_OK] += 1
                    self.characters += characters
                    async for chunk in self._body(conn, reader, deadline):
                        yield chunk
                    return
                finally:
                    writer.transport.abort()
        finally:
            self.in_flight -= 1
            self._slots.release()

    async def _send(self, body: bytes, deadline: float):
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, ssl=self._ssl,
                                        server_hostname=self.host if self.tls else None),
                max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            self.outcomes[OUTCOME_TIMEOUT] += 1
            raise CartesiaError(0, f"Cartesia at {self.cfg.url} did not accept a connection "
                                "in time") from None
        except ssl.SSLError as exc:
            self.outcomes[OUTCOME_TLS] += 1
            raise CartesiaError(0, f"Cartesia at {self.cfg.url}: TLS failed ({exc.reason})") from None
        except OSError as exc:
            self.outcomes[OUTCOME_UNREACHABLE] += 1
            raise CartesiaError(0, f"cannot connect to Cartesia at {self.cfg.url}: "
                                f"{exc.strerror or exc}") from None
        conn = h11.Connection(h11.CLIENT)
        try:
            writer.write(conn.send(h11.Request(method="POST", target="/tts/bytes",
                                               headers=self.headers(len(body)))))
            writer.write(conn.send(h11.Data(data=body)))
            writer.write(conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:
            writer.transport.abort()
            # Its message may quote the Authorization header: not repeated here.
            raise CartesiaError(0, "could not write the request to Cartesia") from None
        return conn, reader, writer

    async def _next(self, conn: h11.Connection, reader: asyncio.StreamReader, deadline: float):
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                # h11's message quotes the bytes it could not parse: a status or
                # header line that may echo our Authorization header.
                self.outcomes[OUTCOME_INVALID] += 1
                detail = loggable(str(exc))
                log.warning("Cartesia sent an invalid response: %s", detail)
                raise CartesiaError(0, "Cartesia sent an invalid response", detail) from None
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await asyncio.wait_for(reader.read(READ_SIZE),
                                              max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                self.outcomes[OUTCOME_TIMEOUT] += 1
                raise CartesiaError(0, f"Cartesia did not finish within "
                                    f"{self.cfg.timeout:g}s (fallback.cartesia.timeout)") from None
            except OSError as exc:
                raise CartesiaError(0, f"Cartesia connection failed: "
                                    f"{exc.strerror or type(exc).__name__}") from None
            conn.receive_data(data)

    async def _head(self, conn, reader, deadline) -> tuple[int, bool]:
        while True:
            event = await self._next(conn, reader, deadline)
            if isinstance(event, h11.Response):
                return event.status_code, True
            if isinstance(event, h11.ConnectionClosed):
                raise CartesiaError(0, "Cartesia closed the connection without answering")

    async def _body(self, conn, reader, deadline) -> AsyncIterator[bytes]:
        while True:
            event = await self._next(conn, reader, deadline)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return

    async def _error_body(self, conn, reader, deadline) -> str:
        out = b""
        try:
            async for chunk in self._body(conn, reader, deadline):
                out += chunk
                if len(out) >= MAX_ERROR_BODY:
                    break
        except CartesiaError:
            pass
        return out[:MAX_ERROR_BODY].decode("utf-8", "replace").strip()

    def _refused(self, status: int, body: str) -> None:
        """Cartesia said no.  Its words go to the log only (masked): callers and
        the unauthenticated /health see the status."""
        self.outcomes[http_outcome(status)] += 1
        detail = loggable(body)
        reason = f"Cartesia answered {status}"
        if status in UNUSABLE:
            self.unusable_reason = reason
            log.error("Cartesia fallback is unusable until the key or plan is fixed: %s: %s",
                      reason, detail)
            reason += " (the fallback is unusable until the key or plan is fixed)"
        else:
            log.warning("Cartesia fallback call refused: %s: %s", reason, detail)
        raise CartesiaError(status, reason, detail)

    def snapshot(self) -> dict:
        return {
            "enabled": self.cfg.enabled,
            "usable": self.usable,
            "reason": self.unusable_reason if self.cfg.enabled else "disabled",
            "url": self.cfg.url,
            "in_flight": self.in_flight,
            "max_concurrency": self.cfg.max_concurrency,
            "calls": self.calls,
            "outcomes": dict(self.outcomes),
            "characters": self.characters,
        }
