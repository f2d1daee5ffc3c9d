"""What bench.concurrency reports: the table, its legend, observations in words, the files.

Results go to ./bench-results/concurrency-<timestamp>/ under the directory the bench is run
from (or --results DIR) -- never next to the code, which may be an installed package.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from bench.processes import RESULTS_BASE


def results_dir(args, stamp: str | None = None) -> Path:
    """--results DIR, else a new ./bench-results/concurrency-<timestamp>/ under the cwd."""
    if args.results:
        return Path(args.results).expanduser()
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    base = Path.cwd() / RESULTS_BASE
    path, n = base / f"concurrency-{stamp}", 1
    while path.exists():          # two runs in the same second keep both results
        n += 1
        path = base / f"concurrency-{stamp}-{n}"
    return path


def write_results(path: Path, doc: dict, configs: dict[str, str]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    for name, text in configs.items():
        (path / name).write_text(text)


def short_summary(row: dict) -> str:
    """One run in a line, for the progress output."""
    c, lat = row["calls"], row["calls"]["latency_ms"]
    text = (f"{c['completed']} calls, p50 {fmt(lat['p50'])} ms, p99 {fmt(lat['p99'])} ms, "
            f"{c['errors']} errors")
    if row.get("backend_crashes"):
        text += f", {row['backend_crashes']} crashes"
    return text


def fmt(v, spec: str = ".0f") -> str:
    """A figure for a table: "-" where there is none."""
    return "-" if v is None else format(v, spec)


def format_table(rows: list[dict]) -> str:
    head1 = (f"{'':<18} {'':>7} {'':>5} {'':>6}  {'latency (ms)':^20}  "
             f"{'first audio byte':^20}  {'extra':>5}")
    head2 = (f"{'target':<18} {'callers':>7} {'calls':>5} {'errors':>6}  "
             f"{'p50':>6} {'p95':>6} {'p99':>6}  {'p50':>6} {'p95':>6} {'p99':>6}  "
             f"{'p95':>5}  {'crashes':>7} {'retries':>7} {'cartesia':>8} {'peak':>4}")
    lines = [head1, head2, "-" * len(head2)]
    last = None
    several = len({r["label"] for r in rows}) > 1
    for r in sorted(rows, key=lambda r: r["concurrency"]):
        if several and last is not None and r["concurrency"] != last:
            lines.append("")
        last = r["concurrency"]
        c, lat, tt = r["calls"], r["calls"]["latency_ms"], r["calls"]["ttfa_ms"]
        extra = (c.get("extra_ms") or {}).get("p95")
        lines.append(
            f"{r['label'][:18]:<18} {r['concurrency']:>7} {c['completed']:>5} {c['errors']:>6}  "
            f"{fmt(lat['p50']):>6} {fmt(lat['p95']):>6} {fmt(lat['p99']):>6}  "
            f"{fmt(tt['p50']):>6} {fmt(tt['p95']):>6} {fmt(tt['p99']):>6}  "
            f"{fmt(extra):>5}  "
            f"{fmt(r['backend_crashes'], 'd'):>7} {fmt(r['retries'], 'd'):>7} "
            f"{fmt(r['cartesia_calls'], 'd'):>8} {fmt(r['peak_gpu_in_flight'], 'd'):>4}")
    return "\n".join(lines)


def legend(fleet_mode: bool, oom_at: int) -> str:
    out = [
        "callers  concurrent callers.  calls: calls that started in the measured window and got "
        "their audio;",
        "         errors: calls that failed for the caller (a non-200 answer, a reset, a timeout).",
        "latency  the whole call, POST to the last audio byte; first audio byte: call start to the "
        "first byte",
        "         of the audio body.  Percentiles over the calls done.",
    ]
    if fleet_mode:
        out += [
            "extra    latency beyond the GPU's own full-speed work for that sentence: queueing, "
            "time-slicing,",
            "         retries, the proxy (calls Cartesia served left out).",
            "crashes  backend out-of-memory crashes; peak: most syntheses one server held at once "
            + (f"(it crashes past {oom_at})." if oom_at else "(no OOM crash: --oom-at 0)."),
            "retries  the proxy's own retries; cartesia: calls done by the Cartesia fallback "
            "(HAProxy has none: -).",
            "         crashes, retries and peak count the whole run, warm-up included.",
        ]
    else:
        out += [
            "retries  from the balancer's /lb-stats over the run, when it has one (one worker's "
            "view if it runs",
            "         several); cartesia: calls answered with x-tts-fallback.  crashes and peak "
            "are unknown here.",
        ]
    return "\n".join(out)


def observations(rows: list[dict], slots: int, oom_at: int) -> list[str]:
    """What the table says, in words: crashes, overloads, errors, Cartesia's share."""
    notes = []
    at = lambda r: f"{r['label']} at {r['concurrency']}"  # noqa: E731
    crashed = [r for r in rows if r["backend_crashes"]]
    if crashed:
        notes.append("backend crashes: " + ", ".join(
            f"{at(r)} callers: {r['backend_crashes']}" for r in crashed))
        clean = sorted({r["label"] for r in rows} - {r["label"] for r in crashed})
        if clean:
            notes.append("no crash at any level: " + ", ".join(clean))
    elif rows:
        notes.append("no backend crashed in any run")
    over = [r for r in rows if (r["peak_gpu_in_flight"] or 0) > slots]
    if over:
        notes.append(f"more than {slots} syntheses at once on one server (time-sliced, all "
                     f"slower): " + ", ".join(f"{at(r)} (peak {r['peak_gpu_in_flight']})"
                                             for r in over))
    for r in rows:
        servers = (r["proxy_stats"] or {}).get("servers") if r["target"] == "haproxy" else None
        high = [s for s in servers or [] if s["peak"] > slots]
        if high:
            notes.append(f"{at(r)}: HAProxy's own stats show "
                         + ", ".join(f"{s['name']} with {s['peak']}" for s in high)
                         + f" sessions at once, above maxconn {slots}")
    erred = [r for r in rows if r["calls"]["errors"]]
    if erred:
        notes.append("callers saw errors: " + "; ".join(
            f"{at(r)}: " + ", ".join(f"{n} {k}" for k, n in r["calls"]["errors_by_kind"].items())
            for r in erred))
    spilled = [r for r in rows if r["cartesia_calls"]]
    if spilled:
        notes.append("Cartesia served " + ", ".join(
            f"{r['cartesia_calls']} of {r['calls']['completed']} calls for {at(r)}"
            for r in spilled))
    return notes

