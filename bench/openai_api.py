"""bench.concurrency --api openai: the OpenAI front door over Chatterbox servers, split on and off.

The question: a voice-agent framework that speaks only OpenAI's POST /v1/audio/speech is put
in front of a Chatterbox fleet (`api = "chatterbox"`: the balancer makes each backend's own
two-step call and streams PCM back).  How soon does the first audio come, and does cutting
long inputs into pieces synthesized in parallel ([route.split]) buy what it promises?
Chatterbox answers nothing until a whole text is made, so unsplit, the first byte of a long
text waits for all of it; split, only for its first sentence.

The same simulated fleet as the other modes (bench.fleet) and the same kind of closed-loop
callers (bench.callers' connection and percentiles): each POSTs the text, reads the chunked
body as it streams, "plays" it from its first byte (the audio's length x the time scale),
thinks, repeats.  Four runs, each with a fresh balancer: short and long text, split on (the
defaults) and off.  Every wait is bounded: a call by its timeout, a run by its window plus
one call timeout.
"""
from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench.callers import CALL_ERRORS, Call, HTTPConn, Load, call_error, summarize_calls
from bench.fleet import (fleet_stats, recovery_timeout, reset_fleet, secs, start_fleet,
                         wait_ready)
from bench.processes import HOST, BenchError, Service, Services
from bench.report import fmt
from bench.progress import Progress, Step
from bench.proxies import lb_stats
from bench.world import (BASE_EJECTION, CHARS_PER_SECOND, FIRST_BYTE, LOAD_TIME, MAX_EJECTION,
                         PROBE_INTERVAL, PROBE_TIMEOUT, QUEUE_TIMEOUT, SLOW_START, THINK)

DEFAULT_CALLERS = 10
DEFAULT_DURATION = 15.0      # wall s per run: a long unsplit call is ~14 s of cycle at x20
SPEECH_PATH = "/v1/audio/speech"
PCM_BYTES_PER_S = 48_000     # 24 kHz mono 16-bit: what response_format "pcm" is
WARMUP_MAX = 2.0             # wall s over which callers join (at most one cycle)

SHORT_TEXT = "Sure, I can check that for you right now, one moment please."   # 60 characters
LONG_TEXT = " ".join((        # 25 sentences, 2,000 characters
    "Thanks for calling, here is a summary of the changes to your plan this month.",
    "Your monthly price stays the same, and nothing changes until your next bill.",
    "From the first of next month, your data allowance goes up from ten to fifteen gigabytes.",
    "Calls to landlines and mobiles in the country remain included at no extra cost.",
    "International calls are now billed per minute, and the rates are listed online.",
    "If you travel abroad, roaming is included in thirty countries across the region.",
    "Outside those countries, a daily pass costs five dollars and covers one gigabyte.",
    "You can turn the daily pass off at any time in the app, under the roaming settings.",
    "Your contract runs until March, and after that it continues month to month.",
    "If you would like to leave before March, an early exit fee of twenty dollars applies.",
    "The phone you bought with the plan is paid off in twelve more monthly payments.",
    "You can pay the rest of the phone at once, and the monthly payment then stops.",
    "Your last three bills were paid on time, so your account is in good standing.",
    "There is one open ticket on your account, about a missing delivery from last week.",
    "The courier says the parcel was left with a neighbour at number fourteen.",
    "If it has not turned up by Friday, we will send a replacement free of charge.",
    "You also asked about a second line for a family member, which is possible.",
    "A second line costs fifteen dollars a month and shares your data allowance.",
    "It comes with its own number, its own voicemail and its own SIM card.",
    "We can post the SIM card to your home address, and it arrives in two days.",
    "To activate it, put it in the phone and follow the text message you receive.",
    "You can see both lines, and what each one uses, in the app under your account.",
    "If you ever need help, our team is here from eight in the morning to eight at night.",
    "You can also chat with us in the app, and we usually reply within a few minutes.",
    "Is there anything else about your plan that I can explain for you today, or help you "
    "with at all?"))
TEXTS = {"short": SHORT_TEXT, "long": LONG_TEXT}
RUNS = [(text, split) for text in TEXTS for split in (True, False)]   # the table's rows


def _audio_s(text: str) -> float:
    return len(text) / CHARS_PER_SECOND


def first_byte_real(args) -> float:
    """The balancer's first_byte, real-world s: the normal bench's 60 s would answer 504 to
    every unsplit long call (Chatterbox says nothing until 133 s of audio are made, at rtf
    1), which would measure the timeout, not the wait; twice the longest synthesis instead."""
    return max(FIRST_BYTE, 2 * _audio_s(LONG_TEXT) * args.rtf)


def call_timeout(args) -> float:
    """Wall s: a queue wait, a whole first_byte, the longest synthesis; bounded either way."""
    return (QUEUE_TIMEOUT + first_byte_real(args) + _audio_s(LONG_TEXT) * args.rtf) \
        * args.time_scale + 5


def warmup(args, text: str) -> float:
    """Callers join over one cycle of this text at full speed (at most WARMUP_MAX)."""
    return min(WARMUP_MAX, (_audio_s(text) * (1 + args.rtf) + sum(THINK) / 2) * args.time_scale)


def lb_config(ports: list[int], args, split: bool) -> str:
    """The balancer: Chatterbox backends, the openai route; [route.split] only to turn it off."""
    s = args.time_scale
    lines = [
        f"# written by bench/openai_api.py: the simulated fleet's times are scaled by {s:g}",
        "[listen]", f'address = "{HOST}:0"',
        "[log]", "access = false", 'level = "info"',
        "[timeouts]", f"first_byte = {secs(first_byte_real(args) * s)}",
        "[pool]", f"max_idle = {max(32, 2 * args.slots)}",
        "[balancer]", 'policy = "least_conn"', f"max_concurrency = {args.slots}",
        "queue_limit = 1024", f"queue_timeout = {secs(QUEUE_TIMEOUT * s)}",
        f"slow_start = {secs(SLOW_START * s)}",
        "[health.passive]", f"base_ejection = {secs(BASE_EJECTION * s)}",
        f"max_ejection = {secs(MAX_EJECTION * s)}",
        "[health.active]", f"interval = {secs(max(0.1, PROBE_INTERVAL * s))}",
        f"timeout = {secs(max(0.25, PROBE_TIMEOUT * s))}",
    ]
    for i, port in enumerate(ports):
        lines += ["[[backend]]", f'name = "gpu{i}"', f'url = "http://{HOST}:{port}"',
                  'health_path = "/health"', 'api = "chatterbox"']
    lines += ["[[route]]", f'path = "{SPEECH_PATH}"', 'kind = "openai"']
    # Right after its [[route]], [route.split] is that route's; absent, the defaults hold.
    lines += ["# [route.split]: the defaults (enabled, min_chars 300, parallel 3)"] if split \
        else ["[route.split]", "enabled = false"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the callers


@dataclass
class SpeechCall(Call):
    status: int = 0
    nbytes: int = 0
    pieces: int = 0          # the answer's x-tts-pieces: the backend calls it was made of


async def _speech_call(conn: HTTPConn, body: bytes, timeout: float) -> SpeechCall:
    loop = asyncio.get_running_loop()
    call = SpeechCall(started=loop.time())
    try:
        async with asyncio.timeout(timeout):
            status, hdrs, nbytes, first = await conn.request("POST", SPEECH_PATH, body,
                                                             keep_body=False)
        end = loop.time()
        call.status, call.nbytes = status, nbytes
        if status != 200:
            call.error = f"speech {status}"
            return call
        if not nbytes or first is None:
            call.error = "speech: no audio"
            return call
        pieces = hdrs.get("x-tts-pieces", ["0"])[0]
        call.pieces = int(pieces) if pieces.isdigit() else 0
        call.ok = True
        call.latency, call.ttfa = end - call.started, first - call.started
        call.audio_s = nbytes / PCM_BYTES_PER_S
        return call
    except CALL_ERRORS as exc:
        call.error = call_error(exc)
    conn.close()
    return call


async def drive_speech(load: Load, text: str, tick=None) -> None:
    """`load.callers` closed-loop callers of one text; calls started in the window count."""
    loop = asyncio.get_running_loop()
    body = orjson.dumps({"model": "tts-1", "voice": "alloy", "input": text,
                         "response_format": "pcm"})
    t0 = loop.time()
    w0, w1 = t0 + load.warmup, t0 + load.warmup + load.duration
    load.window = (w0, w1)
    # Seeded by caller, not by run: split on and off get the same think times.
    rngs = [random.Random(f"{load.seed}:{len(text)}:{i}") for i in range(load.callers)]

    async def caller(i: int):
        rng = rngs[i]
        conn = HTTPConn("http", load.host, load.port, None)
        try:
            await asyncio.sleep(rng.uniform(0, load.warmup))   # join over the warm-up
            for _ in range(100_000):                            # ends at w1 long before
                if loop.time() >= w1:
                    break
                load.started += 1
                call = await _speech_call(conn, body, load.call_timeout)
                if w0 <= call.started < w1:
                    load.calls.append(call)
                if loop.time() >= w1:
                    break           # no playing past the window: the run ends sooner
                # It plays from its first byte, for as long as the audio lasts.
                play_from = call.started + call.ttfa if call.ok else loop.time()
                audio = call.audio_s if call.ok else _audio_s(text)
                wait = play_from + audio * load.scale - loop.time()
                await asyncio.sleep(max(0.0, wait) + rng.uniform(*THINK) * load.scale)
        finally:
            load.stale_retries += conn.stale_retries
            conn.close()

    tasks = [asyncio.create_task(caller(i)) for i in range(load.callers)]

    async def ticking():
        for _ in range(100_000):
            if tick is not None:
                tick()
            await asyncio.sleep(0.25)
    ticker = asyncio.create_task(ticking())
    try:
        done, pending = await asyncio.wait(
            tasks, timeout=load.warmup + load.duration + load.call_timeout + 10)
        for t in done:
            if t.exception() is not None:
                raise t.exception()
    finally:
        for t in [*tasks, ticker]:
            t.cancel()
        await asyncio.gather(*tasks, ticker, return_exceptions=True)


# ------------------------------------------------------------------ the runs


def _label(text: str, split: bool) -> str:
    return f"{text} text, split {'on' if split else 'off'}"


def _estimate(args, text: str) -> float:
    """Wall s of one run: the balancer's start, warm-up, window, the last call, the rest."""
    return 0.7 + warmup(args, text) + args.duration + _audio_s(TEXTS[text]) * args.rtf \
        * args.time_scale


def _start_lb(services: Services, tmp: Path, fleet, args, split: bool, configs: dict) -> Service:
    name = f"lb-openai-split-{'on' if split else 'off'}"
    text = lb_config(fleet.ports, args, split)
    conf = tmp / f"{name}.toml"
    conf.write_text(text)
    configs.setdefault(conf.name, text)
    svc = services.start(name, [sys.executable, "-m", "lb", "-c", str(conf)],
                         stop_signal=signal.SIGINT)
    svc.port = int(services.wait_log(svc, r"listening on [\d.]+:(\d+)").group(1))
    return svc


def _median(values: list) -> float | None:
    return sorted(values)[(len(values) - 1) // 2] if values else None


def bench_speech(args, services: Services, tmp: Path, configs: dict,
                 progress_holder: list) -> list[dict]:
    plan = [Step("starting the simulated fleet", 0.3 * (args.backends + 1)
                 + LOAD_TIME * args.time_scale, run=False)]
    plan += [Step(_label(t, sp), _estimate(args, t)) for t, sp in RUNS]
    progress = Progress(plan)
    progress_holder.append(progress)
    progress.begin("starting the simulated fleet")
    fleet = start_fleet(services, args, progress.tick)
    progress.end()
    rows = []
    for text, split in RUNS:
        progress.begin(_label(text, split))
        wait_ready(fleet, recovery_timeout(args), progress.tick)
        reset_fleet(fleet)
        svc = _start_lb(services, tmp, fleet, args, split, configs)
        load = Load("http", HOST, svc.port, args.callers, args.duration,
                    warmup=warmup(args, TEXTS[text]), scale=args.time_scale, seed=args.seed,
                    call_timeout=call_timeout(args))
        try:
            asyncio.run(drive_speech(load, TEXTS[text], progress.tick))
            proxy = lb_stats(HOST, svc.port)
        finally:
            services.stop(svc)
        try:
            wait_ready(fleet, recovery_timeout(args), progress.tick)
        except BenchError as exc:
            progress.note(f"warning: {exc}")
        fl = fleet_stats(fleet)
        ok = [c for c in load.calls if c.ok]
        row = {"text": text, "characters": len(TEXTS[text]), "split": split,
               "callers": args.callers,
               "calls": summarize_calls(load.calls, load.duration, 1 / args.time_scale)
               | {"keepalive_resends": load.stale_retries},
               "statuses": dict(sorted(Counter(str(c.status or c.error)
                                               for c in load.calls).items())),
               "pieces": _median([c.pieces for c in ok]),
               "bytes_per_call": _median([c.nbytes for c in ok]),
               "audio_s": None if not ok else round(_median([c.audio_s for c in ok]), 1),
               "backend_crashes": fl["crashes"], "peak_gpu_in_flight": fl["peak_gpu_in_flight"],
               "proxy_stats": proxy, "fleet_stats": fl}
        rows.append(row)
        c = row["calls"]
        progress.end(f"{c['completed']} calls, first audio p50 {fmt(c['ttfa_ms']['p50'])} ms, "
                     f"{c['errors']} errors")
    progress.close()
    return rows


def format_speech(rows: list[dict]) -> str:
    head1 = (f"{'':<6} {'':>5} {'':>5} {'':>7} {'':>5} {'':>6} {'':>6} {'':>7}  "
             f"{'first audio byte':^13}  {'total (ms)':^13}")
    head2 = (f"{'text':<6} {'chars':>5} {'split':>5} {'callers':>7} {'calls':>5} "
             f"{'errors':>6} {'pieces':>6} {'audio s':>7}  {'p50':>6} {'p99':>6}  "
             f"{'p50':>6} {'p99':>6}  {'crashes':>7} {'peak':>4}")
    lines = [head1, head2, "-" * len(head2)]
    for r in rows:
        c, tt, lat = r["calls"], r["calls"]["ttfa_ms"], r["calls"]["latency_ms"]
        lines.append(
            f"{r['text']:<6} {r['characters']:>5} {'on' if r['split'] else 'off':>5} "
            f"{r['callers']:>7} {c['completed']:>5} {c['errors']:>6} {fmt(r['pieces'], 'd'):>6} "
            f"{fmt(r['audio_s'], '.1f'):>7}  {fmt(tt['p50']):>6} {fmt(tt['p99']):>6}  "
            f"{fmt(lat['p50']):>6} {fmt(lat['p99']):>6}  "
            f"{fmt(r['backend_crashes'], 'd'):>7} {fmt(r['peak_gpu_in_flight'], 'd'):>4}")
    return "\n".join(lines)


def ratios(rows: list[dict], text: str = "long") -> dict:
    """TTFA and total, split on / split off, for one text (None where a side has no calls)."""
    on, off = ({(r["text"], r["split"]): r for r in rows}.get((text, s)) for s in (True, False))
    out = {}
    for what in ("ttfa_ms", "latency_ms"):
        for p in ("p50", "p99"):
            a = on and on["calls"][what][p]
            b = off and off["calls"][what][p]
            out[f"{what[:-3]}_{p}"] = round(a / b, 3) if a and b else None
    return out


def summary(rows: list[dict]) -> str:
    by = {(r["text"], r["split"]): r["calls"] for r in rows}
    q = ratios(rows)
    on, off = by.get(("long", True)), by.get(("long", False))
    son, soff = by.get(("short", True)), by.get(("short", False))
    if not (on and off and son and soff):
        return "summary: some runs are missing"
    return (f"summary: splitting the {len(LONG_TEXT):,}-character text brought its first audio "
            f"byte from {fmt(off['ttfa_ms']['p50'])} to {fmt(on['ttfa_ms']['p50'])} ms at "
            f"p50 ({fmt(q['ttfa_p50'], '.2f')}x; p99 {fmt(q['ttfa_p99'], '.2f')}x) and the "
            f"whole answer from {fmt(off['latency_ms']['p50'])} to "
            f"{fmt(on['latency_ms']['p50'])} ms ({fmt(q['latency_p50'], '.2f')}x); the "
            f"{len(SHORT_TEXT)}-character text (one piece either way): first audio "
            f"{fmt(son['ttfa_ms']['p50'])} vs {fmt(soff['ttfa_ms']['p50'])} ms; errors "
            f"{sum(c['errors'] for c in by.values())}.")


def run(args, services: Services, tmp: Path, out_dir: Path, progress_holder: list) -> int:
    s = args.time_scale
    configs: dict[str, str] = {}
    header = [
        "tts-lb concurrency benchmark, --api openai: POST /v1/audio/speech (response_format "
        "pcm) through the front door to Chatterbox servers, [route.split] on and off",
        f"  fleet    : {args.backends} x backends.chatterbox, {args.slots} slots each at rtf "
        f"{args.rtf:g}, " + (f"out of memory past {args.oom_at}" if args.oom_at else "no OOM")
        + f"; per run a balancer: api = \"chatterbox\", least_conn, max_concurrency "
        f"{args.slots}, first_byte {first_byte_real(args):.0f} s real-world",
        f"  texts    : short {len(SHORT_TEXT)} characters, one sentence ({_audio_s(SHORT_TEXT):.1f}"
        f" s of audio); long {len(LONG_TEXT)} characters, {LONG_TEXT.count('. ') + 1} sentences "
        f"({_audio_s(LONG_TEXT):.0f} s)",
        f"  callers  : {args.callers}, each: POST, read the streamed body, play it from its first"
        f" byte, think {THINK[0]:g}-{THINK[1]:g} s, repeat",
        f"  time     : the simulated world runs at {1 / s:g}x real time (--time-scale {s:g}); ms "
        f"below are wall-clock{f', x{1 / s:g} for real-world time' if s < 1 else ''}",
        f"  runs     : {args.duration:g} s measured per run after a warm-up of at most "
        f"{WARMUP_MAX:g} s; seed {args.seed}"]
    if args.ignored:
        header.append(f"  note     : ignored with --api openai: {', '.join(args.ignored)}")
    print("\n".join(header), flush=True)
    rows = bench_speech(args, services, tmp, configs, progress_holder)
    q = ratios(rows)
    print()
    print(format_speech(rows))
    print()
    print(f"long text, split on / split off: first audio byte p50 {fmt(q['ttfa_p50'], '.3f')}x, "
          f"p99 {fmt(q['ttfa_p99'], '.3f')}x; total p50 {fmt(q['latency_p50'], '.3f')}x, "
          f"p99 {fmt(q['latency_p99'], '.3f')}x")
    print(summary(rows))
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "mode": "api openai",
            "seed": args.seed, "backends": args.backends, "slots": args.slots,
            "oom_at": args.oom_at, "rtf": args.rtf, "time_scale": s, "callers": args.callers,
            "duration_s": args.duration, "texts": TEXTS, "first_byte_real_s":
            first_byte_real(args), "call_timeout_s": call_timeout(args)}
    doc = {"meta": meta, "results": rows, "long_split_on_over_off": q}
    (out_dir / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    for name, text in configs.items():
        (out_dir / name).write_text(text)
    print(f"results: {out_dir}/ (results.json, the configs used)", flush=True)
    return 0
