"""The fake Cartesia's misbehave modes: answers that quote the API key back, on purpose.

They stand in for a broken Cartesia, or a proxy in front of it that reflects what it was sent,
so tests (tests/test_secrets.py) can show the balancer never passes on or logs what the other
side says.  The modes are documented in backends/cartesia.py's module doc; this module holds
what they say and how, so the ordinary request path in cartesia_server.py reads as the real
API's and the deliberately broken answers stay in one place:

  * check_misbehave(): a mode name (from --misbehave or GET /_mode?misbehave=MODE);
  * presented_credential(): the value the modes quote (Authorization, else X-API-Key);
  * malformed_head(): the unparseable heads of bad-status-line and bad-header-line;
  * quoted_status(), quoting_error(), quoting_head(): quote-key-NNN's status, its error body
    (key_pieces: the key whole and in pieces) and its head (reason phrase and a header).
"""
from __future__ import annotations

import re

import h11

from .cartesia_validation import ApiError, bearer_token

MISBEHAVIOURS = ("off", "bad-status-line", "bad-header-line")   # and quote-key-NNN


def check_misbehave(text: str) -> str:
    m = re.fullmatch(r"quote-key-(\d{3})", text)
    if text in MISBEHAVIOURS or (m and 200 <= int(m.group(1)) <= 599):
        return text
    raise ValueError(f"misbehave={text!r}: want {', '.join(MISBEHAVIOURS)} or quote-key-NNN "
                     "(NNN 200-599)")


def key_pieces(token: str) -> str:
    """An error message quoting `token` every way a careless server might."""
    n = max(8, len(token) // 3)
    middle = len(token) // 2 - 4
    return (f"Invalid API key {token} (Authorization: Bearer {token}); it starts "
            f"{token[:n]}..., ends ...{token[-n:]}, holds {token[middle:middle + 8]}; "
            f"normalised: {token.lower()} / {token.upper()}")


def presented_credential(headers: dict[str, str]) -> str:
    """What the request authenticated with, as sent: the value every mode quotes."""
    return headers.get("authorization") or headers.get("x-api-key") or ""


def malformed_head(mode: str, credential: str) -> bytes:
    """bad-status-line's or bad-header-line's head, quoting the credential.  Written raw by the
    caller: h11 would refuse to send it."""
    if mode == "bad-status-line":
        raw = f"HTTP/1.1 2OO Authorization: {credential}\r\n\r\n"
    else:
        raw = (f"HTTP/1.1 200 OK\r\ncontent-type: audio/wav\r\n"
               f"Your Authorization: {credential}\r\n\r\n")
    return raw.encode("latin-1")


def quoted_status(mode: str) -> int:
    """quote-key-NNN's status NNN."""
    return int(mode.rsplit("-", 1)[1])


def quoting_error(status: int, credential: str) -> ApiError:
    """quote-key-NNN's error (NNN != 200): the usual error body, its message quoting the key."""
    token = bearer_token(credential) or credential.strip()
    return ApiError(status, "Simulated error", key_pieces(token))


def quoting_head(resp: h11.Response, headers, quote: str) -> h11.Response:
    """The head `resp` (made from `headers`) with `quote` in its reason phrase and in an
    X-Echo-Authorization header."""
    return h11.Response(status_code=resp.status_code, reason=resp.reason + b" " + quote.encode(),
                        headers=[*headers, ("x-echo-authorization", quote)])
