"""Command line: `python -m lb [-c PATH] [--check]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from . import __version__
from .config import DEFAULT_PATH, Config, ConfigError, load
from .fdlimit import FdLimit, raise_nofile

log = logging.getLogger("lb")

SMALL_CAP = 100  # below this many client connections, the fd budget deserves a warning


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lb", description=__doc__)
    parser.add_argument("-c", "--config", default=DEFAULT_PATH,
                        help=f"configuration file (default {DEFAULT_PATH})")
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration and exit (0 if valid, 2 if not)")
    parser.add_argument("--demo", action="store_true",
                        help="also start simulated backends at the configured local URLs "
                             "(no GPU servers needed)")
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
    try:
        if args.demo:
            from .demo import demo_fleet
            with demo_fleet(config):
                return _run(config, fd)
        return _run(config, fd)
    except KeyboardInterrupt:
        return 0


def _run(config: Config, fd: FdLimit) -> int:
    import uvloop  # imported late so --check works without the event loop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve(config, fd))


async def _serve(config: Config, fd: FdLimit) -> int:
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
    try:
        balancer.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.listen.host, config.listen.port,
                  exc.strerror or exc)
        return 1
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    balancer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
