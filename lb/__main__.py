"""Command line: `python -m lb [-c PATH] [--check]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from . import __version__
from .config import DEFAULT_PATH, Config, ConfigError, load, worker_count
from .fdlimit import FdLimit, raise_nofile

log = logging.getLogger("lb")

HANDLED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
REPEAT_WINDOW = 1.0   # seconds: a stop signal again this soon is the same one, twice
SMALL_CAP = 100  # below this many client connections, the fd budget deserves a warning


def _worker_count(text: str) -> int:
    try:
        return worker_count(text if text == "auto" else int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lb", description=__doc__)
    parser.add_argument("-c", "--config", default=DEFAULT_PATH,
                        help=f"configuration file (default {DEFAULT_PATH})")
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration and exit (0 if valid, 2 if not)")
    parser.add_argument("--demo", action="store_true",
                        help="also start simulated backends at the configured local URLs "
                             "(no GPU servers needed)")
    parser.add_argument("--workers", type=_worker_count, default=0, metavar="N|auto",
                        help="worker processes, each with its own SO_REUSEPORT socket "
                             "(default: listen.workers)")
    parser.add_argument("--version", action="version", version=f"tts-lb {__version__}")
    args = parser.parse_args(argv)

    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"lb: config error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config}: ok ({len(config.backends)} backend(s), "
              f"listen {config.listen.host}:{config.listen.port})")
        return 0

    logging.basicConfig(level=config.log.level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fd = raise_nofile(config.limits.nofile)
    log.info("RLIMIT_NOFILE: asked %d, hard limit %d, was %d, granted %d%s", fd.asked, fd.hard,
             fd.soft_before, fd.granted, f" (raise failed: {fd.error})" if fd.error else "")
    workers = args.workers or config.listen.workers
    try:
        if args.demo:
            from .demo import demo_fleet
            with demo_fleet(config):
                return _start(config, fd, args.config, workers)
        return _start(config, fd, args.config, workers)
    except KeyboardInterrupt:
        return 0


def _start(config: Config, fd: FdLimit, config_path: str, workers: int) -> int:
    if workers <= 1:
        return _run(config, fd, config_path)
    from .supervisor import supervise
    return supervise(config, workers, lambda cfg: _run(cfg, fd, config_path, reuse_port=True),
                     lambda: _load_for_reload(config_path))


def _load_for_reload(config_path: str) -> Config | None:
    try:
        return load(config_path)
    except ConfigError:
        return None   # each worker logs why it refused the same file


def _run(config: Config, fd: FdLimit, config_path: str, reuse_port: bool = False) -> int:
    import uvloop  # imported late so --check works without the event loop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve(config, fd, config_path, reuse_port))


async def _serve(config: Config, fd: FdLimit, config_path: str, reuse_port: bool) -> int:
    from .balancer import Balancer

    loop = asyncio.get_running_loop()
    balancer = Balancer(config, loop, fd)
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
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload(balancer, config_path))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    try:
        balancer.start(reuse_port=reuse_port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.listen.host, config.listen.port,
                  exc.strerror or exc)
        return 1
    await stop.wait()
    await _drain(balancer, signals)
    log.info("stopping")
    balancer.stop()
    return 0


def _reload(balancer, config_path: str) -> None:
    """SIGHUP: apply the file as it is now, or keep the old configuration."""
    try:
        new = load(config_path)
    except ConfigError as exc:
        log.error("reload rejected, still running the previous configuration: %s", exc)
        return
    balancer.reload(new)


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
