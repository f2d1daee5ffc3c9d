"""`tts-lb --check` as a user runs it: mistakes that break the balancer are
errors (exit 2, one line), mistakes that only hurt are warnings (exit 0),
and every message names a backend by its name."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

UUID = "a0e99841-438c-4a64-b679-ae501e7d6091"


def check(tmp_path, text: str, env: dict | None = None) -> subprocess.CompletedProcess:
    path = tmp_path / "lb.toml"
    path.write_text(text)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TTS_LB_")}
    environ.pop("CARTESIA_API_KEY", None)
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "lb", "--check", "-c", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=20, env=environ,
                          stdin=subprocess.DEVNULL)


def backend(name: str, url: str) -> str:
    return f'[[backend]]\nname = "{name}"\nurl = "{url}"\n'


LISTEN = '[listen]\naddress = "0.0.0.0:6095"\n'


@pytest.mark.parametrize("listen, url", [
    ("0.0.0.0:6095", "http://127.0.0.1:6095"),
    ("0.0.0.0:6095", "http://localhost:6095"),
    ("[::]:6095", "http://[::1]:6095"),
    ("127.0.0.1:7000", "http://127.0.0.1:7000"),
    ("127.0.0.1:7000", "http://localhost:7000"),
])
def test_a_backend_at_our_own_address_is_an_error(tmp_path, listen, url):
    out = check(tmp_path, f'[listen]\naddress = "{listen}"\n' + backend("gpu0", "http://127.0.0.1:6093")
                + backend("loop", url))
    assert out.returncode == 2, out
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith('lb: config error: backend "loop".url: ') and "own listen address" in line


def test_the_same_port_on_another_host_is_fine(tmp_path):
    out = check(tmp_path, LISTEN + backend("gpu0", "http://10.0.0.5:6095"))
    assert out.returncode == 0 and out.stderr == "", out


def test_warnings_are_printed_and_exit_0(tmp_path):
    out = check(tmp_path, LISTEN + backend("gpu0", "http://127.0.0.1:6093")
                + backend("gpu0-again", "http://127.0.0.1:6093/")
                + backend("noport", "http://10.0.0.7")
                + "[fallback.cartesia]\nenabled = true\napi_key_env = \"MY_CARTESIA_KEY\"\n"
                  f"[fallback.cartesia.voices]\ndefault = \"{UUID}\"\n")
    assert out.returncode == 0, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("warning: ") for line in lines), lines
    same, port, key = lines
    assert 'backend "gpu0-again".url' in same and "also backend 'gpu0'" in same
    assert 'backend "noport".url' in port and "port 80" in port
    assert "MY_CARTESIA_KEY is not set" in key
    assert out.stdout.startswith(f"{tmp_path / 'lb.toml'}: ok (3 backend(s)")


def test_no_key_warning_when_the_key_is_there(tmp_path):
    out = check(tmp_path, LISTEN + backend("gpu0", "http://127.0.0.1:6093")
                + "[fallback.cartesia]\nenabled = true\n"
                  f"[fallback.cartesia.voices]\ndefault = \"{UUID}\"\n",
                env={"CARTESIA_API_KEY": "sk_car_x"})
    assert out.returncode == 0 and out.stderr == "", out


@pytest.mark.parametrize("entry, key", [
    ('weight = 0\n', 'backend "gpu1".weight'),
    ('max_concurrency = "4"\n', 'backend "gpu1".max_concurrency'),
    ('health_path = "health"\n', 'backend "gpu1".health_path'),
])
def test_errors_name_the_backend_by_name(tmp_path, entry, key):
    out = check(tmp_path, LISTEN + backend("gpu0", "http://127.0.0.1:6093")
                + backend("gpu1", "http://127.0.0.1:6094") + entry)
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"lb: config error: {key}: "), line


def test_the_warnings_are_logged_at_start_too(start_backend, start_lb):
    echo = start_backend()
    lb = start_lb([f"http://127.0.0.1:{echo.port}", f"http://127.0.0.1:{echo.port}"])
    lb.wait_for_line(r"WARNING lb: config: backend \"b1\"\.url: .* is also backend 'b0'")
