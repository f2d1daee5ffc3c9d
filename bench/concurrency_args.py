"""The command line of bench.concurrency: its options, checked, with their defaults filled in.

A bad value is one line naming the option, exit 2 (argparse, via bench.throughput's _Parser).
"""
from __future__ import annotations

import argparse
import math
import random
from pathlib import Path
from urllib.parse import urlsplit

from bench.openai_api import DEFAULT_CALLERS, DEFAULT_DURATION as DEFAULT_DURATION_API
from bench.processes import RESULTS_BASE
from bench.throughput_args import _Parser
from bench.world import (ALL_POLICIES, DEFAULT_CONCURRENCY, DEFAULT_DURATION_LB,
                         DEFAULT_DURATION_SIM, DEFAULT_POLICIES, DEFAULT_RTF, DEFAULT_TIME_SCALE,
                         NO_LIMIT)

def _int_in(lo: int, hi: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a whole number, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{what} must be from {lo} to {hi}, got {value}")
        return value
    return parse


def _float_in(lo: float, hi: float, what: str, *, lo_open: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
            bound = f"more than {lo:g}" if lo_open else f"at least {lo:g}"
            raise argparse.ArgumentTypeError(f"{what} must be {bound} and at most {hi:g}, "
                                             f"got {text}")
        return value
    return parse


def _levels(text: str) -> tuple[int, ...]:
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise argparse.ArgumentTypeError(f"--concurrency wants a comma-separated list of caller "
                                         f"counts like 10,20,40, got {text!r}")
    out = []
    for t in items:
        try:
            n = int(t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--concurrency: {t!r} is not a whole number "
                                             f"(want e.g. 10,20,40)") from None
        if not 1 <= n <= 2000:
            raise argparse.ArgumentTypeError(f"--concurrency: each level must be from 1 to 2000 "
                                             f"callers, got {n}")
        if n in out:
            raise argparse.ArgumentTypeError(f"--concurrency: {n} is listed twice")
        out.append(n)
    if len(out) > 20:
        raise argparse.ArgumentTypeError("--concurrency: at most 20 levels")
    return tuple(out)


def _policies(text: str) -> tuple[str, ...]:
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise argparse.ArgumentTypeError(f"--policies wants a comma-separated list from "
                                         f"{', '.join(ALL_POLICIES)}, got {text!r}")
    out = []
    for t in items:
        if t == "haproxy":
            raise argparse.ArgumentTypeError("--policies: haproxy is not a balancer policy; it "
                                             "runs beside them when installed (--no-haproxy "
                                             "leaves it out)")
        if t not in ALL_POLICIES:
            raise argparse.ArgumentTypeError(f"--policies: unknown policy {t!r}; choose from "
                                             f"{', '.join(ALL_POLICIES)}")
        if t in out:
            raise argparse.ArgumentTypeError(f"--policies: {t} is listed twice")
        out.append(t)
    return tuple(out)


def _lb_url(text: str) -> tuple[str, str, int]:
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--lb: cannot parse {text!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"--lb wants http://HOST:PORT (or https://), got {text!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise argparse.ArgumentTypeError(f"--lb wants scheme://host:port only, no path, got {text!r}")
    if port == 0:
        raise argparse.ArgumentTypeError(f"--lb: port 0 cannot be connected to, in {text!r}")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


FLEET_OPTIONS = ("policies", "backends", "slots", "oom_at", "spillover", "rtf", "no_haproxy")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m bench.concurrency",
                description="Closed-loop voice-agent calls at several concurrency levels against "
                            "a simulated GPU fleet behind tts-lb (each policy) and HAProxy, or "
                            "against a running balancer (--lb). See bench/README.md.")
    p.add_argument("--lb", metavar="URL", type=_lb_url,
                   help="measure this running balancer (e.g. a real fleet) instead of starting "
                        "a simulated one; only --concurrency, --duration, --seed, "
                        "--time-scale and --results apply then")
    p.add_argument("--concurrency", type=_levels, default=DEFAULT_CONCURRENCY, metavar="N,N,...",
                   help="concurrent callers per run (default 10,20,40)")
    p.add_argument("--policies", type=_policies, default=None, metavar="P,P,...",
                   help=f"balancer policies to run, from {', '.join(ALL_POLICIES)} "
                        f"({NO_LIMIT}: random with no per-backend limit, what apps do today) "
                        f"(default {','.join(DEFAULT_POLICIES)})")
    p.add_argument("--duration", type=_float_in(0, 3600, "--duration"), default=None,
                   metavar="SECONDS",
                   help=f"measured wall-clock seconds per run, after a warm-up (default "
                        f"{DEFAULT_DURATION_SIM:g}; {DEFAULT_DURATION_LB:g} with --lb)")
    p.add_argument("--backends", type=_int_in(1, 64, "--backends"), default=None, metavar="N",
                   help="simulated GPU servers (default 5)")
    p.add_argument("--slots", type=_int_in(1, 64, "--slots"), default=None, metavar="S",
                   help="calls one server computes at full speed; also the balancer's and "
                        "HAProxy's per-server limit (default 4)")
    p.add_argument("--oom-at", type=_int_in(0, 10_000, "--oom-at"), default=None, metavar="M",
                   help="a server crashes (out of memory) when asked for more than M "
                        "syntheses at once; 0: never (default 6)")
    p.add_argument("--rtf", type=_float_in(0, 100, "--rtf"), default=None, metavar="X",
                   help=f"GPU seconds per second of audio at full speed (default {DEFAULT_RTF:g})")
    p.add_argument("--spillover", action="store_true",
                   help="fallback.cartesia.spillover: calls that waited past the queue timeout "
                        "go to Cartesia instead of failing")
    p.add_argument("--no-haproxy", action="store_true", help="leave HAProxy out")
    p.add_argument("--seed", type=_int_in(0, 2**63 - 1, "--seed"), default=None, metavar="N",
                   help="seed for the callers' sentences, think times and start times "
                        "(default: a random one, printed)")
    p.add_argument("--time-scale", type=_float_in(0, 1, "--time-scale"), default=None,
                   metavar="F",
                   help=f"the simulated world runs at F x real time: GPU work, crash downtime, "
                        f"playing and thinking, and the GPU-related timeouts (default "
                        f"{DEFAULT_TIME_SCALE:g}; 1 with --lb, where only playing and thinking "
                        f"are ours to scale)")
    p.add_argument("--replicas", type=_int_in(1, 8, "--replicas"), default=1, metavar="N",
                   help="N balancer replicas in front of the fleet, callers spread over them, "
                        "sharing slots through a redis-server the bench starts (default 1: "
                        "one balancer per policy, beside HAProxy)")
    p.add_argument("--no-cluster", action="store_true",
                   help="with --replicas: only the replicas without [cluster] (each counts "
                        "only its own calls); the default runs both, with and without")
    p.add_argument("--api", choices=("openai",), default=None,
                   help="openai: POST /v1/audio/speech through the OpenAI front door to the "
                        "Chatterbox fleet, short and long text, [route.split] on and off "
                        "(bench/openai_api.py)")
    p.add_argument("--callers", type=_int_in(1, 2000, "--callers"), default=None, metavar="N",
                   help=f"with --api openai: concurrent callers (default {DEFAULT_CALLERS})")
    p.add_argument("--results", metavar="DIR",
                   help=f"write results.json, latency.png and the configs used here "
                        f"(default ./{RESULTS_BASE}/concurrency-<timestamp>/, under the "
                        f"current directory)")
    args = p.parse_args(argv)

    if args.no_cluster and args.replicas < 2:
        p.error("--no-cluster: only with --replicas 2 or more")
    if args.replicas > 1 and args.lb is not None:
        p.error("--replicas: the bench starts the replicas itself; not with --lb")
    if args.callers is not None and args.api is None:
        p.error("--callers: only with --api openai (the other modes take --concurrency)")
    if args.api is not None and (args.lb is not None or args.replicas > 1):
        p.error("--api: starts its own fleet and one balancer; not with --lb or --replicas")
    args.ignored = []
    if args.lb is not None:
        args.ignored = [f"--{name.replace('_', '-')}" for name in FLEET_OPTIONS
                        if getattr(args, name) not in (None, False)]
    if args.api is not None:
        args.ignored = [f"--{name.replace('_', '-')}" for name in ("policies", "spillover",
                                                                    "no_haproxy")
                        if getattr(args, name) not in (None, False)]
        args.ignored += ["--concurrency"] if args.concurrency != DEFAULT_CONCURRENCY else []
    args.callers = args.callers if args.callers is not None else DEFAULT_CALLERS
    args.policies = args.policies or DEFAULT_POLICIES
    args.backends = args.backends if args.backends is not None else 5
    args.slots = args.slots if args.slots is not None else 4
    args.oom_at = args.oom_at if args.oom_at is not None else 6
    args.rtf = args.rtf if args.rtf is not None else DEFAULT_RTF
    if args.duration is None:
        args.duration = (DEFAULT_DURATION_LB if args.lb else
                         DEFAULT_DURATION_API if args.api else DEFAULT_DURATION_SIM)
    if args.time_scale is None:
        args.time_scale = 1.0 if args.lb else DEFAULT_TIME_SCALE
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 1_000_000)
    if args.results is not None:
        path = Path(args.results).expanduser()
        if path.exists() and not path.is_dir():
            p.error(f"--results {args.results}: exists and is not a directory")
        if not path.resolve().parent.is_dir():
            p.error(f"--results {args.results}: directory {path.resolve().parent} does not exist")
    return args


