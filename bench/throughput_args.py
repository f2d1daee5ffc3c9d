"""The command line of bench.throughput: its options, checked, with the --json default filled in.

A bad value is one line naming the option, exit 2 (argparse, via _Parser, which
bench.concurrency_args reuses); a path is checked here so that a typo fails before minutes
of measuring, not after.
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import time
from pathlib import Path

from bench.processes import RESULTS_BASE
from bench.throughput_clients import WORKLOADS
from bench.throughput_profile import TOP_N
from bench.throughput_targets import ENGINES

DEFAULT_WORKLOADS = (*WORKLOADS, "streams")
ALL_WORKLOADS = (*DEFAULT_WORKLOADS, "tunnel", "tcp")   # tunnel, tcp: bench.throughput_tunnel
MAX_STREAM_SECONDS = 600     # one stream's chunks x interval: every run stays bounded

JSON_DEFAULT = object()          # --json given without a PATH


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse already exits 2; make the message say how to get help
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n(see --help)\n")


def _int_range(lo: int, hi: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{what} must be between {lo} and {hi}, got {value}")
        return value
    return parse


def _workloads(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    for name in names:
        if name not in ALL_WORKLOADS:
            raise argparse.ArgumentTypeError(
                f"unknown workload {name!r}: choose from {', '.join(ALL_WORKLOADS)}, "
                "comma-separated")
        if names.count(name) > 1:
            raise argparse.ArgumentTypeError(f"workload {name!r} listed twice")
    return [w for w in ALL_WORKLOADS if w in names]   # always run in the same order


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m bench.throughput",
                description="Measure a fast local backend directly, through tts-lb and through "
                            "HAProxy, on 127.0.0.1 (see bench/README.md).")
    p.add_argument("--duration", type=_int_range(1, 600, "--duration"), default=5,
                   metavar="SECONDS", help="seconds per run (whole seconds, wrk's unit; default 5)")
    p.add_argument("--connections", type=_int_range(1, 1000, "--connections"), default=50,
                   metavar="N", help="keep-alive connections for the small-request workload "
                                     "(default 50)")
    p.add_argument("--repeat", type=_int_range(1, 50, "--repeat"), default=3, metavar="N",
                   help="runs per target and workload; the median is reported (default 3)")
    p.add_argument("--skip-haproxy", action="store_true", help="do not measure HAProxy")
    p.add_argument("--json", metavar="PATH", nargs="?", const=JSON_DEFAULT,
                   help="also write the results as JSON to PATH (with no PATH: "
                        f"./{RESULTS_BASE}/throughput-<timestamp>.json under the current "
                        "directory)")
    p.add_argument("--profile", action="store_true",
                   help="also run the balancer under cProfile during one small-request run and "
                        f"print the top {TOP_N} functions by cumulative and by own time")
    p.add_argument("--profile-out", metavar="PATH",
                   help="with --profile: keep the raw cProfile file at PATH (pstats format)")
    p.add_argument("--body-mib", type=_int_range(1, 4096, "--body-mib"), default=100,
                   metavar="MIB", help="size of the large streamed body in MiB (default 100)")
    p.add_argument("--large-connections", type=_int_range(1, 64, "--large-connections"),
                   default=4, metavar="N",
                   help="connections for the large-body workload (default 4)")
    p.add_argument("--backend", choices=("auto", "nginx", "echo"), default="auto",
                   help="auto: nginx if on PATH, else backends.echo (default auto)")
    p.add_argument("--client", choices=("auto", "wrk", "python"), default="auto",
                   help="auto: wrk if on PATH, else the Python client (default auto)")
    p.add_argument("--http", choices=(*ENGINES, "both"), default="both",
                   help="the balancer's HTTP engine (python -m lb --http ENGINE); both: measure "
                        "one balancer per engine in the same run (default both)")
    p.add_argument("--workloads", type=_workloads, default=list(DEFAULT_WORKLOADS),
                   metavar="W,W,...",
                   help=f"which workloads to run, from {', '.join(ALL_WORKLOADS)} "
                        f"(default {','.join(DEFAULT_WORKLOADS)})")
    p.add_argument("--streams", type=_int_range(1, 2000, "--streams"), default=200,
                   metavar="N", help="streams workload: concurrent streams per round "
                                     "(default 200)")
    p.add_argument("--stream-chunks", type=_int_range(1, 1000, "--stream-chunks"), default=20,
                   metavar="N", help="streams workload: chunks per stream (default 20)")
    p.add_argument("--stream-interval-ms", type=_int_range(1, 10_000, "--stream-interval-ms"),
                   default=50, metavar="MS",
                   help="streams workload: milliseconds between a stream's chunks (default 50)")
    p.add_argument("--stream-chunk-bytes", type=_int_range(32, 1 << 20, "--stream-chunk-bytes"),
                   default=2400, metavar="B",
                   help="streams workload: bytes per chunk (default 2400: 50 ms of 24 kHz "
                        "16-bit mono audio)")
    p.add_argument("--tunnel-connections", type=_int_range(1, 64, "--tunnel-connections"),
                   default=4, metavar="N",
                   help="tunnel and tcp workloads: parallel connections each way (default 4)")
    args = p.parse_args(argv)
    args.engines = list(ENGINES) if args.http == "both" else [args.http]

    if args.backend == "nginx" and not shutil.which("nginx"):
        p.error("--backend nginx: nginx is not on PATH (apt-get install -y nginx)")
    if args.client == "wrk" and not shutil.which("wrk"):
        p.error("--client wrk: wrk is not on PATH (apt-get install -y wrk)")
    if args.profile_out and not args.profile:
        p.error("--profile-out needs --profile")
    if args.profile and "small" not in args.workloads:
        p.error("--profile profiles the small workload: add small to --workloads")
    if "httptools" in args.engines and importlib.util.find_spec("httptools") is None:
        p.error(f"--http {args.http}: the httptools engine needs httptools, which is not "
                "installed (pip install httptools, or use --http h11)")
    stream_s = args.stream_chunks * args.stream_interval_ms / 1000
    if stream_s > MAX_STREAM_SECONDS:
        p.error(f"--stream-chunks x --stream-interval-ms: a stream may last at most "
                f"{MAX_STREAM_SECONDS} s, got {stream_s:g} s")
    for opt in ("json", "profile_out"):
        path = getattr(args, opt)
        if path is JSON_DEFAULT:   # under the cwd, never beside the code
            args.json = str(Path.cwd() / RESULTS_BASE /
                            f"throughput-{time.strftime('%Y%m%d-%H%M%S')}.json")
        elif path is not None:
            parent = Path(path).expanduser().resolve().parent
            if not parent.is_dir():
                p.error(f"--{opt.replace('_', '-')} {path}: directory {parent} does not exist")
            if Path(path).is_dir():
                p.error(f"--{opt.replace('_', '-')} {path}: is a directory")
    return args
