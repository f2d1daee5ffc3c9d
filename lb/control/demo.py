"""`python -m lb --demo`: a stand-in fleet for a first run without GPU servers.

Starts one simulated Chatterbox GPU server per configured backend URL on
127.0.0.1 (the defaults: 6093 and 6094) as child processes, then the
balancer runs as usual.  The stand-ins are separate programs
(`python -m backends.chatterbox`, 2 slots, real WAV audio); the balancer
does not import them.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from .config import Config

log = logging.getLogger("lb")

START_TIMEOUT = 10.0


@contextmanager
def demo_fleet(config: Config) -> Iterator[None]:
    children: list[subprocess.Popen] = []
    try:
        for backend in config.backends:
            if backend.host not in ("127.0.0.1", "localhost", "::1"):
                raise SystemExit(f"lb: --demo runs backends on this machine only; "
                                 f"{backend.name} is at {backend.url}")
            child = subprocess.Popen(
                [sys.executable, "-m", "backends.chatterbox", "--host", backend.host,
                 "--port", str(backend.port), "--load-time", "0"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            children.append(child)
            output = _until_listening(child)
            if output is not None:
                last = output.strip().splitlines()[-1:] or ["no output"]
                raise SystemExit(f"lb: demo backend for {backend.name} did not start on port "
                                 f"{backend.port}: {last[0]}")
            log.info("demo backend %s started: %s (pid %d)", backend.name, backend.url, child.pid)
        yield
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()


def _until_listening(child: subprocess.Popen) -> str | None:
    """None once the child says it is listening, else what it printed."""
    seen = b""
    deadline = time.monotonic() + START_TIMEOUT
    fd = child.stdout.fileno()
    while (remaining := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            break
        data = os.read(fd, 4096)
        if not data:
            break  # it exited
        seen += data
        if b"listening on" in seen:
            return None
    return seen.decode("utf-8", "replace")


def what_to_try(config: Config, port: int) -> list[str]:
    """Printed once the balancer listens on `port` (the one it bound, which
    listen.address may leave to the kernel), so the first curl finds it."""
    host = config.listen.host
    host = ("127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else
            f"[{host}]" if ":" in host else host)
    base = f"http://{host}:{port}"
    door = next((r.path for r in config.routes if r.speech is not None), None)
    openai = [f"demo: or   curl -s -o hello.wav {base}{door} -d '{{\"input\":"
              f"\"Hello there.\",\"voice\":\"alloy\",\"response_format\":\"wav\"}}'"] \
        if door else []
    return [
            f"demo: try  curl -s -XPOST {base}/synthesize-json -d '{{\"text\":\"Hello there.\"}}'",
            f"demo: then curl -s -o hello.wav {base}<the audio_url it answered>",
            *openai,
            f"demo: and  curl -s {base}/lb-stats ; curl -s {base}/metrics"]
