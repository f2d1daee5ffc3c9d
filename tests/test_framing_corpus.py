"""The framing corpus (framing_cases.py) against both HTTP engines, with a recording backend.

One backends.recorder process sits behind one balancer per engine.  A case's bytes go to the
balancer over a raw socket; the test checks what the client gets (the statuses in order, each
answer framed strictly, errors as JSON, at most one `connection: close`, the connection closed
or kept as the case says) and that the backend saw exactly the requests the balancer answered
as forwarded: the same boundaries, with the method, target, Host, body and trailers the case
names.  A connection the case leaves open is probed with one more request, whose answer must
come next: nothing else is pending on it, and the balancer and the backend agree on where the
last request ended.
"""
from __future__ import annotations

import json
import re
import time

import pytest

from conftest import Balancer, RawReader, Server, connect, get_json, lb_config
from framing_cases import BACKEND_HOST, CASES, CLIENT_HEADER, IDLE, PAUSE, Case

ENGINES = ["httptools", "h11"]
READ_TIMEOUT = 3.0      # for an answer that is due at once
PROBE = b"GET /__corpus-probe HTTP/1.1\r\nHost: probe.example\r\n\r\n"
# Never forwarded (Transfer-Encoding is the balancer's own: chunked or nothing).
HOP_BY_HOP = (b"connection", b"keep-alive", b"proxy-connection", b"upgrade", b"expect")

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [\x20-\x7e]*")
_FIELD_LINE = re.compile(rb"(" + _TOKEN + rb"): ([\t\x20-\x7e\x80-\xff]*)")


class Recorder(Server):
    def __init__(self):
        super().__init__("backends.recorder")

    def records(self) -> list[dict]:
        return get_json(self.port, "/_records")

    def reset(self) -> None:
        get_json(self.port, "/_records/reset")


class StrictReader(RawReader):
    """conftest's reader, keeping each answer's head lines to check them strictly."""

    def _line(self):
        line = super()._line()
        if line is not None:
            self.lines.append(line)
        return line

    def response(self, head_only: bool = False):
        self.lines = []
        resp = super().response(head_only)
        head = self.lines[:self.lines.index(b"")]
        assert _STATUS_LINE.fullmatch(head[0]), head[0]
        closes = 0
        for line in head[1:]:
            field = _FIELD_LINE.fullmatch(line)
            assert field, f"malformed field line in an answer: {line!r}"
            if field.group(1).lower() == b"connection":
                closes += b"close" in field.group(2).lower()
        assert closes <= 1, f"connection: close more than once: {head}"
        resp.head = head
        return resp


@pytest.fixture(scope="module")
def recorder():
    process = Recorder()
    yield process
    process.stop()


@pytest.fixture(scope="module", params=ENGINES)
def balancer(request, recorder, tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / f"lb-{request.param}.toml"
    # One attempt and no ejection: each forwarded request reaches the one backend exactly
    # once, and a case that upsets the backend cannot take it out for the cases after it.
    path.write_text(lb_config([recorder.url], listen={"address": "127.0.0.1:0",
                                                      "http": request.param},
                              timeouts={"client_header": CLIENT_HEADER, "idle": IDLE},
                              retry={"attempts": 1},
                              **{"health.passive": {"consecutive_failures": 0,
                                                    "consecutive_5xx": 0}}))
    process = Balancer(path)
    process.engine = request.param
    yield process
    process.stop_cleanly()


def exchange(port: int, case: Case) -> tuple[list, str]:
    """Send the case's pieces, read its answers; (answers, "closed" | "open" | "timeout")."""
    with connect(port, READ_TIMEOUT + case.wait) as sock:
        for i, piece in enumerate(case.pieces):
            if i:
                time.sleep(PAUSE)
            try:
                sock.sendall(piece)
            except OSError:
                break   # closed after an answer to an earlier piece: read that
        reader = StrictReader(sock)
        answers: list = []
        want = len(case.statuses)
        while True:
            if len(answers) == want and not case.expect_close:
                try:    # one more request: its answer must be the next one
                    sock.sendall(PROBE)
                except OSError:
                    return answers, "closed"
            try:
                answers.append(reader.response(head_only=len(answers) in case.head_only))
            except TimeoutError:
                return answers, "timeout"
            except ConnectionError:
                return answers, "closed"
            if len(answers) > want and not case.expect_close:
                return answers, "open"


def check_answer(resp) -> None:
    if resp.status < 200:
        return
    framed = [n for n, _ in resp.headers if n in ("content-length", "transfer-encoding")]
    assert len(framed) == 1, f"an answer framed by {framed}: {resp.head}"
    assert resp.complete, f"body cut short: {resp.head}"
    if resp.status >= 400:
        assert resp.header("content-type") == "application/json", resp.head
        assert isinstance(resp.json().get("error"), str), resp.body


def check_record(record: dict, seen, backend_host: bytes) -> None:
    def raw(text: str) -> bytes:
        return text.encode("latin-1")

    assert "error" not in record, f"the backend could not read what it got: {record}"
    headers = [(raw(n).lower(), raw(v)) for n, v in record["headers"]]
    names = [n for n, _ in headers]
    assert (raw(record["method"]), raw(record["target"])) == (seen.method, seen.target)
    hosts = [v for n, v in headers if n == b"host"]
    assert hosts == [backend_host if seen.host == BACKEND_HOST else seen.host], headers
    assert raw(record["body"]) == seen.body
    assert [(raw(n).lower(), raw(v)) for n, v in record["trailers"]] == list(seen.trailers)
    for pair in seen.headers:
        assert pair in headers, (pair, headers)
    for name in (*seen.absent, *(h for h in HOP_BY_HOP if h not in seen.carried)):
        assert name not in names, (name, headers)
    codings = [v for n, v in headers if n == b"transfer-encoding"]
    assert codings in ([], [b"chunked"]), headers
    assert not (codings and b"content-length" in names), headers


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_framing(balancer, recorder, case, request):
    known = dict(case.known).get(balancer.engine)
    if known:
        request.applymarker(pytest.mark.xfail(strict=True, reason=known))
    recorder.reset()
    answers, end = exchange(balancer.port, case)
    records = recorder.records()
    seen_probe = [r for r in records if r.get("target") == "/__corpus-probe"]
    forwarded = [r for r in records if r.get("target") != "/__corpus-probe"]
    report = json.dumps({"statuses": [a.status for a in answers], "end": end,
                         "answers": [[h.decode("latin-1") for h in a.head] + [
                             a.body[:300].decode("latin-1")] for a in answers],
                         "records": records}, indent=1)
    statuses = [a.status for a in answers]
    if not case.expect_close:
        assert end == "open" and statuses[-1] == 200 and seen_probe, report
        assert answers[-1].json() == {"n": len(records)}, report
        answers, statuses = answers[:-1], statuses[:-1]
    else:
        assert end == "closed", report
    assert statuses == list(case.statuses), report
    for resp in answers:
        check_answer(resp)
    assert len(forwarded) == len(case.seen), report
    # Each 200 is the backend's answer to the record in the same place (its {"n": N}).
    served = [(i, a) for i, a in enumerate(answers) if a.status == 200]
    assert len(served) == len(forwarded), report
    for (i, resp), record in zip(served, forwarded):
        assert i in case.head_only or resp.json() == {"n": record["n"]}, report
    backend_host = f"127.0.0.1:{recorder.port}".encode()
    for record, seen in zip(forwarded, case.seen):
        check_record(record, seen, backend_host)


# --- the recorder itself: the corpus is only as good as its strictness


def _send_to_recorder(recorder, data: bytes) -> tuple[list, str]:
    with connect(recorder.port, READ_TIMEOUT) as sock:
        sock.sendall(data)
        reader, answers = RawReader(sock), []
        try:
            while True:
                answers.append(reader.response())
        except ConnectionError:
            return answers, "closed"
        except TimeoutError:
            return answers, "open"


def test_recorder_keeps_each_request_exactly(recorder):
    recorder.reset()
    first = b"GET /a?q=1 HTTP/1.1\r\nHost: x\r\nX-A:  v  \r\n\r\n"
    second = (b"POST /b HTTP/1.1\r\nHost: y\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-T: t\r\n\r\n")
    answers, end = _send_to_recorder(recorder, first + second + b"GET /_records HTTP/1.1\r\n"
                                     b"Host: x\r\n\r\n")
    assert [a.json() for a in answers[:2]] == [{"n": 1}, {"n": 2}] and end == "open"
    assert [r["n"] for r in answers[2].json()] == [1, 2]    # /_records is not recorded
    one, two = recorder.records()
    assert (one["target"], one["headers"], one["raw"]) == ("/a?q=1", [["Host", "x"], ["X-A", "v"]],
                                                           first.decode("latin-1"))
    assert (two["method"], two["body"], two["trailers"]) == ("POST", "abcde", [["X-T", "t"]])
    assert two["raw"] == second.decode("latin-1")
    recorder.reset()
    assert recorder.records() == []


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\nHost: x\r\n\r\n", b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    b"GET / HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n", b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nab",
    b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
    b"GET / HTTP/2.0\r\n\r\n", b"\x00\xff\r\n\r\n"], ids=lambda d: repr(d[:24]))
def test_recorder_records_what_it_cannot_read_and_closes(recorder, data):
    recorder.reset()
    answers, end = _send_to_recorder(recorder, data)
    assert (answers, end) == ([], "closed")
    [record] = recorder.records()
    assert record["error"] and data.decode("latin-1").startswith(record["raw"]), record
