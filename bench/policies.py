"""How each policy spreads calls: requests and peak in-flight per backend.

    python -m bench.policies [--server echo|chatterbox] [--slots 4] [--backends 5]
                             [--limit 4] [--clients 20] [--requests 10]
                             [--delay 0.2,0.6] [--json]

Starts simulated backends and, for each policy, a balancer in front of them
with `max_concurrency = --limit`; then `--clients` callers each make
`--requests` calls in a row, each worth D seconds of GPU time, D drawn from
the `--delay` range (a TTS call's GPU time varies with the sentence):
`/slow?delay=D` on `backends.echo`, which never slows down, or a
`/synthesize-json` whose text takes D seconds on `backends.chatterbox`'s GPU
model, which serves `--slots` calls at full speed and slows everyone down
past that.
It prints, per policy, the requests each backend got and the peak number it
held at once -- as the balancer counted it and as the backend itself saw
it -- plus call latency.  A last row, "random, no limit", is what apps do
today: random spreading with no per-server cap.

Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("least_conn", "p2c", "round_robin", "random")
SIM_RTF = 0.2                 # backends.chatterbox: GPU seconds per second of audio
SIM_CHARS_PER_SECOND = 15.0   # and seconds of audio per character


def _start(args: list[str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 15
    for line in proc.stdout:
        if "listening on 127.0.0.1:" in line:
            port = int(line.split("listening on 127.0.0.1:")[1].split()[0].rstrip(",;"))
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, port
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"could not start {' '.join(args)}")


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _post(port: int, path: str, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _config(ports: list[int], policy: str, limit: int) -> str:
    lines = ['[listen]', 'address = "127.0.0.1:0"', '[log]', 'access = false',
             '[balancer]', f'policy = "{policy}"', f'max_concurrency = {limit}',
             'queue_timeout = 60']
    for i, port in enumerate(ports):
        lines += ['[[backend]]', f'name = "b{i}"', f'url = "http://127.0.0.1:{port}"']
    return "\n".join(lines) + "\n"


def run_policy(ports: list[int], policy: str, limit: int, args) -> dict:
    for port in ports:
        _get(port, "/_stats/reset")
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(_config(ports, policy, limit))
    lb, lb_port = _start(["-m", "lb", "-c", f.name])
    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()
    low, high = args.delay

    def caller(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(args.requests):
            started = time.monotonic()
            seconds = rng.uniform(low, high)
            if args.server == "echo":
                status, _ = _get(lb_port, f"/slow?delay={seconds:.3f}")
            else:   # text long enough for `seconds` of GPU time at the simulator's pace
                chars = max(1, round(seconds / SIM_RTF * SIM_CHARS_PER_SECOND))
                status, _ = _post(lb_port, "/synthesize-json",
                                  json.dumps({"text": "a" * chars}).encode())
            with lock:
                latencies.append(time.monotonic() - started)
                statuses.append(status)

    try:
        threads = [threading.Thread(target=caller, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        stats = json.loads(_get(lb_port, "/lb-stats")[1])
    finally:
        lb.terminate()
        lb.wait(10)
        Path(f.name).unlink()
    own = [json.loads(_get(port, "/_stats")[1]) for port in ports]
    latencies.sort()
    return {
        "policy": policy if limit < 100_000 else f"{policy}, no limit",
        "requests": [b["requests"] for b in stats["backends"]],
        "peak_lb": [b["peak_in_flight"] for b in stats["backends"]],
        "peak_backend": [s["max_requests_in_flight"] for s in own],
        "queued_peak": stats["queue"]["peak"],
        "ok": statuses.count(200),
        "calls": len(statuses),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=("echo", "chatterbox"), default="echo")
    parser.add_argument("--slots", type=int, default=4,
                        help="chatterbox: calls one simulated GPU serves at full speed")
    parser.add_argument("--backends", type=int, default=5)
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=10, help="calls per client")
    parser.add_argument("--delay", default="0.2,0.6", help="seconds of 'GPU time', LOW,HIGH")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    args.delay = tuple(float(x) for x in args.delay.split(","))
    server = (["-m", "backends.echo"] if args.server == "echo" else
              ["-m", "backends.chatterbox", "--slots", str(args.slots), "--load-time", "0",
               "--rtf", str(SIM_RTF), "--chars-per-second", str(SIM_CHARS_PER_SECOND),
               "--tone"])   # not espeak-ng speech: its CPU time is not the GPU model's
    backends = [_start([*server, "--port", "0"]) for _ in range(args.backends)]
    ports = [port for _, port in backends]
    rows = []
    try:
        for policy in POLICIES:
            rows.append(run_policy(ports, policy, args.limit, args))
        rows.append(run_policy(ports, "random", 100_000, args))
    finally:
        for proc, _ in backends:
            proc.terminate()
            proc.wait(10)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    gpu = f" ({args.slots} full-speed slots each)" if args.server == "chatterbox" else ""
    print(f"{args.clients} concurrent callers x {args.requests} calls, {args.backends} "
          f"{args.server} backends{gpu} of limit {args.limit}, GPU time "
          f"{args.delay[0]:g}-{args.delay[1]:g} s")
    print(f"{'policy':<20} {'requests per backend':<24} {'peak (lb)':<16} "
          f"{'peak (backend)':<16} {'queued':>6} {'ok':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for r in rows:
        print(f"{r['policy']:<20} {' '.join(map(str, r['requests'])):<24} "
              f"{' '.join(map(str, r['peak_lb'])):<16} {' '.join(map(str, r['peak_backend'])):<16} "
              f"{r['queued_peak']:>6} {r['ok']:>4}/{r['calls']:<3} {r['p50_ms']:>8} {r['p99_ms']:>8}")


if __name__ == "__main__":
    main()
