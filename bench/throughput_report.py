"""bench.throughput's output: the medians, each balancer's ratios to HAProxy and to the
backend directly, the table, the JSON.

Pure functions of the runs' Results (no processes, no network), so that the numbers and
their layout can be read and tested apart from the measuring.  Each cell is the median of
its runs, with the min..max beside it: on a shared 2-core machine one run is noise.  There
is a row, and a pair of ratios, per balancer target ("lb-httptools", "lb-h11"): one per
HTTP engine measured.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.processes import log
from bench.throughput_clients import WORKLOADS, Result
from bench.throughput_targets import lb_target, target_order


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[Result]) -> dict:
    return {
        "rps": _median([r.rps for r in runs]),
        "p50_ms": _median([r.p50_ms for r in runs]),
        "p99_ms": _median([r.p99_ms for r in runs]),
        "mib_s": _median([r.mib_s for r in runs]),
        "errors": sum(r.errors for r in runs),
        "rps_runs": [r.rps for r in runs],
        "mib_s_runs": [r.mib_s for r in runs],
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(summary: dict, engines: list[str]) -> dict:
    """{"lb-<engine>/haproxy": {...}, "lb-<engine>/direct": {...}} for each engine; a ratio
    whose workload or target was not run is None."""
    out = {}
    small, large = summary.get("small", {}), summary.get("large", {})
    for engine in engines:
        lb = lb_target(engine)
        for other in ("haproxy", "direct"):
            ours, them = small.get(lb), small.get(other)
            big_ours, big_them = large.get(lb), large.get(other)
            out[f"{lb}/{other}"] = {
                "small_rps": _ratio(ours and ours["rps"], them and them["rps"]),
                "small_p50": _ratio(ours and ours["p50_ms"], them and them["p50_ms"]),
                "small_p99": _ratio(ours and ours["p99_ms"], them and them["p99_ms"]),
                "large_mib_s": _ratio(big_ours and big_ours["mib_s"],
                                      big_them and big_them["mib_s"]),
            }
    return out


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1e3:.0f} us"
    return f"{value:.2f} ms" if value < 100 else f"{value:.0f} ms"


def _spread(values: list[float | None], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return ""
    return f"{format(min(values), fmt)}..{format(max(values), fmt)}"


def format_table(summary: dict, rat: dict, meta: dict, not_run: dict[str, str],
                 engines: list[str], workloads: list[str]) -> str:
    """The small/large table: a row per target, each balancer's beside HAProxy's with its
    ratio to HAProxy (req/s for small, MiB/s for large), then every ratio."""
    lines = []
    w = 9
    head = (f"{'workload':<30} {'target':<13} {'req/s':>{w}} {'p50':>{w}} {'p99':>{w}} "
            f"{'MiB/s':>{w}} {'errors':>6} {'x haproxy':>9}  runs (min..max)")
    lines += [head, "-" * len(head)]
    labels = {
        "small": f"small: GET / keep-alive, c={meta['connections']}",
        "large": f"large: GET {meta['body_mib']} MiB body, "
                 f"c={meta['large_connections']}",
    }
    workloads = [wl for wl in WORKLOADS if wl in workloads]
    for wl in workloads:
        first = True
        for target in target_order(engines):
            label = labels[wl] if first else ""
            first = False
            s = summary[wl].get(target)
            if s is None:
                lines.append(f"{label:<30} {target:<13} not run ({not_run.get(target, 'skipped')})")
                continue
            key = "small_rps" if wl == "small" else "large_mib_s"
            vs = rat.get(f"{target}/haproxy", {}).get(key)
            vs_text = "" if vs is None else f"{vs:.2f}"
            if wl == "small":
                spread = _spread(s["rps_runs"], ".0f") + (" req/s" if len(s["rps_runs"]) > 1
                                                         else "")
                lines.append(f"{label:<30} {target:<13} {_num(s['rps'], ',.0f'):>{w}} "
                             f"{format_ms(s['p50_ms']):>{w}} {format_ms(s['p99_ms']):>{w}} "
                             f"{'-':>{w}} {s['errors']:>6} {vs_text:>9}  {spread}")
            else:
                spread = _spread(s["mib_s_runs"], ".0f") + (" MiB/s" if len(s["mib_s_runs"]) > 1
                                                           else "")
                lines.append(f"{label:<30} {target:<13} {'-':>{w}} {'-':>{w}} {'-':>{w}} "
                             f"{_num(s['mib_s'], ',.1f'):>{w}} {s['errors']:>6} {vs_text:>9}  "
                             f"{spread}")
    lines.append("")
    lines.append("ratios (medians; throughput: higher is better for lb, latency: lower is better)")
    keys = [f"{lb_target(e)}/{other}" for other in ("haproxy", "direct") for e in engines]
    cw = max(len(k) for k in keys)
    lines.append(f"  {'':<22} " + " ".join(f"{k:>{cw}}" for k in keys))
    rows = [("small_rps", "small req/s"), ("small_p50", "small p50 latency"),
            ("small_p99", "small p99 latency"), ("large_mib_s", "large MiB/s")]
    for key, label in rows:
        if key.split("_")[0] not in workloads:
            continue
        lines.append(f"  {label:<22} " + " ".join(f"{_num(rat[k][key], '.2f'):>{cw}}"
                                                  for k in keys))
    return "\n".join(lines)


def write_json(path_text: str, *, meta: dict, summary: dict, rat: dict,
               runs: dict[str, dict[str, list]], not_run: dict[str, str],
               profile: dict | None, streams_added: dict | None = None) -> None:
    """Everything the run found: meta, medians (summary[workload][target], streams too),
    ratios, what each balancer adds to a streamed chunk, every run, what was not run, the
    profile (per engine)."""
    doc = {"meta": meta, "summary": summary, "ratios": rat, "streams_added": streams_added,
           "runs": {wl: {t: [vars(r) for r in by_target[t]] for t in by_target}
                    for wl, by_target in runs.items()},
           "not_run": not_run, "profile": profile}
    path = Path(path_text).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)   # ./bench-results/ for a bare --json
    path.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"results written to {path}")
