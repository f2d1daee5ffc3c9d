"""--profile for bench.throughput: one more balancer under cProfile, and its top functions.

Separate from the table because profiling slows the balancer down several times: its
req/s is only a reference.  lb is started as `python -m cProfile -o FILE -m lb` and stopped
with SIGINT, which lb handles by returning normally, so that cProfile gets to write its
file.  Each engine measured (--http) is profiled in turn.  The report names functions by
their path under the repository (or site-packages, or the stdlib) so that the rows stay
short and say whose code it is.
"""
from __future__ import annotations

import os
import pstats
import shutil
import sys
import sysconfig
from pathlib import Path

from bench.processes import ROOT, BenchError, Services, log
from bench.throughput_clients import Client
from bench.throughput_targets import Backend, start_lb

TOP_N = 25
PROFILE_STOP_TIMEOUT = 60.0  # cProfile writes its file on the way out


def run_profile(args, services: Services, tmp: Path, backend: Backend, client: Client) -> dict:
    """Each engine measured, profiled in turn: {engine: its profile}."""
    return {engine: _profile_engine(args, services, tmp, backend, client, engine)
            for engine in args.engines}


def _profile_engine(args, services: Services, tmp: Path, backend: Backend, client: Client,
                    engine: str) -> dict:
    prof_path = tmp / f"lb-{engine}.prof"
    log(f"starting lb --http {engine} under cProfile")
    svc = start_lb(services, tmp, backend.port, args.connections, engine, profile_path=prof_path)
    r = client.small(svc.port, backend.small_path, args.connections, args.duration)
    log(f"profiled run: {r.rps:,.0f} req/s; stopping lb with SIGINT so cProfile saves")
    code = services.stop(svc, timeout=PROFILE_STOP_TIMEOUT)
    if code != 0:
        print(f"bench: warning: the profiled lb exited with code {code} on SIGINT (expected 0); "
              f"its log:\n{svc.log_tail()}", file=sys.stderr)
    if not prof_path.exists():
        raise BenchError(f"cProfile wrote no profile (lb exit code {code}); its log:\n"
                         f"{svc.log_tail()}")
    if args.profile_out:
        out = Path(args.profile_out).expanduser()
        if len(args.engines) > 1:   # one file per engine: lb.prof -> lb-h11.prof
            out = out.with_name(f"{out.stem}-{engine}{out.suffix}")
        shutil.copyfile(prof_path, out)
        log(f"raw profile kept at {out} (python -m pstats {out})")
    top = profile_top(prof_path)
    print()
    print(f"profile of lb --http {engine} under cProfile: small workload, {args.duration} s, "
          f"c={args.connections}: {r.rps:,.0f} req/s with profiling overhead; "
          f"lb exit code on SIGINT: {code}")
    print("(tottime/cumtime in seconds, tt/call in microseconds; uvloop's transport methods "
          "are invisible to cProfile, so a caller's tottime includes e.g. the write syscall)")
    print(format_profile(top["cumulative"], f"top {TOP_N} by cumulative time:"))
    print()
    print(format_profile(top["tottime"], f"top {TOP_N} by own time (tottime):"))
    return {"rps": r.rps, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "lb_exit_code": code, **top}


def _short_path(filename: str) -> str:
    if filename == "~" or filename.startswith("<"):
        return filename if filename != "~" else ""
    path = Path(filename)
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        pass
    text = str(path)
    for marker in ("site-packages/", "dist-packages/"):
        if marker in text:
            return text.split(marker, 1)[1]
    stdlib = sysconfig.get_paths()["stdlib"]
    if text.startswith(stdlib + os.sep):
        return "stdlib/" + text[len(stdlib) + 1:]
    return text


def _func_label(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    where = _short_path(filename)
    return f"{where}:{line}({name})" if where else name  # built-ins: "<built-in method ...>"


def profile_top(path: Path, n: int = TOP_N) -> dict[str, list[dict]]:
    stats = pstats.Stats(str(path), stream=open(os.devnull, "w"))
    rows = []
    for func, (cc, nc, tt, ct, _callers) in stats.stats.items():
        rows.append({"function": _func_label(func), "ncalls": nc, "primitive_calls": cc,
                     "tottime_s": tt, "cumtime_s": ct})
    return {"cumulative": sorted(rows, key=lambda r: -r["cumtime_s"])[:n],
            "tottime": sorted(rows, key=lambda r: -r["tottime_s"])[:n],
            "total_s": stats.total_tt}


def format_profile(rows: list[dict], title: str) -> str:
    out = [title, f"  {'ncalls':>10} {'tottime':>9} {'cumtime':>9} {'tt/call':>8}  function"]
    for r in rows:
        per = r["tottime_s"] / r["ncalls"] * 1e6 if r["ncalls"] else 0.0
        out.append(f"  {r['ncalls']:>10} {r['tottime_s']:>9.3f} {r['cumtime_s']:>9.3f} "
                   f"{per:>8.2f}  {r['function']}")
    return "\n".join(out)
