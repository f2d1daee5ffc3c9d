"""A raw recording backend: it parses HTTP/1.1 itself, strictly, and keeps every request it saw.

Run it:     python -m backends.recorder --port 0 [--host 127.0.0.1] [--port-file PATH]
            (prints "listening on 127.0.0.1:PORT"; exits cleanly on SIGTERM/SIGINT)

Every request is answered `200` with JSON {"n": N}, N its place (1, 2, ...) among the records,
Content-Length framed (a HEAD answer without the body), keep-alive (unless it asked to close).
Control requests, themselves never recorded:
  GET /_records          the records, a JSON list
  GET /_records/reset    clears them (N starts again at 1); answers {"n": 0}

A record: {"n", "method", "target", "version", "headers": [[name, value], ...] as sent (names
not lowercased), "body", "trailers": [[name, value], ...], "raw": every byte of the request}.
Byte strings are latin-1 decoded, so each character is one byte.

Strict on purpose -- it stands in for a backend that believes exactly what it is sent, so a
test can see where the balancer put each request's boundaries: CRLF line endings only, no
obs-fold, no empty lines between requests, one of Content-Length (digits) or Transfer-Encoding:
chunked (chunk sizes in hex, well-formed extensions, trailers).  Anything else is recorded as
{"n", "error": what, "raw": the bytes seen} and the connection closed without an answer; so is
a connection that closes inside a request.  Odd input never takes the server down.
"""
from __future__ import annotations

import asyncio, re, sys

import orjson

from .plumbing import Conn, Done, Server, cli_parser, serve_until_signal

MAX_HEAD = 256 * 1024         # above any head the balancer forwards (it adds a few headers)
MAX_BODY = 64 * 1024 * 1024   # a test backend: bounded memory, not a real limit

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/(1\.[01])")
# RFC 9110 §5.5: field-value = no leading/trailing whitespace, visible bytes, inner SP/HTAB.
_VCHARS = rb"[\x21-\x7e\x80-\xff]+"
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*((?:" + _VCHARS + rb"(?:[ \t]+" + _VCHARS +
                    rb")*)?)[ \t]*")
_CHUNK_EXT_VALUE = rb"(?:" + _TOKEN + rb'|"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t -~])*")'
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,15})((?:[ \t]*;[ \t]*" + _TOKEN +
                         rb"(?:[ \t]*=[ \t]*" + _CHUNK_EXT_VALUE + rb")?)*)")
_DIGITS = re.compile(rb"[0-9]{1,18}")


class BadRequest(Exception):
    """The bytes are not a request this strict reader accepts."""


def _text(data: bytes) -> str:
    return data.decode("latin-1")


class RequestReader:
    """Reads one request off a stream, keeping every byte it read in `raw`."""

    def __init__(self, reader: asyncio.StreamReader):
        self.reader = reader
        self.raw = bytearray()

    async def _line(self, what: str) -> bytes:
        """One line without its CRLF.  Read up to an LF, so a bare LF is seen, not waited past."""
        try:
            data = await self.reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            self.raw += exc.partial
            raise BadRequest(f"connection closed inside the {what}") from None
        except asyncio.LimitOverrunError:
            raise BadRequest(f"a line of the {what} longer than {MAX_HEAD} bytes") from None
        self.raw += data
        if not data.endswith(b"\r\n") or b"\r" in data[:-2]:
            raise BadRequest(f"bare CR or LF in the {what}")
        return data[:-2]

    async def _exactly(self, n: int, what: str) -> bytes:
        try:
            data = await self.reader.readexactly(n)
        except asyncio.IncompleteReadError as exc:
            self.raw += exc.partial
            raise BadRequest(f"connection closed inside the {what}") from None
        self.raw += data
        return data

    async def _fields(self, what: str) -> list[tuple[bytes, bytes]]:
        """Field lines up to the empty line that ends them."""
        fields, size = [], 0
        while line := await self._line(what):
            size += len(line) + 2
            if size > MAX_HEAD:
                raise BadRequest(f"{what} longer than {MAX_HEAD} bytes")
            match = _FIELD.fullmatch(line)
            if match is None:
                raise BadRequest(f"malformed field line {line[:80]!r} in the {what}")
            fields.append((match.group(1), match.group(2)))
        return fields

    async def read(self) -> dict | None:
        """The next request as a record (without "n"), or None at a clean end of stream."""
        try:
            first = await self.reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None     # closed between requests
            self.raw += exc.partial
            raise BadRequest("connection closed inside the request line") from None
        except asyncio.LimitOverrunError:
            raise BadRequest(f"request line longer than {MAX_HEAD} bytes") from None
        self.raw += first
        line = _REQUEST_LINE.fullmatch(first[:-2]) if first.endswith(b"\r\n") else None
        if line is None:
            raise BadRequest("empty line before a request" if first in (b"\r\n", b"\n")
                             else f"malformed request line {first[:80]!r}")
        method, target, version = line.groups()
        headers = await self._fields("request head")
        body, trailers = await self._body(headers)
        return {"method": _text(method), "target": _text(target), "version": _text(version),
                "headers": [[_text(n), _text(v)] for n, v in headers], "body": _text(body),
                "trailers": [[_text(n), _text(v)] for n, v in trailers]}

    async def _body(self, headers) -> tuple[bytes, list]:
        lengths = [v for n, v in headers if n.lower() == b"content-length"]
        codings = [v for n, v in headers if n.lower() == b"transfer-encoding"]
        if codings:
            if lengths:
                raise BadRequest("both Content-Length and Transfer-Encoding")
            if len(codings) > 1 or codings[0].lower() != b"chunked":
                raise BadRequest(f"Transfer-Encoding other than one chunked: {codings!r}")
            return await self._chunked()
        if len(lengths) > 1:
            raise BadRequest("more than one Content-Length")
        if not lengths:
            return b"", []
        if not _DIGITS.fullmatch(lengths[0]) or int(lengths[0]) > MAX_BODY:
            raise BadRequest(f"invalid Content-Length {lengths[0][:40]!r}")
        return await self._exactly(int(lengths[0]), "body"), []

    async def _chunked(self) -> tuple[bytes, list]:
        body = bytearray()
        while True:
            size_line = await self._line("chunked body")
            match = _CHUNK_LINE.fullmatch(size_line)
            if match is None:
                raise BadRequest(f"malformed chunk size line {size_line[:80]!r}")
            size = int(match.group(1), 16)
            if size == 0:
                break
            if len(body) + size > MAX_BODY:
                raise BadRequest(f"chunked body larger than {MAX_BODY} bytes")
            body += await self._exactly(size, "chunked body")
            if await self._exactly(2, "chunked body") != b"\r\n":
                raise BadRequest("chunk data not followed by CRLF")
        return bytes(body), await self._fields("trailer section")


class RecorderServer(Server):
    def __init__(self):
        super().__init__()
        self.records: list[dict] = []

    async def listen(self, host: str, port: int) -> asyncio.Server:
        # The stream's limit bounds readline()/readuntil(): a head of MAX_HEAD must fit.
        return await asyncio.start_server(self._on_connect, host, port, backlog=1024,
                                          limit=MAX_HEAD + 1024)

    def new_conn(self, reader, writer) -> RecorderConn:
        return RecorderConn(self, reader, writer)

    def record(self, fields: dict) -> int:
        n = len(self.records) + 1
        self.records.append({"n": n, **fields})
        return n


class RecorderConn(Conn):
    """Conn for its life cycle (task, graceful close); its h11 machine is never used."""

    def __init__(self, server: RecorderServer, reader, writer):
        super().__init__(reader, writer)
        self.server = server

    async def run(self):
        while True:
            request = RequestReader(self.reader)
            try:
                fields = await request.read()
            except BadRequest as exc:
                self.server.record({"error": str(exc), "raw": _text(request.raw)})
                break
            except OSError as exc:     # a reset: what arrived of the request is still news
                if request.raw:
                    self.server.record({"error": f"connection lost inside a request: {exc!r}",
                                        "raw": _text(request.raw)})
                raise
            if fields is None:
                break
            if not await self.answer(fields, bytes(request.raw)):
                break
        await self.close_gracefully()

    async def answer(self, fields: dict, raw: bytes) -> bool:
        """Answer one request; False: close the connection after it."""
        control = fields["method"] == "GET" and fields["target"] in ("/_records",
                                                                      "/_records/reset")
        if control and fields["target"] == "/_records":
            body = orjson.dumps(self.server.records)
        elif control:
            self.server.records.clear()
            body = b'{"n":0}'
        else:
            body = orjson.dumps({"n": self.server.record({**fields, "raw": _text(raw)})})
        tokens = {t.strip().lower() for n, v in fields["headers"] if n.lower() == "connection"
                  for t in v.split(",")}
        close = fields["version"] == "1.0" or "close" in tokens
        head = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                % len(body)) + (b"connection: close\r\n\r\n" if close else b"\r\n")
        if self.writer.is_closing():
            raise Done
        # A HEAD answer has the Content-Length a GET would have, and no body.
        self.writer.write(head if fields["method"] == "HEAD" else head + body)
        await self.writer.drain()
        return not close


def main(argv=None):
    args = cli_parser("recorder", __doc__).parse_args(argv)
    serve_until_signal(RecorderServer, args)


if __name__ == "__main__":
    sys.exit(main())
