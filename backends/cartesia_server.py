"""The fake Cartesia's HTTP server: routing, the /tts/* flow, streaming and introspection.

FakeCartesia (a plumbing.Server) and its connection handler tie the other modules together:
each /tts/* request is logged (key values redacted), checked in the documented order
(cartesia_validation.py), optionally answered badly (cartesia_misbehave.py), held to the
concurrency limit, and streamed as timed audio pieces (cartesia_audio.py) - raw or as SSE.
The /_* endpoints expose the log and the counters to tests.  What the endpoints do is the
module doc of backends/cartesia.py, whose command line runs a FakeCartesia; CartesiaThread
runs one for synchronous tests.
"""
from __future__ import annotations

import asyncio, base64, math, ssl as _ssl, uuid
from urllib.parse import parse_qs, urlsplit

import h11
import orjson

from .cartesia_audio import CONTENT_TYPES, audio_pieces
from .cartesia_misbehave import (check_misbehave, malformed_head, presented_credential,
                                 quoted_status, quoting_error, quoting_head)
from .cartesia_validation import (API_VERSIONS, AUTH_MESSAGES, BEARER_SINCE, WAIT_MAX, ApiError,
                                  TTSRequest, bad_request, bearer_token, check_key,
                                  parse_version, same_key)
from .plumbing import Conn, Done, Server, ServerThread

MAX_BODY = 1 << 20
MAX_LOG = 10_000          # /_requests keeps the newest entries only

REDACTED = {True: "<redacted: key matched>", False: "<redacted: key did not match>"}


class Stats:
    def __init__(self, concurrency: int):
        self.concurrency = concurrency
        self.in_flight = 0
        self.reset()

    def reset(self):
        self.requests = self.characters_billed = self.probes = 0
        self.max_in_flight = self.in_flight
        self.by_status: dict[str, int] = {}

    def snapshot(self) -> dict:
        return {"requests": self.requests, "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight, "by_status": dict(self.by_status),
                "characters_billed": self.characters_billed, "probes": self.probes,
                "concurrency": self.concurrency}


class FakeCartesia(Server):
    def __init__(self, api_key: str, concurrency: int = 0, chars_per_second: float = 15.0,
                 rtf: float = 0.1, wav_sizes: str = "exact", ssl: _ssl.SSLContext | None = None,
                 misbehave: str = "off"):
        if not api_key:
            raise ValueError("api_key must be a non-empty string")
        if not (chars_per_second > 0 and math.isfinite(chars_per_second)):
            raise ValueError("chars_per_second must be > 0")
        if not (0 <= rtf <= 100):
            raise ValueError("rtf must be within [0, 100]")
        if wav_sizes not in ("exact", "unknown"):
            raise ValueError("wav_sizes must be exact or unknown")
        if concurrency < 0:
            raise ValueError("concurrency must be >= 0 (0: no limit)")
        super().__init__()  # start(host, port), stop(), .port, .server
        self.api_key, self.chars_per_second, self.rtf = api_key, chars_per_second, rtf
        self.wav_sizes, self.ssl = wav_sizes, ssl
        self.stats = Stats(concurrency)
        self.requests: list[dict] = []
        self.misbehave = check_misbehave(misbehave)   # apart from Stats: /_reset leaves it

    def reset(self):
        self.requests.clear()
        self.stats.reset()

    def scrub(self, obj):
        """obj with every occurrence of the API key replaced, all the way down."""
        if isinstance(obj, str):
            return obj.replace(self.api_key, "<redacted>")
        if isinstance(obj, list):
            return [self.scrub(v) for v in obj]
        if isinstance(obj, dict):
            return {self.scrub(k): self.scrub(v) for k, v in obj.items()}
        return obj

    def new_conn(self, reader, writer) -> _Conn:
        return _Conn(self, reader, writer)

    def conn_ended(self, c: _Conn):
        c.release()


class _Conn(Conn):
    def __init__(self, fake: FakeCartesia, reader, writer):
        super().__init__(reader, writer)
        self.fake, self.stats = fake, fake.stats
        self.slot = False
        self.entry: dict | None = None
        self.quote: str | None = None   # quote-key-NNN: the credential its head quotes

    async def next_cycle(self) -> bool:
        if self.h.our_state is not h11.DONE:
            return False  # closing anyway: a body left unread is not read first
        return await super().next_cycle()

    # -- routing

    async def dispatch(self, req: h11.Request):
        self.method = req.method
        self.quote = None
        target = req.target.decode("latin-1")
        path = urlsplit(target).path
        headers = {}
        for k, v in req.headers:  # the first of repeated headers wins
            headers.setdefault(k.decode("latin-1"), v.decode("latin-1"))
        if path.startswith("/_"):
            await self.drain_body()
            if path == "/_requests":
                return await self.respond_json(200, self.fake.requests)
            if path == "/_stats":
                return await self.respond_json(200, self.stats.snapshot())
            if path == "/_reset":
                self.fake.reset()
                return await self.respond_json(200, self.stats.snapshot())
            if path == "/_mode":
                return await self.set_mode(urlsplit(target).query)
            return await self.respond_json(404, {"error": f"no introspection endpoint {path}"})
        request_id = str(uuid.uuid4())
        try:  # picks the error format; /tts/* rejects a missing or bad version itself
            version = parse_version(headers.get("cartesia-version"))
        except ApiError:
            version = None
        try:
            if path == "/":
                if req.method not in (b"GET", b"HEAD"):
                    raise ApiError(405, "Method Not Allowed", "Use GET /")
                self.stats.probes += 1
                await self.drain_body()
                return await self.respond_json(200, {"ok": True, "version": API_VERSIONS[-1]})
            if path not in ("/tts/bytes", "/tts/sse"):
                raise ApiError(404, "Not Found", f"No route for {req.method.decode()} {path}")
            await self.tts(req, target, path, headers, version, request_id)
        except ApiError as e:
            if self.h.our_state is not h11.SEND_RESPONSE:
                raise Done from e  # cannot happen: errors are raised before the head is sent
            await self.drain_body()
            ctype, body = e.render(version, request_id)
            await self.respond(e.status, body, ctype)
        finally:
            self.release()

    async def tts(self, req, target, path, headers, version, request_id):
        fake = self.fake
        self.stats.requests += 1
        self.entry = entry = {
            "request_id": request_id, "method": req.method.decode("latin-1"),
            "path": fake.scrub(target), "headers": self.redacted(req.headers),
            "version": None, "auth": None, "body": None, "status": None,
            "completed": False, "audio_bytes": 0}
        fake.requests.append(entry)
        if len(fake.requests) > MAX_LOG:
            del fake.requests[:len(fake.requests) - MAX_LOG]
        if req.method != b"POST":
            raise ApiError(405, "Method Not Allowed", f"Use POST {path}")
        version = parse_version(headers.get("cartesia-version"))  # raises for a bad one
        entry["version"] = version
        verdict = check_key(fake.api_key, version, bearer_token(headers.get("authorization")),
                            headers.get("x-api-key"))
        entry["auth"] = verdict
        if verdict != "ok":
            how = "Authorization: Bearer <key>" if version >= BEARER_SINCE else "X-API-Key: <key>"
            raise ApiError(401, "Unauthorized", AUTH_MESSAGES[verdict].format(how=how))
        if fake.misbehave != "off":
            entry["misbehaved"] = fake.misbehave
            credential = presented_credential(headers)
            if fake.misbehave.startswith("bad-"):
                return await self.send_malformed(fake.misbehave, credential)
            self.quote = credential
            status = quoted_status(fake.misbehave)
            if status != 200:
                raise quoting_error(status, credential)
        limit = self.stats.concurrency
        if limit and self.stats.in_flight >= limit:
            raise ApiError(429, "Too many concurrent requests",
                           f"You have exceeded your plan's concurrency limit ({limit}).",
                           "concurrency_limited")
        self.slot = True
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        raw = await self.read_body(MAX_BODY)
        if raw is None:
            raise ApiError(413, "Payload Too Large", f"The request body exceeds {MAX_BODY} bytes")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            entry["body"] = fake.scrub(raw.decode("utf-8", "replace"))
            raise bad_request(f"The request body is not valid JSON: {e}") from None
        entry["body"] = fake.scrub(body)
        tts = TTSRequest(body, sse=path == "/tts/sse")
        await self.stream(tts, path == "/tts/sse")

    async def set_mode(self, query: str):
        q = parse_qs(query, keep_blank_values=True)
        try:
            unknown = set(q) - {"misbehave"}
            if unknown:  # a typo must not look like success
                raise ValueError(f"unknown parameter {sorted(unknown)[0]!r}: want misbehave")
            if "misbehave" in q:
                self.fake.misbehave = check_misbehave(q["misbehave"][-1])
        except ValueError as e:
            return await self.respond_json(400, {"error": str(e)})
        await self.respond_json(200, {"misbehave": self.fake.misbehave})

    async def send_malformed(self, mode: str, credential: str):
        """A head h11 cannot parse, quoting the credential; then close (the head is written
        raw: h11 would refuse to send it)."""
        await self.drain_body()
        self.writer.write(malformed_head(mode, credential))
        await self.writer.drain()
        # h11 still thinks the response is unsent: next_cycle() closes the connection.

    def head(self, status: int, headers) -> h11.Response:
        resp = super().head(status, headers)
        if self.quote is None:
            return resp
        return quoting_head(resp, headers, self.quote)

    def redacted(self, headers) -> list[list[str]]:
        out = []
        for k, v in headers:
            name, value = k.decode("latin-1"), v.decode("latin-1")
            if name == "authorization":
                token = bearer_token(value)
                value = ("<redacted: not a Bearer token>" if token is None
                         else "Bearer " + REDACTED[same_key(token, self.fake.api_key)])
            elif name == "x-api-key":
                value = REDACTED[same_key(value.strip(), self.fake.api_key)]
            out.append([name, self.fake.scrub(value)])
        return out

    async def stream(self, tts: TTSRequest, sse: bool):
        fake, entry = self.fake, self.entry
        nsamples = tts.samples(fake.chars_per_second)
        ctype = "text/event-stream" if sse else CONTENT_TYPES[tts.container]
        await self.send(self.head(200, [("content-type", ctype), ("cache-control", "no-cache")]))
        entry["status"] = 200
        self.count_status(200)
        self.stats.characters_billed += len(tts.transcript)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for seconds, piece in audio_pieces(tts, nsamples, fake.wav_sizes):
            delay = start + fake.rtf * seconds - loop.time()
            if delay > 0:
                await self.wait_or_gone(min(delay, WAIT_MAX))
            if sse:
                data = b'data: ' + orjson.dumps({"type": "chunk", "data": base64.b64encode(piece).decode(),
                                                 "done": False, "status_code": 206}) + b"\n\n"
            else:
                data = piece
            await self.send(h11.Data(data=data))
            entry["audio_bytes"] += len(piece)
        if sse:
            await self.send(h11.Data(data=b'data: ' + orjson.dumps(
                {"type": "done", "done": True, "status_code": 200}) + b"\n\n"))
        await self.send(h11.EndOfMessage())
        entry["completed"] = True

    def count_status(self, status: int):
        self.stats.by_status[str(status)] = self.stats.by_status.get(str(status), 0) + 1

    def release(self):
        """Give back the concurrency slot, once."""
        if self.slot:
            self.slot = False
            self.stats.in_flight -= 1
        self.entry = None

    # -- HTTP plumbing (the rest is plumbing.Conn's)

    async def read_body(self, limit: int) -> bytes | None:
        """The whole request body, or None (after draining it) when it outgrows limit."""
        parts, n = [], 0
        while (data := await self.body_data()) is not None:
            n += len(data)
            if n <= limit:
                parts.append(bytes(data))
        return b"".join(parts) if n <= limit else None

    async def drain_body(self):
        while await self.body_data() is not None:
            pass

    async def respond(self, status, body: bytes, ctype="text/plain", headers=()):
        if self.entry is not None:
            self.entry["status"] = status
            self.count_status(status)
        await super().respond(status, body, ctype, headers)


def server_ssl_context(cert_file: str, key_file: str) -> _ssl.SSLContext:
    ctx = _ssl.create_default_context(_ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


class CartesiaThread(ServerThread):
    """Run a FakeCartesia on its own event loop in a daemon thread, for synchronous tests:
    `with CartesiaThread(api_key="k") as c: http.client.HTTPConnection("127.0.0.1", c.port)`.
    Keyword arguments go to FakeCartesia."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **kwargs):
        super().__init__(host, port, name="fake-cartesia", what="fake Cartesia",
                         server=FakeCartesia(**kwargs))

    fake = property(lambda self: self.server)
