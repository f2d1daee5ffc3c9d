"""Install anywhere: tts-lb as pip installs it, run from a directory with no conf/.

A module fixture builds a real (non-editable) install of the project with
`pip install --target DIR` and runs the program pip wrote, DIR/bin/tts-lb,
with PYTHONPATH=DIR and an empty working directory: the packaged default
configuration, the lookup order of configuration files, --print-config,
--demo, --help and bad options, and backends from TTS_LB_BACKENDS/--backend.
"""

from __future__ import annotations

import http.client
import json
import importlib.metadata
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import pytest

from conftest import ROOT, Process, env_without_proxies, get_json, two_step_call

SYSTEM_PATH = "/etc/tts-lb/lb.toml"   # between ./conf and the packaged default; never written here
DEAD = "http://127.0.0.1:9"           # discard port: nothing listens there


def _builds_wheels_without_isolation() -> bool:
    """pip --no-build-isolation needs this venv's setuptools to build a wheel:
    setuptools >= 70.1 does by itself, an older one needs the wheel package."""
    if importlib.util.find_spec("wheel") is not None:
        return True
    try:
        major, minor = importlib.metadata.version("setuptools").split(".")[:2]
        return (int(major), int(minor)) >= (70, 1)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A non-editable install in DIR, and how to run it from an empty directory."""
    base = tmp_path_factory.mktemp("install")
    # Build from a copy: an in-tree build writes build/ and *.egg-info into the
    # work tree, which other people are using.
    source = base / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".*", "__pycache__", "*.egg-info", "build", "dist", "tests"))
    target = base / "site"
    # Without isolation when this venv can build the wheel; else pip fetches
    # setuptools from the index, as `pip install -e .` in .ci/run does.
    isolation = ["--no-build-isolation"] if _builds_wheels_without_isolation() else []
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", *isolation,
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, f"pip install failed:\n{out.stdout}\n{out.stderr}"
    env = env_without_proxies()
    for key in ("TTS_LB_CONFIG", "TTS_LB_BACKENDS", "PYTHONPATH", "PYTHONHOME"):
        env.pop(key, None)
    # uvloop, h11 and orjson come from this venv; lb and backends from DIR.
    env["PYTHONPATH"] = str(target)
    empty = base / "cwd"
    empty.mkdir()
    return SimpleNamespace(dir=target, program=target / "bin" / "tts-lb", env=env, cwd=empty,
                           packaged=target / "lb" / "lb.toml")


def _run(installed, *args: str, env: dict | None = None, cwd: Path | None = None,
         timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
    """The installed program, as a user types it: `tts-lb ARGS` in `cwd`."""
    return subprocess.run([str(installed.program), *args], cwd=cwd or installed.cwd,
                          env={**installed.env, **(env or {})}, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL,
                          **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs})


def _start(installed, *args: str, env: dict | None = None, cwd: Path | None = None) -> Process:
    """The installed program serving; its output collected by conftest's Process."""
    workdir = str(cwd or installed.cwd)
    # Process runs `python ARGS` in the clone; chdir in the child (after
    # Popen's own cwd) makes it run in `workdir` as a user would.
    return Process([str(installed.program), *args], env={**installed.env, **(env or {})},
                   preexec_fn=lambda: os.chdir(workdir))


def _port(lb: Process) -> int:
    return int(lb.wait_for_line(r"listening on 127\.0\.0\.1:(\d+)").group(1))


def _stop(lb: Process) -> None:
    code = lb.stop()
    output = lb.output()
    assert "Traceback" not in output, output
    assert code == 0, f"tts-lb exited {code}:\n{output}"


def _config(path: Path, port: int = 0, backends: Sequence[tuple[str, str]] = (("file0", DEAD),),
            extra: str = "") -> Path:
    """A config file listening on 127.0.0.1:`port` before `backends` (name, URL)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[listen]\naddress = "127.0.0.1:{port}"\n{extra}' + "".join(
        f'[[backend]]\nname = "{name}"\nurl = "{url}"\n' for name, url in backends))
    return path


def _packaged_ok(installed) -> str:
    return f"{installed.packaged}: ok (2 backend(s), listen 0.0.0.0:6095)"


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


# --- the install itself


def test_the_program_under_test_is_the_installed_one_not_the_clone(installed):
    out = subprocess.run(
        [sys.executable, "-c", "import lb, lb.control.config_file, backends; "
         "print(lb.__file__); print(backends.__file__); print(lb.control.config_file.PACKAGED_PATH)"],
        cwd=installed.cwd, env=installed.env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    for line in out.stdout.splitlines():
        path = Path(line).resolve()
        assert path.is_relative_to(installed.dir.resolve()), line
        assert not path.is_relative_to(ROOT), line
    assert installed.program.is_file() and os.access(installed.program, os.X_OK)
    assert installed.packaged.is_file()


# --- the packaged default, --print-config


def test_check_in_an_empty_directory_uses_the_packaged_default(installed):
    if os.path.exists(SYSTEM_PATH):
        pytest.skip(f"{SYSTEM_PATH} exists on this machine and comes before the packaged default")
    assert not (installed.cwd / "conf").exists()
    out = _run(installed, "--check")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [_packaged_ok(installed)]
    assert "Traceback" not in out.stderr


def test_print_config_is_the_documented_default_and_checks_as_it_is(installed, tmp_path):
    clone_conf = ROOT / "conf" / "lb.toml"
    assert clone_conf.is_symlink() and clone_conf.resolve() == (ROOT / "lb" / "lb.toml").resolve()
    # `tts-lb --print-config > lb.toml`
    with open(tmp_path / "lb.toml", "w") as redirected:
        out = _run(installed, "--print-config", cwd=tmp_path, stdout=redirected)
    assert out.returncode == 0 and out.stderr == ""
    printed = (tmp_path / "lb.toml").read_text()
    assert printed == clone_conf.read_text() == installed.packaged.read_text()
    assert printed.startswith("# tts-lb configuration")
    out = _run(installed, "--check", "-c", "lb.toml", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["lb.toml: ok (2 backend(s), listen 0.0.0.0:6095)"]


# --- which file runs


@pytest.fixture
def three_configs(tmp_path):
    """A working directory with ./conf/lb.toml, plus a file for $TTS_LB_CONFIG
    and one for -c: each listens on its own port, so the output tells them apart."""
    work = tmp_path / "work"
    _config(work / "conf" / "lb.toml", 7101)
    return SimpleNamespace(work=work, env=_config(tmp_path / "env.toml", 7102),
                           cli=_config(tmp_path / "cli.toml", 7103))


def test_lookup_order_c_then_env_then_local_then_packaged(installed, three_configs):
    c = three_configs
    cases = [
        (["-c", str(c.cli)], {"TTS_LB_CONFIG": str(c.env)}, f"{c.cli}", 7103),
        ([], {"TTS_LB_CONFIG": str(c.env)}, f"{c.env}", 7102),
        ([], {}, "conf/lb.toml", 7101),
    ]
    for args, env, path, port in cases:
        out = _run(installed, "--check", *args, env=env, cwd=c.work)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == [f"{path}: ok (1 backend(s), listen 127.0.0.1:{port})"], \
            (args, env)
    if os.path.exists(SYSTEM_PATH):
        pytest.skip(f"{SYSTEM_PATH} exists on this machine and comes before the packaged default")
    shutil.rmtree(c.work / "conf")
    out = _run(installed, "--check", cwd=c.work)
    assert out.stdout.splitlines() == [_packaged_ok(installed)]


@pytest.mark.parametrize("source", ["-c", "$TTS_LB_CONFIG", "./conf/lb.toml"])
def test_start_up_log_names_the_file_and_why(installed, tmp_path, source):
    work = tmp_path / "work"
    local = _config(work / "conf" / "lb.toml", backends=[("local", DEAD)])
    named = _config(tmp_path / "named.toml", backends=[("named", DEAD)])
    args, env, path, name = {
        "-c": (["-c", str(named)], {"TTS_LB_CONFIG": str(local.resolve())}, str(named), "named"),
        "$TTS_LB_CONFIG": ([], {"TTS_LB_CONFIG": str(named)}, str(named), "named"),
        "./conf/lb.toml": ([], {}, "conf/lb.toml", "local"),
    }[source]
    lb = _start(installed, *args, env=env, cwd=work)
    try:
        _port(lb)
        line = lb.wait_for_line(r"configuration (\S+) \((.+?)\)")
        assert (line.group(1), line.group(2)) == (path, source)
        assert lb.wait_for_line(r"listening on .* backend\(s\): (\w+)=").group(1) == name
    finally:
        _stop(lb)


def test_a_named_file_that_is_missing_is_exit_2_without_falling_through(installed, three_configs):
    missing = str(three_configs.work / "nope.toml")
    for args, env in ((["-c", missing], {}), ([], {"TTS_LB_CONFIG": missing})):
        # ./conf/lb.toml is right there: falling through to it would be wrong.
        out = _run(installed, "--check", *args, env=env, cwd=three_configs.work)
        assert out.returncode == 2, (args, env, out.stdout)
        assert out.stdout == ""
        line = _one_line(out.stderr)
        assert missing in line and "no such file" in line


def test_an_empty_tts_lb_config_is_exit_2_naming_it(installed, three_configs):
    out = _run(installed, "--check", env={"TTS_LB_CONFIG": ""}, cwd=three_configs.work)
    assert out.returncode == 2 and out.stdout == ""
    assert "TTS_LB_CONFIG" in _one_line(out.stderr)


# --- the demo, from an empty directory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo(installed, tmp_path_factory):
    config = tmp_path_factory.mktemp("demo") / "demo.toml"
    # As the shipped file: two Chatterbox servers, their own route and the OpenAI door.
    config.write_text('[listen]\naddress = "127.0.0.1:0"\n' + "".join(
        f'[[backend]]\nname = "gpu{i}"\nurl = "http://127.0.0.1:{_free_port()}"\n'
        'api = "chatterbox"\n' for i in range(2))
        + '[[route]]\npath = "/synthesize-json"\nkind = "chatterbox"\n'
        + '[[route]]\npath = "/v1/audio/speech"\nkind = "openai"\n')
    lb = _start(installed, "--demo", "-c", str(config))
    try:
        port = _port(lb)
        lb.wait_for_line(r"demo: and ")
        yield SimpleNamespace(lb=lb, port=port)
    finally:
        _stop(lb)


def test_demo_from_an_empty_directory_answers_a_chatterbox_round_trip(demo):
    lines = demo.lb.output().splitlines()
    assert len([line for line in lines if "demo backend gpu" in line and " started: " in line]) == 2
    listening = next(i for i, line in enumerate(lines) if "listening on" in line)
    tries = [i for i, line in enumerate(lines) if "demo: " in line]
    assert len(tries) == 4 and min(tries) > listening, "\n".join(lines)
    conn = http.client.HTTPConnection("127.0.0.1", demo.port, timeout=10)
    try:
        _, audio = two_step_call(conn, "Hello there.")
        assert audio[:4] == b"RIFF" and audio[8:12] == b"WAVE"
        # The same Chatterbox servers through the OpenAI door (the demo's third line).
        conn.request("POST", "/v1/audio/speech", json.dumps(
            {"input": "Hello there.", "voice": "alloy", "response_format": "wav"}))
        reply = conn.getresponse()
        audio = reply.read()
        assert reply.status == 200 and reply.getheader("content-type") == "audio/wav"
        assert audio[:4] == b"RIFF" and audio[8:12] == b"WAVE" and len(audio) > 44
    finally:
        conn.close()


def test_demo_try_lines_name_the_port_it_listens_on(demo):
    tries = [line for line in demo.lb.output().splitlines() if "demo: " in line]
    for line in tries:
        assert re.search(rf"http://127\.0\.0\.1:{demo.port}[/<]", line), line


# --- --help and bad options


def test_help_describes_the_program_and_every_option_with_its_default(installed):
    out = subprocess.run([str(installed.program), "--help"], cwd=installed.cwd, env=installed.env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stderr == ""
    text = out.stdout
    assert text.startswith("usage: tts-lb ")
    assert "load balancer for fleets of GPU text-to-speech servers" in text
    # Option entries: a line starting "  -", continued by deeper-indented lines.
    options = text.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    entries = re.split(r"\n(?=  -)", options)
    by_flag = {re.findall(r"--[\w-]+", entry)[0]: " ".join(entry.split()) for entry in entries}
    assert set(by_flag) == {"--help", "--config", "--check", "--print-config", "--backend",
                            "--demo", "--workers", "--http", "--version"}
    assert by_flag["--config"].startswith("-c FILE, --config FILE")
    # --help and --version print something and exit: nothing to default.
    for flag, entry in by_flag.items():
        if flag not in ("--help", "--version"):
            assert "(default: " in entry, entry
    # The epilog tells the lookup order and where backends come from.
    for words in ("$TTS_LB_CONFIG", "./conf/lb.toml", SYSTEM_PATH, "TTS_LB_BACKENDS", "SIGHUP"):
        assert words in text


@pytest.mark.parametrize("args, named", [
    (["--workers", "x"], "--workers"),
    (["--workers", "0"], "--workers"),
    (["--bogus"], "--bogus"),
])
def test_a_bad_option_is_one_line_and_exit_2(installed, args, named):
    out = _run(installed, *args)
    assert out.returncode == 2 and out.stdout == ""
    line = _one_line(out.stderr)
    assert line.startswith("tts-lb: ") and named in line


# --- backends from the environment or the command line


def _balanced_to(port: int, count: int = 8) -> set[int]:
    """The backend ports that answered `count` requests through the balancer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    answered = set()
    try:
        for _ in range(count):
            conn.request("GET", "/headers")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            answered.add(int(resp.getheader("X-Backend-Port")))
    finally:
        conn.close()
    return answered


# Not the defaults (least_conn, 4): with the backends replaced, these still apply.
FILE_SETTINGS = '[balancer]\npolicy = "round_robin"\nmax_concurrency = 3\n'


@pytest.mark.parametrize("via", ["TTS_LB_BACKENDS", "--backend"])
def test_backends_from_the_environment_or_options_replace_the_files(installed, tmp_path,
                                                                   start_backend, via):
    one, two = start_backend(), start_backend()
    # The file's own backends are dead: a request sent to one would fail.
    config = _config(tmp_path / "lb.toml", extra=FILE_SETTINGS,
                     backends=[("file0", DEAD), ("file1", "http://127.0.0.1:10")])
    entries = [one.url, f"gpu9={two.url}"]
    if via == "TTS_LB_BACKENDS":
        args, env = [], {"TTS_LB_BACKENDS": ",".join(entries)}
    else:   # --backend wins over TTS_LB_BACKENDS, which names dead ports
        args = [arg for entry in entries for arg in ("--backend", entry)]
        env = {"TTS_LB_BACKENDS": f"{DEAD},other=http://127.0.0.1:10"}
    check = _run(installed, "--check", "-c", str(config), *args, env=env)
    assert check.returncode == 0, check.stderr
    assert check.stdout.splitlines() == [
        f"{config}: ok (2 backend(s) from {via}, listen 127.0.0.1:0)"]
    lb = _start(installed, "-c", str(config), *args, env=env)
    try:
        port = _port(lb)
        lb.wait_for_line(rf"configuration {re.escape(str(config))} \(-c\); backends from {via}")
        stats = get_json(port, "/lb-stats")
        assert [(b["name"], b["url"]) for b in stats["backends"]] == [
            (f"127.0.0.1-{one.port}", one.url), ("gpu9", two.url)]
        # Everything else is still the file's.
        assert stats["policy"] == "round_robin"
        assert [b["max_concurrency"] for b in stats["backends"]] == [3, 3]
        assert _balanced_to(port) == {one.port, two.port}
        assert one.stats()["requests_total"] >= 1 and two.stats()["requests_total"] >= 1
    finally:
        _stop(lb)


@pytest.mark.parametrize("args, env, named", [
    ([], {"TTS_LB_BACKENDS": "http://a:1,ftp://b:2"}, "TTS_LB_BACKENDS entry 2 'ftp://b:2'"),
    (["--backend", "gpu=http://h"], {}, "--backend 'gpu=http://h'"),
    ([], {"TTS_LB_BACKENDS": ","}, "TTS_LB_BACKENDS"),
])
def test_a_bad_backend_entry_stops_the_start_with_one_line(installed, tmp_path, args, env, named):
    config = _config(tmp_path / "lb.toml")
    # Serving, not --check: a bad entry must stop the start (a hang would time out here).
    out = _run(installed, "-c", str(config), *args, env=env, timeout=20)
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    line = _one_line(out.stderr)
    assert line.startswith("lb: config error: ") and named in line
    if "--backend" in args:
        assert "port" in line
