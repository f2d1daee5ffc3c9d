"""How many concurrent voice-agent calls can a fleet serve, at what latency, under each policy?

Run it:   python -m bench.concurrency [--concurrency 10,20,40] [--policies ...]
                                      [--duration S] [--backends N --slots S --oom-at M]
                                      [--spillover] [--seed N] [--no-haproxy] [--results DIR]
          python -m bench.concurrency --lb http://HOST:PORT     (measure a running balancer)

With no --lb it starts, on 127.0.0.1, a simulated fleet of Chatterbox GPU servers
(backends.chatterbox: --slots calls at full speed, a crash past --oom-at at once, down for
10 s plus 10 s of model loading), the fake Cartesia, and for each run a fresh balancer
(`python -m lb`, max_concurrency = slots, the Cartesia fallback on) -- and HAProxy configured
as an expert would (balance leastconn, maxconn = slots, a queue) when it is installed.  The
whole simulated world runs --time-scale times real time (default 0.05: 20x faster).

Each caller is a voice agent in a closed loop: POST /synthesize-json with a sentence, GET the
audio_url, "play" it (sleep its duration), think, repeat.  Per (policy, concurrency) it reports
calls completed, p50/p95/p99 latency and time to the first audio byte, errors the callers saw,
backend crashes, retries and calls served by Cartesia; then writes results.json and
latency.png to ./bench-results/concurrency-<timestamp>/ under the current directory (or
--results DIR).  Every process started here is stopped at the end, also on Ctrl-C, SIGTERM
or an error; every wait is bounded.  See bench/README.md.

The parts: bench.world (the simulated world's constants), bench.concurrency_args (options),
bench.callers (the closed-loop callers), bench.fleet and bench.proxies (the processes),
bench.runs (the plan and each run), bench.progress, bench.report and bench.plot (output).
"""
from __future__ import annotations

import os
import platform
import secrets
import shutil
import signal
import sys
import textwrap
import time
from pathlib import Path

from bench.concurrency_args import parse_args
from bench import openai_api, replicas
from bench.plot import write_plot
from bench.report import format_table, legend, observations, results_dir, write_results
from bench.runs import bench_external, bench_fleet
from bench.processes import BenchError, Services, Stop, make_tmp, tool_version
from bench.world import (CARTESIA_CONCURRENCY, CHARS_PER_SECOND, DEFAULT_DURATION_LB, KEY_ENV,
                         LOAD_TIME, QUEUE_TIMEOUT, RESTART_AFTER, SENTENCES, SYNTH_PATH, THINK,
                         call_timeout, mean_cycle, real_per_wall)

__all__ = ["main", "parse_args", "DEFAULT_DURATION_LB"]


def _on_signal(signum, _frame):
    raise Stop(signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    tmp = make_tmp()
    services = Services(tmp)
    progress_holder: list = []      # the Progress of the runs, to clear its line on the way out
    try:
        return _bench(args, services, tmp, progress_holder)
    except BenchError as exc:
        _close(progress_holder)
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _close(progress_holder)
        print("\nbench: interrupted; stopping everything", file=sys.stderr)
        return 130
    except Stop as exc:
        _close(progress_holder)
        print(f"\nbench: got signal {exc.args[0]}; stopping everything", file=sys.stderr)
        return 128 + exc.args[0]
    finally:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip this
        try:
            services.stop_all()
        finally:
            signal.signal(signal.SIGINT, old)
            shutil.rmtree(tmp, ignore_errors=True)


def _wrap(line: str, width: int = 110) -> str:
    """A header line "  key      : text" wrapped under its text."""
    if len(line) <= width or " : " not in line:
        return line
    key, _, text = line.partition(" : ")
    return textwrap.fill(text, width, initial_indent=key + " : ",
                         subsequent_indent=" " * (len(key) + 3), break_on_hyphens=False)


def _close(holder: list) -> None:
    for p in holder:
        p.close()


def _bench(args, services: Services, tmp: Path, progress_holder: list) -> int:
    out_dir = results_dir(args)   # chosen now, made only at the end
    configs: dict[str, str] = {}   # written beside the results at the end
    s = args.time_scale
    speed = f"{1 / s:g}x real time" if s < 1 else "real time"
    not_run: dict[str, str] = {}
    haproxy_version = None
    if args.lb is None:
        if args.no_haproxy:
            not_run["haproxy"] = "--no-haproxy"
        elif not shutil.which("haproxy"):
            not_run["haproxy"] = "haproxy not on PATH: apt-get install -y haproxy"
        else:
            haproxy_version = tool_version(["haproxy", "-v"], r"version (\S+)")
    os.environ[KEY_ENV] = secrets.token_hex(16)  # for the fake Cartesia and the balancer alike
    if args.replicas > 1:
        return replicas.run(args, services, tmp, out_dir, progress_holder)
    if args.api == "openai":
        return openai_api.run(args, services, tmp, out_dir, progress_holder)

    audio = [len(t) / CHARS_PER_SECOND for t in SENTENCES]
    meta = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seed": args.seed,
        "time_scale": s, "real_per_wall": real_per_wall(args),
        "units": {"*_ms": "wall-clock milliseconds as measured",
                  "*_real_s": "real-world seconds: the wall time x real_per_wall (the "
                              "simulated fleet runs 1/time_scale times as fast as real "
                              "servers; a running balancer, --lb, runs in real time)"},
        "duration_s": args.duration, "concurrency": list(args.concurrency),
        "warmup_s": round(mean_cycle(args, args.rtf if not args.lb else 1.0), 3),
        "call": {"synthesize": f"POST {SYNTH_PATH}", "sentences": len(SENTENCES),
                 "audio_s_min": round(min(audio), 2), "audio_s_max": round(max(audio), 2),
                 "audio_s_mean": round(sum(audio) / len(audio), 2), "think_s": list(THINK),
                 "timeout_s": round(call_timeout(args), 2)},
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "machine": platform.platform(),
    }
    header = ["tts-lb concurrency benchmark: closed-loop voice-agent callers"]
    if args.lb is None:
        meta.update(mode="simulated fleet", policies=list(args.policies), backends=args.backends,
                    slots=args.slots, oom_at=args.oom_at, rtf=args.rtf,
                    spillover=args.spillover,
                    haproxy=(f"HAProxy {haproxy_version}" if haproxy_version
                             else f"not run ({not_run['haproxy']})"))
        cycle_real = mean_cycle(args, args.rtf) / s
        busy = (sum(audio) / len(audio)) * args.rtf / cycle_real
        header += [
            f"  time     : the simulated world runs at {speed} (--time-scale {s:g}); latencies "
            f"in the table are wall-clock ms{f', x{1 / s:g} for real-world time' if s < 1 else ''}"
            f"; latency.png and the JSON's *_real_s are real-world seconds",
            f"  fleet    : {args.backends} x backends.chatterbox, {args.slots} slots each at "
            f"rtf {args.rtf:g} (GPU s per audio s), "
            + (f"out of memory past {args.oom_at} at once" if args.oom_at else "no OOM")
            + f", a crash = {RESTART_AFTER:g} s down + {LOAD_TIME:g} s loading (real-world)",
            f"  calls    : POST {SYNTH_PATH} (one of {len(SENTENCES)} sentences, "
            f"{min(audio):.1f}-{max(audio):.0f} s of audio), GET its audio_url, play it, think "
            f"{THINK[0]:g}-{THINK[1]:g} s, repeat; a caller keeps a GPU slot busy "
            f"~{busy * 100:.0f}% of the time at full speed, so {args.backends * args.slots} "
            f"slots fill at ~{args.backends * args.slots / busy:.0f} callers",
            f"  tts-lb   : python -m lb per run, max_concurrency {args.slots} (= slots; none for "
            f"'random, no limit'), queue {QUEUE_TIMEOUT:g} s, 2 attempts, passive + active "
            f"health, Cartesia fallback on (fake, {CARTESIA_CONCURRENCY} at once), spillover "
            f"{'on' if args.spillover else 'off'}",
            "  haproxy  : " + (f"HAProxy {haproxy_version}: balance leastconn, maxconn "
                                f"{args.slots} per server, queue (timeout queue "
                                f"{QUEUE_TIMEOUT:g} s), retries 1 + redispatch, httpchk "
                                "/health, audio GETs pinned by cookie; no fallback"
                                if haproxy_version else f"not run ({not_run['haproxy']})"),
        ]
    else:
        scheme, host, port = args.lb
        meta.update(mode="external balancer", lb=f"{scheme}://{host}:{port}")
        header += [
            f"  target   : {scheme}://{host}:{port} (already running; nothing else started)",
            f"  calls    : POST {SYNTH_PATH}, GET its audio_url, play it, think "
            f"{THINK[0]:g}-{THINK[1]:g} s, repeat; playing and thinking at {speed} "
            f"(--time-scale {s:g})",
        ]
        if args.ignored:
            header.append(f"  note     : ignored with --lb (they describe the simulated "
                          f"fleet): {', '.join(args.ignored)}")
    header.append(f"  runs     : {args.duration:g} s measured per run after a "
                  f"{meta['warmup_s']:g} s warm-up; seed {args.seed}; {os.cpu_count()} CPUs "
                  f"shared by everything")
    print("\n".join(_wrap(line) for line in header), flush=True)

    if args.lb is None:
        rows = bench_fleet(args, services, tmp, configs, progress_holder, not_run)
    else:
        rows = bench_external(args, progress_holder)

    print()
    print(format_table(rows))
    print()
    print(legend(args.lb is None, args.oom_at))
    notes = observations(rows, args.slots, args.oom_at) if args.lb is None else []
    for n in notes:
        print(textwrap.fill(n, 110, initial_indent="  * ", subsequent_indent="    "))
    for name, why in not_run.items():
        print(f"  * {name}: not run ({why})")

    doc = {"meta": meta, "not_run": not_run, "results": rows, "observations": notes}
    write_results(out_dir, doc, configs)
    if args.lb is None:
        title = (f"{args.backends} simulated GPU servers x {args.slots} slots, "
                 + (f"OOM past {args.oom_at}" if args.oom_at else "no OOM")
                 + f", seed {args.seed}")
        axis = "seconds (real-world)"
        note = (f"Times are real-world seconds: the simulation ran {1 / s:g}x faster than "
                f"real servers (--time-scale {s:g}), so measured wall times are x{1 / s:g}."
                if s < 1 else "Times are wall-clock seconds (the simulation ran in real time).")
    else:
        title, axis = meta["lb"], "seconds (wall clock)"
        note = "Times are wall-clock seconds as measured against the running balancer."
    problem = write_plot(rows, out_dir / "latency.png", f"tts-lb concurrency: {title}", axis,
                         note, crashes_known=args.lb is None)
    print()
    if problem:
        print(f"note: {problem}")
    print(f"results: {out_dir}/ (results.json"
          + ("" if problem else ", latency.png")
          + (", the configs used" if args.lb is None else "") + ")", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
