"""bench.throughput's output: the medians, the lb/haproxy and lb/direct ratios, the table, the JSON.

Pure functions of the runs' Results (no processes, no network), so that the numbers and
their layout can be read and tested apart from the measuring.  Each cell is the median of
its runs, with the min..max beside it: on a shared 2-core machine one run is noise.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.processes import log
from bench.throughput_clients import WORKLOADS, Result
from bench.throughput_targets import TARGETS


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


def ratios(summary: dict) -> dict:
    out = {}
    for other in ("haproxy", "direct"):
        key = f"lb/{other}"
        lb, them = summary["small"].get("lb"), summary["small"].get(other)
        big_lb, big_them = summary["large"].get("lb"), summary["large"].get(other)
        out[key] = {
            "small_rps": _ratio(lb and lb["rps"], them and them["rps"]),
            "small_p50": _ratio(lb and lb["p50_ms"], them and them["p50_ms"]),
            "small_p99": _ratio(lb and lb["p99_ms"], them and them["p99_ms"]),
            "large_mib_s": _ratio(big_lb and big_lb["mib_s"], big_them and big_them["mib_s"]),
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


def format_table(summary: dict, rat: dict, meta: dict, not_run: dict[str, str]) -> str:
    lines = []
    w = 9
    head = (f"{'workload':<30} {'target':<8} {'req/s':>{w}} {'p50':>{w}} {'p99':>{w}} "
            f"{'MiB/s':>{w}} {'errors':>6}  runs (min..max)")
    lines += [head, "-" * len(head)]
    labels = {
        "small": f"small: GET / keep-alive, c={meta['connections']}",
        "large": f"large: GET {meta['body_mib']} MiB body, "
                 f"c={meta['large_connections']}",
    }
    for wl in WORKLOADS:
        first = True
        for target in TARGETS:
            label = labels[wl] if first else ""
            first = False
            s = summary[wl].get(target)
            if s is None:
                lines.append(f"{label:<30} {target:<8} not run ({not_run.get(target, 'skipped')})")
                continue
            if wl == "small":
                spread = _spread(s["rps_runs"], ".0f") + (" req/s" if len(s["rps_runs"]) > 1
                                                         else "")
                lines.append(f"{label:<30} {target:<8} {_num(s['rps'], ',.0f'):>{w}} "
                             f"{format_ms(s['p50_ms']):>{w}} {format_ms(s['p99_ms']):>{w}} "
                             f"{'-':>{w}} {s['errors']:>6}  {spread}")
            else:
                spread = _spread(s["mib_s_runs"], ".0f") + (" MiB/s" if len(s["mib_s_runs"]) > 1
                                                           else "")
                lines.append(f"{label:<30} {target:<8} {'-':>{w}} {'-':>{w}} {'-':>{w}} "
                             f"{_num(s['mib_s'], ',.1f'):>{w}} {s['errors']:>6}  {spread}")
    lines.append("")
    lines.append("ratios (medians; throughput: higher is better for lb, latency: lower is better)")
    lines.append(f"  {'':<22} {'lb/haproxy':>10} {'lb/direct':>10}")
    for key, label in (("small_rps", "small req/s"), ("small_p50", "small p50 latency"),
                       ("small_p99", "small p99 latency"), ("large_mib_s", "large MiB/s")):
        lines.append(f"  {label:<22} {_num(rat['lb/haproxy'][key], '.2f'):>10} "
                     f"{_num(rat['lb/direct'][key], '.2f'):>10}")
    return "\n".join(lines)


def write_json(path_text: str, *, meta: dict, summary: dict, rat: dict,
               runs: dict[str, dict[str, list[Result]]], not_run: dict[str, str],
               profile: dict | None) -> None:
    """Everything the run found: meta, medians, ratios, every run, what was not run, the profile."""
    doc = {"meta": meta, "summary": summary, "ratios": rat,
           "runs": {wl: {t: [vars(r) for r in by_target[t]] for t in by_target}
                    for wl, by_target in runs.items()},
           "not_run": not_run, "profile": profile}
    path = Path(path_text).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)   # ./bench-results/ for a bare --json
    path.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"results written to {path}")
