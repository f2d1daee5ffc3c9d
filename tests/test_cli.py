"""The command line as a user runs it: bad configs, the demo fleet, clean stops."""

from __future__ import annotations

import http.client
import io
import wave
import socket
import subprocess
import sys

from conftest import ROOT, Process, two_step_call, wait_until


def _run_lb(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lb", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_serving_with_a_bad_config_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[timeouts]\nconnect = -1\n[[backend]]\nname = "a"\nurl = "http://127.0.0.1:1"\n')
    out = _run_lb("-c", str(bad))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "lb: config error: timeouts.connect: must be a positive, finite number of seconds, got -1"]


def test_config_that_is_not_utf8_or_absurdly_nested_exits_2(tmp_path):
    for name, content in (("latin1.toml", '[[backend]]\nname = "caf\xe9"\n'.encode("latin-1")),
                          ("deep.toml", b"x = " + b"[" * 3000 + b"]" * 3000 + b"\n")):
        path = tmp_path / name
        path.write_bytes(content)
        out = _run_lb("--check", "-c", str(path))
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and str(path) in out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_demo_starts_a_fleet_that_answers_and_stops_it(tmp_path):
    ports = [_free_port(), _free_port()]
    config = tmp_path / "demo.toml"
    config.write_text('[listen]\naddress = "127.0.0.1:0"\n' + "".join(
        f'[[backend]]\nname = "gpu{i}"\nurl = "http://127.0.0.1:{port}"\n'
        for i, port in enumerate(ports))
        # As in conf/lb.toml: the audio_url fetch goes to the server that made the file.
        + '[[route]]\npath = "/synthesize-json"\nkind = "chatterbox"\n')
    lb = Process(["-m", "lb", "--demo", "-c", str(config)])
    try:
        port = int(lb.wait_for_line(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for _ in range(4):
            # A two-step Chatterbox call: synthesize, then fetch the audio it names.
            answer, audio = two_step_call(conn, "Hello from the demo.")
            assert audio[:4] == b"RIFF"
            with wave.open(io.BytesIO(audio)) as wav:
                assert wav.getframerate() == 24000
                assert abs(wav.getnframes() / 24000 - answer["duration"]) < 0.01
        conn.request("GET", "/health")
        assert b'"backends_usable":2' in conn.getresponse().read()
        conn.close()
    finally:
        assert lb.stop() == 0
    # The demo backends went away with the balancer.
    for p in ports:
        wait_until(lambda: not _listening(p), timeout=5, what=f"demo backend on {p} stopped")
    assert "Traceback" not in lb.output()
