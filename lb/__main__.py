"""tts-lb: a load balancer for fleets of GPU text-to-speech servers.

It keeps every GPU server inside its limit of calls at once, queues the
rest, streams audio through as it is made, steps around a sick server,
retries elsewhere and, when the fleet cannot serve a call, hands it to
Cartesia.  Point your TTS client at it (port 6095 by default).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from . import __version__
from .control import logsetup
from .control.config import Config, ConfigError, warnings_for
from .control.config_file import (ENV_CONFIG, LOCAL_PATH, SYSTEM_PATH, Loader, find,
                          packaged_default)
from .control.config_values import worker_count
from .control.fdlimit import FdLimit, raise_nofile
from .wire import engines

log = logging.getLogger("lb")

HANDLED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
REPEAT_WINDOW = 1.0   # seconds: a stop signal again this soon is the same one, twice
SMALL_CAP = 100  # below this many client connections, the fd budget deserves a warning

EPILOG = f"""\
configuration: the first of -c FILE, ${ENV_CONFIG}, ./{LOCAL_PATH},
{SYSTEM_PATH}, and the documented default shipped with tts-lb
(see --print-config).
backends: --backend, else TTS_LB_BACKENDS="[name=]URL,..." (e.g.
TTS_LB_BACKENDS=$CHATTTS_API_URLS), else the file's [[backend]] tables.
cluster: TTS_LB_REDIS_URL replaces [cluster] redis_url (slots shared with
the fleet's other balancers through Redis).
signals: SIGTERM/SIGINT drain and stop; SIGHUP reloads the file.
"""


class _Parser(argparse.ArgumentParser):
    """A bad option is one line naming it, and exit 2 (argparse prints the
    whole usage first, which buries the line that matters)."""

    def error(self, message: str) -> None:   # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _workers(text: str) -> int:
    try:
        return worker_count(text if text == "auto" else int(text) if text.isdigit() else text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _program_name() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m lb" if name in ("__main__.py", "-m", "") else name


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog=_program_name(), description=__doc__,
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", metavar="FILE", default=None,
                   help="configuration file (default: the first found, see below)")
    p.add_argument("--check", action="store_true",
                   help="validate the configuration, print warnings, and exit: 0 if "
                        "valid, 2 if not (default: off)")
    p.add_argument("--print-config", action="store_true",
                   help="print the documented default configuration and exit, e.g. "
                        "`tts-lb --print-config > lb.toml` (default: off)")
    p.add_argument("--backend", action="append", default=[], metavar="[NAME=]URL",
                   help="a backend, e.g. gpu0=http://10.0.0.5:10129; repeat for more; "
                        "replaces the file's [[backend]] list (default: TTS_LB_BACKENDS, "
                        "else the file's)")
    p.add_argument("--demo", action="store_true",
                   help="also start a simulated Chatterbox GPU server at each backend URL "
                        "(local ones only), for a first run without GPUs (default: off)")
    p.add_argument("--workers", type=_workers, default=0, metavar="N|auto",
                   help="worker processes, each with its own SO_REUSEPORT socket "
                        "(default: listen.workers from the file, 1 as shipped)")
    p.add_argument("--http", choices=engines.CHOICES, default=None,
                   help="HTTP engine: httptools (llhttp, C) or h11 (pure Python); auto = "
                        "httptools when installed (default: listen.http from the file, "
                        "auto as shipped)")
    p.add_argument("--version", action="version", version=f"tts-lb {__version__}",
                   help="print the version and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.print_config:
        sys.stdout.write(packaged_default())
        return 0
    try:
        source = find(args.config, os.environ)
        loader = Loader(source, args.backend, os.environ, http=args.http)
        config = loader.load()
    except ConfigError as exc:
        print(f"lb: config error: {exc}", file=sys.stderr)
        return 2
    warnings = warnings_for(config, os.environ)
    if args.check:
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"{source.path}: ok ({len(config.backends)} backend(s)"
              f"{' from ' + loader.backends_from if loader.backends_from else ''}, "
              f"listen {config.listen.host}:{config.listen.port}"
              + (f", slots shared through {config.cluster.shown_url} as fleet "
                 f"{config.cluster.fleet!r} of {config.cluster.replicas} replica(s)"
                 if config.cluster is not None else "") + ")")
        return 0

    logsetup.configure(config.log.level)
    log.info("tts-lb %s: configuration %s (%s)%s", __version__, source.path, source.why,
             f"; backends from {loader.backends_from}" if loader.backends_from else "")
    for warning in warnings:
        log.warning("config: %s", warning)
    fd = raise_nofile(config.limits.nofile)
    log.info("RLIMIT_NOFILE: asked %d, hard limit %d, was %d, granted %d%s", fd.asked, fd.hard,
             fd.soft_before, fd.granted, f" (raise failed: {fd.error})" if fd.error else "")
    workers = args.workers or config.listen.workers
    try:
        if args.demo:
            from .control.demo import demo_fleet
            with demo_fleet(config):
                return _start(config, fd, loader, workers, demo=True)
        return _start(config, fd, loader, workers)
    except KeyboardInterrupt:
        return 0


def _start(config: Config, fd: FdLimit, loader: Loader, workers: int, demo: bool = False) -> int:
    if workers <= 1:
        return _run(config, fd, loader, demo=demo)
    from .control.supervisor import supervise
    return supervise(config, workers,
                     lambda cfg: _run(cfg, fd, loader, reuse_port=True, demo=demo,
                                      processes=workers),
                     lambda: _load_for_reload(loader))


def _load_for_reload(loader: Loader) -> Config | None:
    try:
        return loader.load()
    except ConfigError:
        return None   # each worker logs why it refused the same file


def _run(config: Config, fd: FdLimit, loader: Loader, reuse_port: bool = False,
         demo: bool = False, processes: int = 1) -> int:
    import uvloop  # imported late so --check works without the event loop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve(config, fd, loader, reuse_port, demo, processes))


async def _serve(config: Config, fd: FdLimit, loader: Loader, reuse_port: bool,
                 demo: bool, processes: int) -> int:
    from .control.balancer import Balancer

    loop = asyncio.get_running_loop()
    balancer = Balancer(config, loop, fd, processes)
    if balancer.cap_note:
        log.warning("%s", balancer.cap_note)
    log.info("connection cap: %d client connections (%s)", balancer.max_connections,
             "derived from the fd limit" if config.limits.max_connections == 0
             else "limits.max_connections")
    if balancer.max_connections < SMALL_CAP and config.limits.max_connections == 0:
        log.warning("only %d client connections fit in %d descriptors: raise the hard "
                    "RLIMIT_NOFILE (LimitNOFILE= in systemd) or lower pool.max_idle",
                    balancer.max_connections, fd.granted)
    stop = asyncio.Event()
    signals = {"count": 0, "first": 0.0}

    def on_stop() -> None:
        # The first SIGTERM/SIGINT drains; a second one stops at once.  A
        # worker gets the same signal twice when it was sent to the whole
        # process group (Ctrl-C; systemd stopping the unit) and the
        # supervisor forwards it too: a repeat within REPEAT_WINDOW is that.
        now = loop.time()
        if signals["count"] and now - signals["first"] < REPEAT_WINDOW:
            return
        signals["count"] += 1
        signals["first"] = signals["first"] or now
        stop.set()

    # Handlers before the socket opens, so a signal sent as soon as we
    # listen is handled, not fatal.  A worker was forked with them blocked
    # (see supervisor.py): any that came meanwhile are delivered now.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    reloader = _Reloader(balancer, loader, loop)
    loop.add_signal_handler(signal.SIGHUP, reloader.request)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    try:
        balancer.start(reuse_port=reuse_port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.listen.host, config.listen.port,
                  exc.strerror or exc)
        return 1
    if demo and balancer.worker <= 1:
        from .control.demo import what_to_try
        for line in what_to_try(config, balancer.address[1]):   # only now: the port is open
            log.info("%s", line)
    await stop.wait()
    await _drain(balancer, signals)
    log.info("stopping")
    balancer.stop()
    return 0


class _Reloader:
    """SIGHUP: read and check the file off the event loop, so a file that is
    slow, huge or not a file at all cannot stall traffic; apply it only if
    it is good, else keep running the previous configuration.  A SIGHUP
    while a reload is under way runs one more after it."""

    def __init__(self, balancer, loader: Loader, loop: asyncio.AbstractEventLoop):
        self.balancer, self.loader, self.loop = balancer, loader, loop
        self.running = False
        self.again = False

    def request(self) -> None:
        if self.running:
            self.again = True
            return
        self.running = True
        future = self.loop.run_in_executor(None, self.loader.load)
        future.add_done_callback(self._loaded)

    def _loaded(self, future: asyncio.Future) -> None:
        self.running = False
        try:
            new = future.result()
        except ConfigError as exc:
            log.error("reload refused, still running the previous configuration: %s", exc)
        except BaseException as exc:   # whatever it was, traffic goes on as before
            log.error("reload refused, still running the previous configuration: %s",
                      type(exc).__name__)
        else:
            for warning in warnings_for(new, os.environ):
                log.warning("config: %s", warning)
            try:
                self.balancer.reload(new)
            except Exception as exc:
                log.error("reload failed while applying it (%s): %s", type(exc).__name__, exc)
        if self.again:
            self.again = False
            self.request()


async def _drain(balancer, signals: dict) -> None:
    """Stop accepting, let what is under way finish (streams included), for
    at most listen.drain_timeout."""
    timeout = balancer.config.listen.drain_timeout
    balancer.drain()
    log.info("draining: %d request(s) under way, %d connection(s) open; up to %gs",
             balancer.in_flight, len(balancer.connections), timeout)
    deadline = asyncio.get_running_loop().time() + timeout
    loop = asyncio.get_running_loop()
    while balancer.in_flight or balancer.connections:
        if signals["count"] > 1:
            log.warning("second signal: stopping now with %d request(s) under way",
                        balancer.in_flight)
            return
        if loop.time() >= deadline:
            log.warning("drain timeout (listen.drain_timeout %gs): cutting %d request(s)",
                        timeout, balancer.in_flight)
            return
        await asyncio.sleep(0.05)
    log.info("drained")


if __name__ == "__main__":
    sys.exit(main())
