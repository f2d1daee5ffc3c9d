"""Shared fixtures: real processes on 127.0.0.1 and a small raw HTTP reader.

The balancer and the echo backends run as subprocesses (`python -m lb`,
`python -m backends.echo`), exactly as a user starts them; tests talk to them
over loopback sockets with http.client, curl, or raw sockets when a test
needs bytes that well-behaved clients never send.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 15.0


class Process:
    """A child process whose stdout+stderr lines are collected by a thread."""

    def __init__(self, args: list[str], **popen):
        self.proc = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, **popen)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_line(self, pattern: str, timeout: float = START_TIMEOUT, start: int = 0) -> re.Match:
        """The first collected line (from index `start`) matching `pattern`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    match = regex.search(line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line matching {pattern!r}; output:\n" + self.output())
                self._cond.wait(min(remaining, 0.2))

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        return self.proc.returncode


class Server(Process):
    """`python -m MODULE --port N ...` of backends/: started, its port read
    from the "listening on" line it prints."""

    def __init__(self, module: str, port: int = 0, *args: str):
        super().__init__(["-m", module, "--port", str(port), *args])
        try:
            self.port = int(self.wait_for_line(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        except BaseException:
            self.stop()
            raise
        self.url = f"http://127.0.0.1:{self.port}"


class Backend(Server):
    def __init__(self, port: int = 0):
        super().__init__("backends.echo", port)

    def stats(self) -> dict:
        return get_json(self.port, "/_stats")

    def reset_stats(self) -> None:
        get_json(self.port, "/_stats/reset")


# Both HTTP engines give the same behaviour: every test that starts a
# balancer through `start_lb` (or the `lb` fixture, or takes `http_engine`)
# runs once with each.
ENGINES = ("httptools", "h11")


@pytest.fixture(scope="module", params=ENGINES)
def http_engine(request) -> str:
    return request.param


def lb_args(config_path, http: str | None = None) -> list[str]:
    """`python -m lb` arguments for a config file, with an engine if given."""
    return ["-m", "lb", "-c", str(config_path), *(["--http", http] if http else [])]


class Balancer(Process):
    def __init__(self, config_path: Path, preexec_fn=None, env: dict | None = None,
                 http: str | None = None):
        super().__init__(lb_args(config_path, http), preexec_fn=preexec_fn, env=env)
        self.http = http
        try:
            self.port = int(self.wait_for_line(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        except BaseException:
            self.stop()
            raise

    def stop_cleanly(self) -> None:
        """Stop with SIGTERM and check the balancer exited 0 without a traceback."""
        code = self.stop()
        output = self.output()
        assert "Traceback" not in output and "Exception in" not in output, output
        assert code == 0, f"balancer exited {code}:\n{output}"

    def stats(self) -> dict:
        return get_json(self.port, "/lb-stats")

    def rss_kib(self, field: str = "VmRSS") -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise AssertionError(f"{field} not in /proc/{self.proc.pid}/status")


def lb_config(backends: list, routes=(), tcp=(), **sections: dict) -> str:
    """TOML text: a balancer on 127.0.0.1:0 in front of `backends`.

    Each backend is a URL, or a dict with "url" and any per-backend keys
    (max_concurrency, weight, health_path); they are named b0, b1, ...
    `routes` are (path, kind) pairs or dicts of [[route]] keys, one [[route]]
    each.  `tcp` are dicts of [[tcp]] keys, whose "backends" is a list of
    dicts of [[tcp.backend]] keys.
    Sections are keyword arguments; dotted ones as **{"health.passive": {...}}.
    """
    merged = {"listen": {"address": "127.0.0.1:0"}, "log": {"access": True}}
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    out = []
    for name, values in merged.items():
        out.append(f"[{name}]")
        out.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    for i, entry in enumerate(backends):
        entry = {"url": entry} if isinstance(entry, str) else entry
        out += ["[[backend]]", f'name = "b{i}"']
        out.extend(f"{key} = {json.dumps(value)}" for key, value in entry.items())
    for route in routes:
        if not isinstance(route, dict):
            route = {"path": route[0], "kind": route[1]}
        out.append("[[route]]")
        out.extend(f"{key} = {json.dumps(value)}" for key, value in route.items())
    for listener in tcp:
        out.append("[[tcp]]")
        out.extend(f"{key} = {json.dumps(value)}" for key, value in listener.items()
                   if key != "backends")
        for entry in listener.get("backends", ()):
            out.append("[[tcp.backend]]")
            out.extend(f"{key} = {json.dumps(value)}" for key, value in entry.items())
    return "\n".join(out) + "\n"


def tcp_port(balancer: "Balancer", name: str, timeout: float = START_TIMEOUT) -> int:
    """The port a [[tcp]] listener took (its address said port 0)."""
    return int(balancer.wait_for_line(rf"tcp {re.escape(name)}: listening on "
                                      rf"127\.0\.0\.1:(\d+)", timeout).group(1))


@pytest.fixture
def start_backend():
    started: list[Backend] = []

    def start() -> Backend:
        backend = Backend()
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()


@pytest.fixture
def start_lb(tmp_path, http_engine):
    started: list[Balancer] = []

    def start(backends: list[str], preexec_fn=None, env: dict | None = None, routes=(),
              tcp=(), **sections: dict) -> Balancer:
        path = tmp_path / f"lb{len(started)}.toml"
        path.write_text(lb_config(backends, routes, tcp, **sections))
        balancer = Balancer(path, preexec_fn=preexec_fn, env=env, http=http_engine)
        started.append(balancer)
        return balancer

    yield start
    for balancer in started:
        balancer.stop_cleanly()


@pytest.fixture
def backend(start_backend) -> Backend:
    return start_backend()


@pytest.fixture
def lb(start_lb, backend) -> Balancer:
    return start_lb([backend.url])


# --- small synchronous HTTP helpers


def two_step_call(conn, text: str) -> tuple[dict, bytes]:
    """A Chatterbox two-step call on `conn` (an http.client connection):
    POST /synthesize-json, then GET the audio_url it names, both answered
    200; returns the JSON answer and the audio."""
    conn.request("POST", "/synthesize-json", body=json.dumps({"text": text}).encode(),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    assert resp.status == 200 and answer["success"] is True, answer
    conn.request("GET", answer["audio_url"])
    resp = conn.getresponse()
    audio = resp.read()
    assert resp.status == 200, (resp.status, audio[:200])
    return answer, audio


def get_json(port: int, path: str, timeout: float = 5.0) -> dict:
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return json.loads(resp.read())
    finally:
        conn.close()


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


class Response:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes, complete: bool):
        self.status = status
        self.headers = headers
        self.body = body
        self.complete = complete   # False: the connection closed before the body ended

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name.lower():
                return value
        return None

    def json(self) -> dict:
        return json.loads(self.body)


class RawReader:
    """Reads HTTP/1.1 responses off a socket one after another (pipelining)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def _line(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            if not self._fill():
                return None
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exactly(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not self._fill():
                return None
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def response(self, head_only: bool = False) -> Response:
        status_line = self._line()
        if status_line is None:
            raise ConnectionError("connection closed before a response")
        status = int(status_line.split(b" ", 2)[1])
        headers = []
        while True:
            line = self._line()
            if line is None:
                raise ConnectionError("connection closed inside a response head")
            if not line:
                break
            name, _, value = line.partition(b":")
            headers.append((name.decode().strip().lower(), value.decode().strip()))
        resp = Response(status, headers, b"", True)
        if status == 100:
            return resp
        if head_only or status in (204, 304):
            return resp
        length = resp.header("content-length")
        if resp.header("transfer-encoding") == "chunked":
            body = []
            while True:
                size_line = self._line()
                if size_line is None:
                    resp.body, resp.complete = b"".join(body), False
                    return resp
                size = int(size_line.split(b";")[0], 16)
                chunk = self._exactly(size + 2)
                if chunk is None:
                    resp.body, resp.complete = b"".join(body) + self.buf, False
                    return resp
                if size == 0:
                    break
                body.append(chunk[:-2])
            resp.body = b"".join(body)
        elif length is not None:
            body = self._exactly(int(length))
            if body is None:
                resp.body, resp.complete = self.buf, False
                self.buf = b""
            else:
                resp.body = body
        else:
            while self._fill():
                pass
            resp.body, self.buf = self.buf, b""
        return resp


def raw_request(port: int, data: bytes, timeout: float = 5.0) -> Response:
    """Send raw bytes, read one response."""
    with connect(port, timeout) as sock:
        sock.sendall(data)
        return RawReader(sock).response()


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def env_without_proxies() -> dict:
    env = dict(os.environ)
    for key in list(env):
        if key.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            del env[key]
    return env


def read_head(conn: socket.socket) -> bytes | None:
    """Read from a raw connection until a request head has arrived (None: closed)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    return buf


class ScriptedBackend:
    """A raw TCP backend: `handle(conn, index)` runs per accepted connection."""

    def __init__(self, handle):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._handle = handle
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._run, args=(conn, self.accepted), daemon=True).start()
            self.accepted += 1

    def _run(self, conn, index):
        with conn:
            conn.settimeout(5)
            try:
                self._handle(conn, index)
            except OSError:
                pass

    def close(self):
        self.sock.close()


def error_text(doc: dict) -> str:
    """The error in a JSON answer the balancer made: its own {"error": "..."},
    or on an openai route OpenAI's {"error": {"message": ..., "code": ...}}
    (message and code, so a test can look for either)."""
    error = doc["error"]
    if isinstance(error, dict):
        return f"{error['message']} [{error.get('code')}]"
    return error
