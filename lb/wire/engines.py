"""The HTTP engines: which parser reads the bytes.

Both engines only tokenize.  A request parser calls its sink with

    on_head(method, target, version, headers, head_size)   headers: [(lower name, value)]
    on_body(data)
    on_end(trailers)
    on_error(status, reason)     unparsable bytes: 400, 431 or 505

and, after `on_end`, holds whatever follows (a pipelined request) until
`next_message()`: a connection answers one request at a time.  A response
parser calls

    on_head(status, reason, version, headers, head_size)
    on_body(data) / on_end(trailers) / on_error(reason)

skipping 1xx interim responses, for one response, after `expect(method)`.
What may be forwarded, and where a body ends, is `framing`'s business.
"""

from __future__ import annotations

import importlib.util

ENGINES = ("httptools", "h11")
CHOICES = ("auto", *ENGINES)


def available(name: str) -> bool:
    return name == "h11" or importlib.util.find_spec(name) is not None


def resolve(choice: str) -> str:
    """The engine to run for `[listen] http` / `--http`: `auto` takes
    httptools (llhttp, C) when it is installed, which the default install
    makes true, else h11 (pure Python)."""
    if choice == "auto":
        return "httptools" if available("httptools") else "h11"
    if not available(choice):
        raise ValueError(f"{choice} is not installed (pip install {choice})")
    return choice


def parsers(engine: str):
    """(RequestParser, ResponseParser) classes of `engine`."""
    if engine == "httptools":
        from .httptools_engine import RequestParser, ResponseParser
    else:
        from .h11_engine import RequestParser, ResponseParser
    return RequestParser, ResponseParser
