"""The benchmarks' processes: start services in their own sessions, stop every one of them.

Both benchmarks (bench.throughput, and bench.concurrency through bench.fleet and
bench.proxies) start servers, proxies and load generators as child processes, and must
leave none behind whatever happens: an error, Ctrl-C, SIGTERM, or the benchmark itself
being SIGKILLed.  So every child runs in its own session (its process group can be
killed whole) with a parent-death signal, and Services stops them newest first, with
SIGKILL after a bounded wait.  Temp dirs hold our pid so that the next run can remove
the ones a killed run left behind.  bench.throughput re-exports these names.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
START_TIMEOUT = 20.0      # a service must be ready within this
STOP_TIMEOUT = 10.0       # after the stop signal, before SIGKILL
TMP_PREFIX = "tts-lb-bench-"
RESULTS_BASE = "bench-results"   # results go under ./bench-results/, never inside the package


class BenchError(Exception):
    """Something went wrong that the user should read about; exit code 1."""


class Stop(BaseException):
    """SIGTERM/SIGHUP received: unwind like Ctrl-C so everything gets stopped."""


def log(msg: str) -> None:
    """A progress line on stderr, so that stdout holds only the results."""
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def pdeathsig():
    """Child side (preexec_fn): die with SIGTERM if the benchmark itself is killed."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


try:
    import ctypes
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _PRCTL = None


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    log_path: Path
    stop_signal: int = signal.SIGTERM
    port: int = 0
    returncode: int | None = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in text.splitlines()[-lines:]) or "    (empty log)"


class Services:
    """Starts services in their own sessions and stops every one of them, newest first."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.running: list[Service] = []

    def start(self, name: str, argv: list[str], *, stop_signal=signal.SIGTERM) -> Service:
        log_path = self.tmp / f"{name}.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=pdeathsig)
        svc = Service(name, proc, log_path, stop_signal)
        self.running.append(svc)
        return svc

    def start_on_free_port(self, name: str, argv_for_port: Callable[[int], list[str]],
                           *, stop_signal=signal.SIGTERM) -> Service:
        """Start a service that binds a port we choose (nginx, HAProxy): pick a free port,
        `argv_for_port(port)` writes its config and gives the command, then wait until it
        accepts.  The port could be taken between the probe and the bind: retry twice."""
        for attempt in range(3):
            port = free_port()
            svc = self.start(name, argv_for_port(port), stop_signal=stop_signal)
            try:
                self.wait_port(svc, port)
            except BenchError:
                if svc.proc.poll() is not None and attempt < 2:
                    self.stop(svc)
                    continue
                raise
            svc.port = port
            return svc
        raise AssertionError("unreachable")

    def wait_log(self, svc: Service, pattern: str, timeout: float = START_TIMEOUT) -> re.Match:
        """Wait until the service's log matches `pattern` (a regex)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            try:
                match = rx.search(svc.log_path.read_text(errors="replace"))
            except OSError:
                match = None
            if match:
                return match
            self._check_alive(svc)
            if time.monotonic() > deadline:
                raise BenchError(f"{svc.name} did not start within {timeout:.0f} s; its log:\n"
                                 f"{svc.log_tail()}")
            time.sleep(0.05)

    def wait_port(self, svc: Service, port: int, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((HOST, port), timeout=0.5).close()
                return
            except OSError:
                pass
            self._check_alive(svc)
            if time.monotonic() > deadline:
                raise BenchError(f"{svc.name} did not accept connections on {HOST}:{port} "
                                 f"within {timeout:.0f} s; its log:\n{svc.log_tail()}")
            time.sleep(0.05)

    @staticmethod
    def _check_alive(svc: Service) -> None:
        if svc.proc.poll() is not None:
            raise BenchError(f"{svc.name} exited with code {svc.proc.returncode} while starting; "
                             f"its log:\n{svc.log_tail()}")

    def stop(self, svc: Service, timeout: float = STOP_TIMEOUT) -> int:
        """Signal the service's process group, wait, SIGKILL if needed. Returns the exit code."""
        if svc in self.running:
            self.running.remove(svc)
        proc = svc.proc
        if proc.poll() is None:
            _killpg(proc.pid, svc.stop_signal)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"bench: {svc.name} ignored signal {svc.stop_signal} for {timeout:.0f} s: "
                      "killing it", file=sys.stderr)
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        _killpg(proc.pid, signal.SIGKILL)  # anything it left behind in its group
        svc.returncode = proc.returncode
        return proc.returncode

    def stop_all(self) -> None:
        for svc in reversed(list(self.running)):
            try:
                code = self.stop(svc)
                if code not in (0, -svc.stop_signal):  # haproxy -db dies of SIGTERM: fine
                    print(f"bench: note: {svc.name} exited with code {code} when stopped",
                          file=sys.stderr)
            except Exception as exc:  # keep stopping the others
                print(f"bench: could not stop {svc.name} (pid {svc.proc.pid}): {exc}",
                      file=sys.stderr)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)  # the group of a child started with start_new_session=True
    except (ProcessLookupError, PermissionError):
        pass


def make_tmp() -> Path:
    """A fresh temp dir holding our pid; dirs left by a killed run (dead pid) are removed."""
    base = Path(tempfile.gettempdir())
    for old in base.glob(TMP_PREFIX + "*"):
        try:
            pid = int((old / "bench.pid").read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)  # its benchmark is gone (SIGKILL?)
        except (OSError, ValueError):
            pass  # not ours to judge: no pid file yet, or someone else's
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    (tmp / "bench.pid").write_text(f"{os.getpid()}\n")
    return tmp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def tool_version(argv: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    match = re.search(pattern, out.stdout + out.stderr)
    return match.group(1) if match else "?"
