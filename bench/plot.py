"""latency.png of bench.concurrency: latency per target and level, and what it cost the fleet.

Four latency panels (p50, p95, p99, first audio byte p95) in real-world seconds, and two
that say whether that latency was the GPU fleet's at all: servers crashed, and the share of
calls the fleet did not serve (the Cartesia fallback served them, or they failed).  A run
that crashed servers, failed calls or leaned on Cartesia has hollow markers and dotted lines
into it, with the reason beside it: its low latency is the fallback's, so it must not look
like the best line.  Every target has its own colour, marker and line style, and is dodged
a little sideways, so that targets with the same numbers still show as several lines.
"""
from __future__ import annotations

from pathlib import Path

MARKERS = ("o", "s", "^", "D", "v", "P", "*", "X")
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1.5, 1, 1.5, 1, 1.5)), (0, (8, 2)), (0, (1, 1)))
HAPROXY_STYLE = ("X", (0, (3, 1, 1, 1)), "black")
CARTESIA_SHARE = 0.1     # a run with at least this share of calls served by Cartesia is flagged
LATENCY_PANELS = (("latency_real_s", "p50", "latency p50"),
                  ("latency_real_s", "p95", "latency p95"),
                  ("latency_real_s", "p99", "latency p99"),
                  ("ttfa_real_s", "p95", "first audio byte p95"))


def trouble(row: dict) -> list[str]:
    """Why a run's latency is not what the GPU fleet delivered ([] if it is)."""
    c = row["calls"]
    why = []
    if row.get("backend_crashes"):
        why.append(f"{row['backend_crashes']} crashes")
    cart = row.get("cartesia_calls") or 0
    if c["completed"] and cart / c["completed"] >= CARTESIA_SHARE:
        why.append(f"{cart * 100 // c['completed']}% Cartesia")
    if c["errors"]:
        why.append(f"{c['errors']} failed")
    return why


def not_served_shares(row: dict) -> tuple[float, float]:
    """Percent of the calls started in the window: served by Cartesia, failed."""
    c = row["calls"]
    if not c["started"]:
        return 0.0, 0.0
    return ((row.get("cartesia_calls") or 0) * 100 / c["started"], c["errors"] * 100 / c["started"])


def _styles(targets: list[str]) -> dict[str, tuple]:
    import matplotlib
    colors = matplotlib.colormaps["tab10"].colors
    out, i = {}, 0
    for t in targets:
        if t == "haproxy":
            out[t] = HAPROXY_STYLE
        else:
            out[t] = (MARKERS[i % len(MARKERS)], LINESTYLES[i % len(LINESTYLES)],
                      colors[i % len(colors)])
            i += 1
    return out


def write_plot(rows: list[dict], path: Path, title: str, time_axis: str, time_note: str,
               crashes_known: bool = True) -> str | None:
    """Write the PNG; None, or why there is none (matplotlib missing).

    time_axis labels the latency axes (their unit); time_note, under the title, says how
    the measured wall time became it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no latency.png"
    labels = list(dict.fromkeys(r["label"] for r in rows))
    styles = _styles(labels)
    levels = sorted({r["concurrency"] for r in rows})
    gap = min((b - a for a, b in zip(levels, levels[1:])), default=max(levels[0], 2) / 2)
    width = 0.7 * gap / max(3, len(labels))                 # of one bar in a group
    offset = {t: (i - (len(labels) - 1) / 2) * width for i, t in enumerate(labels)}
    by = {(r["label"], r["concurrency"]): r for r in rows}

    fig, axes = plt.subplots(3, 2, figsize=(12, 11), sharex=True)
    handles = [Line2D([], [], color=styles[t][2], marker=styles[t][0], linestyle=styles[t][1],
                      label=t) for t in labels]
    hollow = Line2D([], [], color="grey", marker="o", markerfacecolor="white", linestyle=":",
                    label="crashed / failed / Cartesia")
    for ax, (key, pct, name) in zip(axes.flat, LATENCY_PANELS):
        for t in labels:
            marker, ls, color = styles[t]
            pts = [(n + offset[t] * 0.5, by[t, n]["calls"][key][pct], by[t, n]) for n in levels
                   if (t, n) in by and by[t, n]["calls"][key]
                   and by[t, n]["calls"][key][pct] is not None]
            for (x0, y0, r0), (x1, y1, r1) in zip(pts, pts[1:]):
                bad = trouble(r0) or trouble(r1)
                ax.plot([x0, x1], [y0, y1], color=color, linestyle=":" if bad else ls,
                        alpha=0.45 if bad else 1.0, linewidth=1.6)
            for x, y, r in pts:
                why = trouble(r)
                ax.plot([x], [y], marker=marker, color=color, markersize=8 if why else 6,
                        markerfacecolor="white" if why else color, markeredgewidth=1.8,
                        linestyle="none")
                if why:   # the reason beside the point, inside the panel at either edge
                    ha = ("right" if x > levels[-1] - gap / 4 and len(levels) > 1 else
                          "left" if x < levels[0] + gap / 4 and len(levels) > 1 else "center")
                    ax.annotate(", ".join(why), (x, y), textcoords="offset points",
                                xytext=({"right": 6, "left": -6, "center": 0}[ha], -14),
                                ha=ha, fontsize=7, color=color,
                                bbox={"boxstyle": "round,pad=0.15", "fc": "white",
                                      "ec": "none", "alpha": 0.8})
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(time_axis)
        ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.3)   # room for the legend above
        ax.grid(True, alpha=0.3)
        ax.legend(handles=handles + [hollow], fontsize=7, ncols=2, loc="upper left")

    crash_ax, share_ax = axes[2]
    for t in labels:
        marker, _, color = styles[t]
        for n in levels:
            r = by.get((t, n))
            if r is None:
                continue
            x = n + offset[t]
            # No bar for a zero (it would be a stray line at 0); the marker says "measured: 0".
            if r.get("backend_crashes"):
                crash_ax.bar(x, r["backend_crashes"], width, color=color, edgecolor="black",
                             linewidth=0.5)
            if r.get("backend_crashes") is not None:
                crash_ax.plot([x], [r["backend_crashes"]], marker=marker, color=color,
                              markeredgecolor="black", markersize=5, linestyle="none")
            cart, failed = not_served_shares(r)
            if cart:
                share_ax.bar(x, cart, width, color=color, hatch="///", edgecolor="black",
                             linewidth=0.5)
            if failed:
                share_ax.bar(x, failed, width, bottom=cart, color="none", hatch="xxx",
                             edgecolor=color, linewidth=0.8)
            share_ax.plot([x], [cart + failed], marker=marker, color=color,
                          markeredgecolor="black", markersize=5, linestyle="none")
    crash_ax.set_title("backend servers crashed (out of memory), whole run", fontsize=10)
    crash_ax.set_ylabel("crashes")
    if not crashes_known:
        crash_ax.text(0.5, 0.5, "not known for a running balancer (--lb)",
                      transform=crash_ax.transAxes, ha="center", fontsize=9, color="grey")
        crash_ax.set_yticks([])
    share_ax.set_title("calls the GPU fleet did not serve (of calls started)", fontsize=10)
    share_ax.set_ylabel("% of calls")
    share_ax.set_ylim(-4, 135)
    share_ax.set_yticks(range(0, 101, 20))
    bar_handles = [Patch(facecolor=styles[t][2], edgecolor="black", label=t) for t in labels]
    top = max(1.0, crash_ax.get_ylim()[1]) * 1.45
    crash_ax.set_ylim(-top * 0.03, top)       # below 0 a little: the markers of 0 show whole
    crash_ax.legend(handles=handles, fontsize=7, ncols=2, loc="upper left")
    share_ax.legend(handles=bar_handles + [
        Patch(facecolor="lightgrey", hatch="///", edgecolor="black", label="served by Cartesia"),
        Patch(facecolor="none", hatch="xxx", edgecolor="black", label="failed")],
        fontsize=7, ncols=2, loc="upper left")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        ax.set_xticks(levels)
    for ax in axes[2]:
        ax.set_xlabel("concurrent callers")
        ax.tick_params(labelbottom=True)
    fig.suptitle(f"{title}\n{time_note}", fontsize=10)
    fig.text(0.5, 0.005, "Hollow markers and dotted lines: runs in which servers crashed, calls "
             "failed, or Cartesia served at least "
             f"{CARTESIA_SHARE:.0%} of the calls -- their latency is not the GPU fleet's.",
             ha="center", fontsize=8, style="italic")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
