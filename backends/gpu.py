"""The simulated GPU every kind of simulated TTS server runs on.

Timing.  Synthesising A seconds of audio takes A x rtf seconds of GPU work.  Up to `slots`
jobs computing at once each run at full speed; past that the GPU is time-sliced: with n > slots
jobs computing, each progresses at slots/n of full speed (processor sharing), so every extra
concurrent request makes all of them proportionally slower, as on a real GPU.  Progress is
computed exactly from the event loop's clock (no polling): a job's finish time is re-planned
whenever a job starts or stops.

Memory.  A synthesis holds "GPU memory" from admission to its end (computing, streaming or
hanging).  With oom_at = N, admitting request N+1 raises OutOfMemory: the server crashes (see
simserver: every connection reset, the port closed, back after restart_after seconds, then
load_time seconds of model loading).  0 turns this off.

Faults.  Each synthesis draws its Fate from one seeded RNG (--seed), four numbers a request
whatever the rates, so a seed replays the same sequence: `fail` (answered 500 after part of
its work), `hang` (never answered until the client leaves), `reset` (the response body is cut
with a TCP RST part-way; for streams, after some pieces).

Blocking (--blocking).  As most real TTS servers do (Chatterbox's run generation
synchronously in their one worker; ChatTTS's API example holds a lock around a synchronous
infer), the whole server process waits out each synthesis's GPU time (time.sleep on the
event loop): nothing else is served meanwhile, /health and /_stats included, and requests
are computed one at a time in arrival order, whatever --slots says.

Defaults (documented in --help): slots 2, rtf 0.2 (five times faster than real time, a
mid-range GPU running Chatterbox), load_time 2 s (real servers take 10-60 s; kept short so a
demo starts quickly), restart_after 10 s (systemd's RestartSec=10 in the original deployment).
"""
from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from dataclasses import dataclass, fields

EPS = 1e-6           # seconds of GPU work below which a job counts as finished


class OutOfMemory(Exception):
    """Admitting one more job exceeds --oom-at: the server must crash."""


@dataclass
class GPUOptions:
    slots: int = 2
    rtf: float = 0.2
    oom_at: int = 0
    restart_after: float = 10.0
    load_time: float = 2.0
    fail_rate: float = 0.0
    hang_rate: float = 0.0
    reset_rate: float = 0.0
    seed: int | None = None
    chars_per_second: float = 15.0
    blocking: bool = False   # synthesis blocks the whole server (see the module doc)
    tone: bool = False       # the tone even where espeak-ng could speak (see speech.py)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name} must be a finite number")
        if self.slots < 1:
            raise ValueError("slots must be at least 1")
        if self.rtf < 0 or self.oom_at < 0 or self.restart_after < 0 or self.load_time < 0:
            raise ValueError("rtf, oom_at, restart_after and load_time must be >= 0")
        if self.chars_per_second <= 0:
            raise ValueError("chars_per_second must be > 0")
        for name in ("fail_rate", "hang_rate", "reset_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")


def add_arguments(p: argparse.ArgumentParser, **defaults) -> None:
    """The GPU options every kind takes; `defaults` overrides GPUOptions' (e.g. slots=1)."""
    d = {f.name: f.default for f in fields(GPUOptions)} | defaults
    g = p.add_argument_group("simulated GPU")
    g.add_argument("--slots", type=int, default=d["slots"],
                   help=f"requests computed at full speed at once; more are time-sliced "
                        f"(default {d['slots']})")
    g.add_argument("--rtf", type=float, default=d["rtf"],
                   help=f"real-time factor: GPU seconds per second of audio (default {d['rtf']})")
    g.add_argument("--oom-at", type=int, default=d["oom_at"], metavar="N",
                   help="more than N synthesis requests at once crash the server "
                        "(default 0: never)")
    g.add_argument("--restart-after", type=float, default=d["restart_after"], metavar="S",
                   help=f"seconds a crashed server stays down (default {d['restart_after']:g})")
    g.add_argument("--load-time", type=float, default=d["load_time"], metavar="S",
                   help=f"model loading after start and restart: /health not ready, synthesis "
                        f"503 (default {d['load_time']:g})")
    g.add_argument("--fail-rate", type=float, default=d["fail_rate"], metavar="P",
                   help="fraction of synthesis requests answered 500 (default 0)")
    g.add_argument("--hang-rate", type=float, default=d["hang_rate"], metavar="P",
                   help="fraction never answered until the client leaves (default 0)")
    g.add_argument("--reset-rate", type=float, default=d["reset_rate"], metavar="P",
                   help="fraction whose response is reset (RST) part-way (default 0)")
    g.add_argument("--seed", type=int, default=d["seed"], help="seed for the fault RNG")
    g.add_argument("--chars-per-second", type=float, default=d["chars_per_second"],
                   help=f"speaking rate: audio seconds = characters / this "
                        f"(default {d['chars_per_second']:g})")
    g.add_argument("--blocking", action="store_true", default=d["blocking"],
                   help="synthesis blocks the server's event loop, /health included, as "
                        "servers that run their model synchronously do (one at a time)")
    a = p.add_argument_group("audio")
    a.add_argument("--tone", action="store_true", default=d["tone"],
                   help="always the tone, even if espeak-ng is installed (deterministic and "
                        "cheap: for tests and benchmarks)")


def options_from_args(args: argparse.Namespace) -> GPUOptions:
    return GPUOptions(**{f.name: getattr(args, f.name) for f in fields(GPUOptions)})


@dataclass
class Fate:
    fail: bool = False
    hang: bool = False
    reset: bool = False
    point: float = 0.5   # where in the work (fail) or the body / pieces (reset) it happens

    def outcome(self) -> str:
        return "failed" if self.fail else "hung" if self.hang else "reset" if self.reset else "ok"


class Job:
    """One synthesis's hold on the GPU."""
    __slots__ = ("remaining", "future", "work", "compute_time")

    def __init__(self):
        self.remaining, self.future, self.work, self.compute_time = 0.0, None, 0.0, 0.0

    @property
    def slowdown(self) -> float:
        """Wall time spent computing / GPU work done: 1.0 at full speed, 2.0 at half speed."""
        return self.compute_time / self.work if self.work > EPS else 1.0


class GPU:
    def __init__(self, opts: GPUOptions):
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.jobs: set[Job] = set()          # admitted: holding GPU memory
        self.running: dict[Job, None] = {}   # computing right now (insertion-ordered)
        self._stamp = 0.0                    # loop time up to which `remaining` is settled
        self._timer: asyncio.TimerHandle | None = None
        self.max_in_flight = self.max_computing = self.jobs_total = 0
        self.work_seconds = 0.0

    # --- admission (memory) -------------------------------------------------------------

    def admit(self) -> Job:
        if self.opts.oom_at and len(self.jobs) + 1 > self.opts.oom_at:
            raise OutOfMemory(f"CUDA out of memory: {len(self.jobs) + 1} concurrent requests "
                              f"(--oom-at {self.opts.oom_at})")
        job = Job()
        self.jobs.add(job)
        self.jobs_total += 1
        self.max_in_flight = max(self.max_in_flight, len(self.jobs))
        return job

    def release(self, job: Job) -> None:
        self.jobs.discard(job)

    def fate(self) -> Fate:
        r, o = self.rng, self.opts
        fail, hang, reset, point = r.random(), r.random(), r.random(), r.random()
        fail = fail < o.fail_rate
        return Fate(fail=fail, hang=not fail and hang < o.hang_rate,
                    reset=reset < o.reset_rate, point=point)

    def work_for(self, audio_seconds: float) -> float:
        return audio_seconds * self.opts.rtf

    # --- processor sharing ----------------------------------------------------------------

    def rate(self) -> float:
        n = len(self.running)
        return 1.0 if n <= self.opts.slots else self.opts.slots / n

    async def compute(self, job: Job, work: float) -> None:
        """Wait until `work` seconds of full-speed GPU time have been given to `job`.
        Cancellation (the client left, the server crashed) frees its share at once."""
        if work <= EPS:
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._settle(started)
        job.remaining, job.future = work, loop.create_future()
        self.running[job] = None
        self.max_computing = max(self.max_computing, len(self.running))
        self._arm(loop)
        try:
            await job.future
        finally:
            now = loop.time()
            if job in self.running:  # cancelled before finishing
                self._settle(now)
                done = work - max(job.remaining, 0.0)
                del self.running[job]
                self._arm(loop)
            else:
                done = work
            job.work += done
            job.compute_time += now - started
            self.work_seconds += done

    def compute_blocking(self, job: Job, work: float) -> None:
        """--blocking: the whole process waits out `work` (the event loop included, so
        nothing else runs meanwhile and no other job can be computing)."""
        if work <= EPS:
            return
        self.max_computing = max(self.max_computing, 1)
        started = time.monotonic()
        time.sleep(work)
        job.work += work
        job.compute_time += time.monotonic() - started
        self.work_seconds += work

    def _settle(self, now: float) -> None:
        if self.running:
            progress = (now - self._stamp) * self.rate()
            for job in self.running:
                job.remaining -= progress
        self._stamp = now

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.running:
            soonest = max(min(job.remaining for job in self.running), 0.0)
            self._timer = loop.call_at(self._stamp + soonest / self.rate(), self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._settle(loop.time())
        for job in [j for j in self.running if j.remaining <= EPS]:
            del self.running[job]
            if not job.future.done():
                job.future.set_result(None)
        self._arm(loop)  # a timer that fired a hair early just re-arms for the rest

    def reset(self) -> None:
        """The process died: forget every job (their tasks are cancelled by the server)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for job in self.running:
            if not job.future.done():
                job.future.cancel()
        self.running.clear()
        self.jobs.clear()

    def snapshot(self) -> dict:
        return {"gpu_in_flight": len(self.jobs), "max_gpu_in_flight": self.max_in_flight,
                "gpu_computing": len(self.running), "max_gpu_computing": self.max_computing,
                "gpu_jobs_total": self.jobs_total, "gpu_work_seconds": round(self.work_seconds, 6)}

    def reset_counters(self) -> None:
        self.max_in_flight, self.max_computing = len(self.jobs), len(self.running)
        self.jobs_total, self.work_seconds = 0, 0.0
