"""Long inputs on the OpenAI front door (split): cut into pieces, synthesized
in parallel, played strictly in order, end to end over loopback.

Simulated Chatterbox servers (--tone: the same tone for every text, so only
the length says anything), and ScriptedFleet: OpenAI-style servers in this
process whose audio names its piece (every sample of piece i is i + 1), so
the caller's PCM shows order sample for sample, and whose script per piece
and attempt makes pieces finish out of order or break off mid-body.
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from array import array
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import pytest

from backends.audio import samples_for_text, wav_header
from conftest import Balancer, Server, get_json, lb_config
from lb.tts.speech_plan import FIRST_PIECE_MAX
from lb.tts.text_split import split_text

SPEECH = "/v1/audio/speech"
CUT_WARNING = "speech call cut after audio was sent"
TIMEOUT = 30.0                 # any one client call
CHATTERBOX_MAX = 5000          # API_MAX_CHARS["chatterbox"]
OPENAI_MAX = 3000              # API_MAX_CHARS["openai"]
FILLER = ("amber birch cedar delta ember fjord granite harbor island juniper kestrel "
          "lantern meadow nettle orchard pebble quarry river saffron thistle").split()


# --- texts and their pieces

def numbered_text(count: int = 25, length: int = 85) -> str:
    """`count` distinct sentences of about `length` characters, numbered."""
    sentences = []
    for i in range(1, count + 1):
        words, k = [f"Sentence {i} tells of"], i
        while sum(len(w) + 1 for w in words) < length - 8:
            words.append(FILLER[k % len(FILLER)])
            k += 7
        sentences.append(" ".join(words) + ".")
    return " ".join(sentences)


def pieces_of(text: str, max_chars: int, min_chars: int = 300) -> list[str]:
    """The pieces the front door makes of `text` (speech_plan.pieces' parameters)."""
    return split_text(text, max_chars=max_chars, first_max=min(max_chars, FIRST_PIECE_MAX),
                      target=min(max_chars, min_chars))


# --- the caller

@dataclass
class Answer:
    """What the caller saw."""
    status: int
    headers: dict[str, str]
    body: bytes
    first_byte: float | None     # seconds from the request to the first body byte
    total: float                 # ... to the end of the body (or its cut)
    cut: bool                    # http.client raised IncompleteRead: no last chunk


def speak(port: int, text: str) -> Answer:
    """POST /v1/audio/speech for PCM, the body read as it streams."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        started = time.monotonic()
        conn.request("POST", SPEECH, body=json.dumps(
            {"model": "tts-1", "input": text, "voice": "alloy", "response_format": "pcm"}),
            headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        body, first, cut = bytearray(), None, False
        while time.monotonic() - started < TIMEOUT:
            try:
                data = resp.read1(65536)
            except http.client.IncompleteRead as exc:
                body, cut = body + exc.partial, True
                break
            if not data:
                break
            if first is None:
                first = time.monotonic() - started
            body += data
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, bytes(body),
                      first, time.monotonic() - started, cut)
    finally:
        conn.close()


# --- OpenAI-style servers whose audio names its piece

@dataclass(frozen=True)
class Act:
    """How one server answers one attempt at a piece: wait `delay` before
    the head, send the head and the first half of the body, wait `pause`,
    then the rest, or (cut) close the connection instead."""
    delay: float = 0.0
    pause: float = 0.0
    cut: bool = False


class ScriptedFleet:
    """Three OpenAI-style servers sharing one script and one set of counters,
    for the pieces of numbered_text().  The answer to piece i (looked up by
    its exact text) is a WAV of SAMPLES_PER_CHAR x len(piece) samples, every
    one of value i + 1; `script(i, attempt)` says how it is sent."""

    SAMPLES_PER_CHAR = 20

    def __init__(self, script: Callable[[int, int], Act]):
        self.text = numbered_text()
        self.pieces = pieces_of(self.text, OPENAI_MAX)
        self.script = script
        self.index = {text: i for i, text in enumerate(self.pieces)}
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.attempts = [0] * len(self.pieces)   # calls per piece, all servers
        self.finished: list[int] = []       # pieces answered whole, in completion order
        self.servers = [self._serve() for _ in range(3)]

    def expected(self, index: int) -> bytes:
        """Piece `index`'s PCM: int16 samples of value index + 1."""
        return array("h", [index + 1]).tobytes() * (self.SAMPLES_PER_CHAR
                                                     * len(self.pieces[index]))

    def whole(self) -> bytes:
        return b"".join(self.expected(i) for i in range(len(self.pieces)))

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()

    def _serve(self) -> ThreadingHTTPServer:
        fleet = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("content-length", "0"))
                text = json.loads(self.rfile.read(length)).get("input", "")
                index = fleet.index.get(text)
                if self.path != SPEECH or index is None:   # not a piece of ours
                    self.send_error(400)
                    return
                with fleet.lock:
                    fleet.attempts[index] += 1
                    act = fleet.script(index, fleet.attempts[index])
                    fleet.in_flight += 1
                    fleet.max_in_flight = max(fleet.max_in_flight, fleet.in_flight)
                pcm, half = fleet.expected(index), len(fleet.expected(index)) // 2
                try:
                    time.sleep(act.delay)
                    self.send_response(200)
                    self.send_header("Content-Type", "audio/wav")
                    self.send_header("Content-Length", str(44 + len(pcm)))
                    self.end_headers()
                    self.wfile.write(wav_header(len(pcm)) + pcm[:half])
                    time.sleep(act.pause)
                finally:    # out of flight before the last bytes: the balancer
                    with fleet.lock:    # may start its next call once they arrive
                        fleet.in_flight -= 1
                if act.cut:             # mid-body: the balancer sees the body end early
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                with fleet.lock:
                    fleet.finished.append(index)
                self.wfile.write(pcm[half:])

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return server


# --- fixtures

@pytest.fixture
def start_speech_lb(tmp_path, http_engine):
    """A balancer with one kind = "openai" route on /v1/audio/speech and its
    [route.split] table (hand-written: lb_config writes flat keys only; a
    [route.split] right after the [[route]] attaches to it)."""
    started: list[Balancer] = []

    def start(backends: list, split: dict | None = None) -> Balancer:
        text = lb_config(backends, routes=[(SPEECH, "openai")])
        if split is not None:
            text += "[route.split]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                                for k, v in split.items())
        path = tmp_path / f"lb{len(started)}.toml"
        path.write_text(text)
        balancer = Balancer(path, http=http_engine)
        started.append(balancer)
        return balancer

    yield start
    for balancer in started:
        balancer.stop_cleanly()


@pytest.fixture
def start_chatterbox():
    """Simulated Chatterbox servers: tone audio, model loaded at once."""
    started: list[Server] = []

    def start(rtf: float) -> Server:
        server = Server("backends.chatterbox", 0, "--load-time", "0", "--tone", "--rtf", str(rtf))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def scripted():
    fleets: list[ScriptedFleet] = []

    def start(script: Callable[[int, int], Act]) -> ScriptedFleet:
        fleet = ScriptedFleet(script)
        fleets.append(fleet)
        return fleet

    yield start
    for fleet in fleets:
        fleet.close()


def chatterbox_entries(servers) -> list[dict]:
    return [{"url": s.url, "api": "chatterbox"} for s in servers]


def openai_entries(fleet: ScriptedFleet) -> list[dict]:
    return [{"url": f"http://127.0.0.1:{s.server_address[1]}", "api": "openai"}
            for s in fleet.servers]


# --- 1. long text over three Chatterbox servers

def test_long_text_first_audio_early_and_whole(start_chatterbox, start_speech_lb):
    # rtf 0.05: ~6.7 s of GPU time for the ~135 s of audio, ~2.3 s over three
    # servers; the first piece (one sentence) takes ~0.3 s.
    servers = [start_chatterbox(0.05) for _ in range(3)]
    lb = start_speech_lb(chatterbox_entries(servers))
    text = numbered_text()
    pieces = pieces_of(text, CHATTERBOX_MAX)
    assert 1900 <= len(text) <= 2100 and len(pieces) >= 6

    answer = speak(lb.port, text)

    assert answer.status == 200 and not answer.cut, answer.body[:300]
    assert answer.headers["content-type"] == "audio/pcm"
    assert answer.headers["x-tts-pieces"] == str(len(pieces))
    assert len(answer.body) == 2 * sum(samples_for_text(p) for p in pieces)
    assert answer.first_byte is not None and answer.first_byte < answer.total / 3, \
        (answer.first_byte, answer.total)
    for server in servers:
        assert get_json(server.port, "/_stats")["synth_total"] >= 1, server.url


# --- 2. pieces that finish out of order play in order

def test_pieces_play_in_text_order_though_they_finish_out_of_order(scripted, start_speech_lb):
    # The first pieces take longest: pieces 2 and 3 are done before piece 1.
    fleet = scripted(lambda i, n: Act(delay=max(0.05, 0.6 - 0.2 * i)))
    lb = start_speech_lb(openai_entries(fleet))

    answer = speak(lb.port, fleet.text)

    assert answer.status == 200 and not answer.cut, answer.body[:300]
    assert answer.headers["x-tts-pieces"] == str(len(fleet.pieces))
    assert fleet.finished.index(1) < fleet.finished.index(0), fleet.finished
    assert answer.body == fleet.whole()


# --- 3. a backend that fails before any audio: its pieces go elsewhere

@pytest.mark.parametrize("failure", ["answers_500", "killed"])
def test_failed_backend_pieces_retried_elsewhere(failure, start_chatterbox, start_speech_lb):
    servers = [start_chatterbox(0.02) for _ in range(3)]
    bad = servers[0]
    if failure == "answers_500":
        assert get_json(bad.port, "/_mode?fail_rate=1")["fail_rate"] == 1.0
    else:
        bad.stop()
    lb = start_speech_lb(chatterbox_entries(servers))
    text = numbered_text()
    pieces = pieces_of(text, CHATTERBOX_MAX)

    answer = speak(lb.port, text)

    assert answer.status == 200 and not answer.cut, answer.body[:300]
    assert answer.headers["x-tts-pieces"] == str(len(pieces))
    assert len(answer.body) == 2 * sum(samples_for_text(p) for p in pieces)
    good = [get_json(s.port, "/_stats") for s in servers[1:]]
    assert sum(s["outcomes"].get("ok", 0) for s in good) == len(pieces)
    # b0 was given pieces (else nothing was retried), made none, and the
    # access log says why they went elsewhere.
    why = "answered 500" if failure == "answers_500" else "cannot connect to backend b0"
    lb.wait_for_line(rf'path="{SPEECH}" status=200 .*tried=.*b0.*why=".*{why}')
    if failure == "answers_500":
        stats = get_json(bad.port, "/_stats")
        assert stats["outcomes"].get("failed", 0) >= 1 and "ok" not in stats["outcomes"], stats
    assert CUT_WARNING not in lb.output()


# --- 4. a piece that fails mid-body: cut if it was playing, retried if not

def test_piece_failing_after_its_audio_was_sent_cuts_the_answer(scripted, start_speech_lb):
    # Piece 1 is at once whole; piece 2 sends half its audio, and after
    # 0.5 s (long since playing) its server closes the connection.
    fleet = scripted(lambda i, n: Act(pause=0.5, cut=True) if i == 1
                     else Act(delay=0.05))
    lb = start_speech_lb(openai_entries(fleet))

    answer = speak(lb.port, fleet.text)

    assert answer.status == 200
    assert answer.cut, "the body ended with its last chunk: the cut is invisible"
    first = fleet.expected(0)
    assert answer.body.startswith(first)
    # What followed piece 1 is piece 2's audio (some of it), nothing else.
    rest = answer.body[len(first):]
    assert 0 < len(rest) < len(fleet.expected(1))
    assert rest == fleet.expected(1)[:len(rest)]
    assert fleet.attempts[1] == 1, "a piece the caller heard part of was tried again"
    lb.wait_for_line(CUT_WARNING)


def test_piece_failing_before_its_audio_was_sent_is_retried(scripted, start_speech_lb):
    # Piece 1 plays slowly (half, 1 s, the rest); meanwhile piece 2's first
    # attempt breaks off mid-body, before any of it could be played.
    def script(i: int, attempt: int) -> Act:
        if i == 0:
            return Act(pause=1.0)
        if i == 1 and attempt == 1:
            return Act(cut=True)
        return Act(delay=0.05)
    fleet = scripted(script)
    lb = start_speech_lb(openai_entries(fleet))

    answer = speak(lb.port, fleet.text)

    assert answer.status == 200 and not answer.cut, answer.body[:300]
    assert fleet.attempts[1] == 2, fleet.attempts
    assert answer.body == fleet.whole()
    assert CUT_WARNING not in lb.output()


# --- 5. split.enabled = false

def test_split_disabled_one_piece_or_400(start_chatterbox, start_speech_lb):
    server = start_chatterbox(0.005)
    lb = start_speech_lb([{"url": server.url, "api": "chatterbox", "max_chars": 1000}],
                         split={"enabled": False})
    long_text, short_text = numbered_text(), numbered_text(count=10)
    assert len(long_text) > 1000 and 300 < len(short_text) <= 1000

    refused = speak(lb.port, long_text)
    assert refused.status == 400, refused.body[:300]
    error = json.loads(refused.body)["error"]
    assert error["param"] == "input" and error["code"] == "string_above_max_length", error
    assert get_json(server.port, "/_stats")["synth_total"] == 0

    # Over min_chars: it would be cut if splitting were on.
    answer = speak(lb.port, short_text)
    assert answer.status == 200 and not answer.cut, answer.body[:300]
    assert answer.headers["x-tts-pieces"] == "1"
    assert len(answer.body) == 2 * samples_for_text(short_text)
    assert get_json(server.port, "/_stats")["synth_total"] == 1


# --- 6. split.parallel bounds the backends busy for one call

@pytest.mark.parametrize("parallel", [1, 3])
def test_split_parallel_bounds_concurrent_pieces(parallel, scripted, start_speech_lb):
    fleet = scripted(lambda i, n: Act(delay=0.15))
    lb = start_speech_lb(openai_entries(fleet), split={"parallel": parallel})

    answer = speak(lb.port, fleet.text)

    assert answer.status == 200 and not answer.cut, answer.body[:300]
    assert answer.body == fleet.whole()
    assert fleet.max_in_flight == parallel, (fleet.max_in_flight, parallel)
