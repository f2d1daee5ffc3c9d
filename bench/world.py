"""The simulated world of bench.concurrency: its times, its targets and what callers say.

Times here are real-world seconds; the bench scales them by --time-scale when it runs.
"""
from __future__ import annotations

# --- the simulated world, in real-world seconds (scaled by --time-scale when run)
CHARS_PER_SECOND = 15.0      # speaking rate of backends.chatterbox and the fake Cartesia
RESTART_AFTER = 10.0         # a crashed server is down this long (systemd RestartSec=10) ...
LOAD_TIME = 10.0             # ... then loads its model this long (real servers: 10-60 s)
THINK = (0.5, 2.0)           # a caller's pause between playing one sentence and the next call
CARTESIA_RTF = 0.1           # the fake Cartesia makes audio 10x faster than real time
CARTESIA_CONCURRENCY = 3     # the plan's simultaneous requests (Pro); the lb is told the same
# The balancer's and HAProxy's time settings that belong to the GPU world (scaled too):
QUEUE_TIMEOUT = 10.0         # lb balancer.queue_timeout / HAProxy timeout queue
FIRST_BYTE = 60.0            # lb timeouts.first_byte / HAProxy timeout server
PROBE_INTERVAL = 2.0         # lb health.active.interval / HAProxy check inter
PROBE_TIMEOUT = 1.0
SLOW_START = 10.0            # lb balancer.slow_start / HAProxy slowstart
BASE_EJECTION = 10.0         # lb health.passive.base_ejection
MAX_EJECTION = 120.0
READY_TIMEOUT = 30.0         # extra seconds a backend may take to come back between runs

# --- what is measured
DEFAULT_CONCURRENCY = (10, 20, 40)
LB_POLICIES = ("random", "least_conn", "p2c", "round_robin")
NO_LIMIT = "random-nolimit"  # the balancer's random policy with no per-backend limit
ALL_POLICIES = (*LB_POLICIES, NO_LIMIT)
DEFAULT_POLICIES = ("random", "least_conn", "p2c", NO_LIMIT)
LABELS = {NO_LIMIT: "random, no limit", "haproxy": "haproxy"}
DEFAULT_DURATION_SIM = 3.0   # measured seconds per run, simulated fleet (wall clock)
DEFAULT_DURATION_LB = 30.0   # ... with --lb (a real fleet runs in real time)
DEFAULT_TIME_SCALE = 0.05
DEFAULT_RTF = 1.0
KEY_ENV = "TTS_LB_BENCH_CARTESIA_KEY"
VOICE_ID = "a0e99841-438c-4a64-b679-ae501e7d6091"
SYNTH_PATH = "/synthesize-json"

# What voice agents say: 30 to 180 characters, 2 to 12 s of speech at 15 characters a second.
SENTENCES = (
    "Sure, I can help you with that.",
    "Let me check that for you, one moment please.",
    "Your appointment is confirmed for Tuesday at three in the afternoon.",
    "I'm sorry, I didn't quite catch that. Could you say it again?",
    "Thanks for calling. How can I help you today?",
    "Your order shipped yesterday and should arrive by Friday, tracking details are in your email.",
    "I found two flights that match: one leaves at eight fifteen, the other at ten forty.",
    "To reset your password, open the settings page, choose security, and follow the link "
    "we send to your email address.",
    "Great, I've updated your address.",
    "The total comes to forty two dollars and fifty cents, including tax.",
    "Is there anything else I can help you with today?",
    "I can transfer you to a specialist, but the wait is currently about ten minutes. Would "
    "you like me to do that, or should I schedule a callback for later this afternoon instead?",
    "Okay, I've cancelled the subscription. You won't be charged again.",
    "Our store is open from nine to six on weekdays and from ten to four on Saturdays.",
    "Just to confirm, you'd like a large pizza with mushrooms and olives, delivered to your "
    "home address, is that right?",
    "Got it.",
    "I see three open tickets on your account. The oldest one is about a billing question "
    "from last month, and the other two are about the mobile app.",
    "Please hold while I look that up.",
    "Your balance is one hundred and twelve dollars. The next payment is due on the fifth.",
    "That's all set. Have a wonderful day!",
)


def call_timeout(args) -> float:
    # A call may queue, then take a whole first_byte timeout; bounded either way.
    return max(10.0, (QUEUE_TIMEOUT + 2 * FIRST_BYTE) * args.time_scale + 5)


def mean_cycle(args, rtf: float) -> float:
    """Wall seconds of one average call cycle: synthesis at full speed, playing, thinking."""
    audio = sum(len(t) for t in SENTENCES) / len(SENTENCES) / CHARS_PER_SECOND
    return (audio * (1 + rtf) + sum(THINK) / 2) * args.time_scale


def real_per_wall(args) -> float:
    """Real-world seconds per measured wall-clock second of a call.

    The simulated fleet does everything --time-scale times as fast as real servers would, so
    its latencies scale back by 1/time-scale.  A running balancer (--lb) serves real GPUs in
    real time: only the callers' playing and thinking are scaled, its latencies are real."""
    return 1.0 if args.lb is not None else 1.0 / args.time_scale
