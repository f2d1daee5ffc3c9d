"""`--workers N`: N balancer processes on one port, and a supervisor over them.

Each worker is forked before it creates anything of its own -- event loop,
listening socket (with SO_REUSEPORT, so the kernel spreads connections
evenly over the workers' sockets), backend pools -- and serves on its own.
The supervisor only starts workers, restarts one that dies (and says so),
and passes SIGTERM/SIGINT (drain, then exit) and SIGHUP (reload) on to them.

Each worker has its own counters, queue and health view: /lb-stats and
/health describe the worker that answered, and say which.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import time
import traceback
from typing import Callable

from .balancer import WORKER_ENV
from .config import Config

log = logging.getLogger("lb")

RESTART_PAUSE = 1.0    # a worker that dies this soon after starting waits this long to restart


HANDLED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def supervise(config: Config, workers: int, run_worker: Callable[[Config], int],
              reload_config: Callable[[], Config | None]) -> int:
    """Run `workers` forked workers until SIGTERM/SIGINT; `reload_config` is
    called on SIGHUP so that a worker started again later runs what the
    others reloaded (None: the file was refused, keep the last good one)."""
    reserve = None
    if config.listen.port == 0:
        # Every worker must bind the same port: choose it once, and hold it
        # (bound, not listening, so it takes no connections) while they run.
        reserve = _reserve_port(config.listen.host)
        port = reserve.getsockname()[1]
        config = dataclasses.replace(config, listen=dataclasses.replace(config.listen, port=port))
    tcp_ports: dict[str, socket.socket] = {}     # [[tcp]] name -> the port held for it
    config = _fixed_tcp_ports(config, tcp_ports)

    def let_ports_go() -> None:
        for held in [reserve, *tcp_ports.values()]:
            if held is not None:
                held.close()

    children: dict[int, tuple[int, float]] = {}    # pid -> (worker number, started)
    state = {"stopping": False, "config": config}
    port = config.listen.port

    def spawn(number: int) -> None:
        # Signals stay blocked from before the fork until the worker's event
        # loop has its handlers (lb.__main__._serve unblocks them): one sent
        # while it starts waits for it instead of killing it.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for sig in HANDLED:
                    signal.signal(sig, signal.SIG_DFL)
                _die_with_parent()
                os.environ[WORKER_ENV] = str(number)
                let_ports_go()
                code = run_worker(state["config"])
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        # Known before the signals are let through: a SIGTERM waiting to be
        # handled must be forwarded to this worker too.
        children[pid] = (number, time.monotonic())
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)

    def forward(sig: int, frame=None) -> None:
        if sig == signal.SIGHUP:
            new = reload_config()
            if new is not None:
                if new.listen.port != port:   # the port is fixed for the workers' life
                    new = dataclasses.replace(new, listen=dataclasses.replace(new.listen,
                                                                               port=port))
                state["config"] = _fixed_tcp_ports(new, tcp_ports)
        if sig in (signal.SIGTERM, signal.SIGINT):
            if state["stopping"] and sig == signal.SIGINT:
                return   # Ctrl-C reaches the workers too (same process group)
            state["stopping"] = True
        for pid in list(children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    for sig in HANDLED:
        signal.signal(sig, forward)
    for number in range(1, workers + 1):
        spawn(number)
    log.info("supervisor %d: %d workers on port %d", os.getpid(), workers, config.listen.port)
    failed = False
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            continue   # not a worker: a --demo backend (demo.py reports on those)
        number, started = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if state["stopping"]:
            failed |= code != 0
            continue
        how = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        log.warning("worker %d (pid %d) ended with %s: starting it again", number, pid, how)
        if time.monotonic() - started < RESTART_PAUSE:
            time.sleep(RESTART_PAUSE)   # do not spin on a worker that cannot start
        if not state["stopping"]:
            spawn(number)
    let_ports_go()
    log.info("supervisor: all workers stopped")
    return 1 if failed else 0


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker if the supervisor dies, so no worker is
    left serving the port on its own."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _fixed_tcp_ports(config: Config, held: dict[str, socket.socket]) -> Config:
    """[[tcp]] listeners on port 0 get one port for every worker, as the
    HTTP listener does: held (in `held`, by listener name) for the
    supervisor's life, so a reload keeps a listener on the port it has."""
    listeners = []
    for listener in config.tcp:
        if listener.port == 0:
            sock = held.get(listener.name)
            if sock is None or sock.family != _family(listener.host):
                sock = held[listener.name] = _reserve_port(listener.host)
            listener = dataclasses.replace(listener, port=sock.getsockname()[1])
        listeners.append(listener)
    return dataclasses.replace(config, tcp=tuple(listeners))


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _reserve_port(host: str) -> socket.socket:
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock
