"""bench.throughput's output: the medians, each balancer's ratios to HAProxy and to the
backend directly, the table, the JSON (and the same for the tunnel and tcp workloads:
MiB/s against HAProxy's, round trips against the direct one's).

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


# --- the tunnel and tcp workloads (bench.throughput_tunnel) ------------------------------

TARGET_X_HAPROXY = 0.9      # the issue's line: a tunnel moves >= 0.9x HAProxy's MiB/s


def summarize_tunnel(runs: list) -> dict:
    """Medians of a target's TunnelRuns (bench.throughput_tunnel), each with its runs."""
    out = {key: _median([getattr(r, key) for r in runs])
           for key in ("upload_mib_s", "download_mib_s", "p50_ms", "p99_ms")}
    out["errors"] = sum(r.errors for r in runs)
    out["echo_rounds"] = sum(r.echo_rounds for r in runs)
    for key in ("upload_mib_s", "download_mib_s", "p99_ms"):
        out[f"{key}_runs"] = [getattr(r, key) for r in runs]
    return out


def compare_tunnel(summary: dict[str, dict]) -> dict[str, dict]:
    """Each proxy target's MiB/s over HAProxy's (not for HAProxy itself) and its echo round
    trip minus the direct one's (ms; noise can make a small one negative)."""
    direct, haproxy = summary.get("direct"), summary.get("haproxy")
    out = {}
    for target, s in summary.items():
        if target == "direct":
            continue
        row = {}
        if target != "haproxy":
            for key in ("upload_mib_s", "download_mib_s"):
                row[f"{key.split('_')[0]}_x_haproxy"] = _ratio(s[key], haproxy and haproxy[key])
        for p in ("p50", "p99"):
            ours, base = s[f"{p}_ms"], direct and direct[f"{p}_ms"]
            row[f"{p}_added_ms"] = ours - base if ours is not None and base is not None else None
        out[target] = row
    return out


def _added(value: float | None) -> str:
    if value is None:
        return "-"
    return ("-" if value < 0 else "+") + format_ms(abs(value))


def format_tunnel_table(workload: str, summary: dict, compared: dict, meta: dict,
                        not_run: dict[str, str]) -> str:
    """A row per target: upload and download MiB/s with their ratio to HAProxy, the echo
    round trip and what the proxy adds to it; then the verdict on the issue's target."""
    t = meta["tunnel"]
    how = ("upgrade tunnel (GET /sink|/source|/echo, Upgrade: bulk, 101) on the HTTP listener"
           if workload == "tunnel" else "[[tcp]] listener, plain TCP (no upgrade head)")
    lines = [f"{workload}: {how}; {t['connections']} connections x {meta['duration_s']} s each "
             f"way; echo: {t['echo_bytes']} B round trips on one connection, up to "
             f"{t['echo_rounds']}"]
    w = 9
    head = (f"{'target':<13} {'up MiB/s':>{w}} {'down MiB/s':>10} {'x hap up':>8} "
            f"{'x hap dn':>8} {'echo p50':>{w}} {'echo p99':>{w}} {'added p50':>{w + 1}} "
            f"{'added p99':>{w + 1}} {'errors':>6}  runs up / down (min..max)")
    lines += [head, "-" * len(head)]
    for target, row in summary.items():
        c = compared.get(target, {})
        spread = " / ".join(x for x in (_spread(row["upload_mib_s_runs"], ".0f"),
                                        _spread(row["download_mib_s_runs"], ".0f")) if x)
        lines.append(f"{target:<13} {_num(row['upload_mib_s'], ',.1f'):>{w}} "
                     f"{_num(row['download_mib_s'], ',.1f'):>10} "
                     f"{_num(c.get('upload_x_haproxy'), '.2f'):>8} "
                     f"{_num(c.get('download_x_haproxy'), '.2f'):>8} "
                     f"{format_ms(row['p50_ms']):>{w}} {format_ms(row['p99_ms']):>{w}} "
                     f"{_added(c.get('p50_added_ms')):>{w + 1}} "
                     f"{_added(c.get('p99_added_ms')):>{w + 1}} {row['errors']:>6}  {spread}")
    if "haproxy" not in summary:
        lines.append(f"{'haproxy':<13} not run ({not_run.get('haproxy', 'skipped')})")
    verdicts = []
    for target, c in compared.items():
        if target == "haproxy":
            continue
        for way in ("upload", "download"):
            x = c.get(f"{way}_x_haproxy")
            verdicts.append(f"{target} {way} " + ("-" if x is None else
                            f"{x:.2f} {'met' if x >= TARGET_X_HAPROXY else 'NOT met'}"))
    lines.append(f"target: >= {TARGET_X_HAPROXY:.2f}x haproxy MiB/s: " + ", ".join(verdicts))
    return "\n".join(lines)


def write_json(path_text: str, *, meta: dict, summary: dict, rat: dict,
               runs: dict[str, dict[str, list]], not_run: dict[str, str],
               profile: dict | None, streams_added: dict | None = None,
               tunnel_compared: dict | None = None) -> None:
    """Everything the run found: meta, medians (summary[workload][target], streams, tunnel
    and tcp too), ratios, what each balancer adds to a streamed chunk, how the tunnels
    compare (tunnel_compared[workload][target]), every run, what was not run, the profile
    (per engine)."""
    doc = {"meta": meta, "summary": summary, "ratios": rat, "streams_added": streams_added,
           "tunnel_compared": tunnel_compared,
           "runs": {wl: {t: [vars(r) for r in by_target[t]] for t in by_target}
                    for wl, by_target in runs.items()},
           "not_run": not_run, "profile": profile}
    path = Path(path_text).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)   # ./bench-results/ for a bare --json
    path.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"results written to {path}")
