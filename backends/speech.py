"""What the simulated servers' samples say: espeak-ng speaking the text, when it is installed,
else audio.py's tone.  Only the samples change: every length (the WAV's frames, a stream
piece's size, the GPU time) stays audio.py's, len(text) / chars_per_second, so the timing
model and every documented duration are the same with either.

    Voice.choose(force_tone, chars_per_second)   espeak-ng if on PATH and working, else tone
    voice.describe()         "espeak-ng (real speech)" / "tone (espeak-ng not found)" / ...
    voice.pcm(text, n, offset=0)   exactly n samples of 24 kHz mono s16le saying `text`
                             (synchronous)
    Renderer(voice, blocking).start(text, n, offset)   a future of voice.pcm(...), begun now
                             so it overlaps the simulated GPU time: the tone at once, speech
                             on a thread (the event loop goes on), or with --blocking on the
                             event loop itself (the whole server waits, as for the GPU)

espeak-ng is run as `espeak-ng --stdout --stdin ...` with the text on its standard input:
never through a shell, never as an argument (a text starting with "-" stays text).  At most
MAX_SPOKEN_CHARS of a text are spoken (cut at a space), in at most ESPEAK_TIMEOUT seconds.
Its 22050 Hz output is trimmed of leading and trailing silence, resampled to 24 kHz by linear
interpolation (pure Python: no sox needed) and fitted into the n samples: shorter speech is
padded with silence; longer speech is played faster, up to MAX_SPEEDUP, and cut past that.
If espeak-ng fails on a text, that piece is the tone (said once on stdout).
"""
from __future__ import annotations

import asyncio
import shutil
import struct
import subprocess
import sys
from array import array

from . import audio

ESPEAK = "espeak-ng"
MAX_SPOKEN_CHARS = 500        # ~33 s of speech: bounds espeak's and the resampler's work
ESPEAK_TIMEOUT = 10.0         # seconds; espeak-ng needs ~20 ms for a sentence
MAX_SPEEDUP = 1.5             # speech longer than its slot plays at most this much faster
SILENCE = 100                 # |sample| at or below this, at either end, is trimmed
LEAD_IN = audio.SAMPLE_RATE // 20   # at most 50 ms of silence before the speech
ESPEAK_WPM = 175              # espeak-ng's default rate, ~15 characters a second
SPEECH_THREADS = 2            # espeak-ng runs at once per server (each ~1 core, briefly)


class Voice:
    """Tone or espeak-ng; `why` says why it is the tone."""

    def __init__(self, espeak: str | None, chars_per_second: float = audio.CHARS_PER_SECOND,
                 why: str = ""):
        self.espeak, self.why = espeak, why
        # espeak's words a minute at our speaking rate, within the range it accepts
        self.wpm = max(80, min(450, round(ESPEAK_WPM * chars_per_second
                                          / audio.CHARS_PER_SECOND)))
        self._warned = False

    @classmethod
    def choose(cls, force_tone: bool = False,
               chars_per_second: float = audio.CHARS_PER_SECOND) -> "Voice":
        if force_tone:
            return cls(None, chars_per_second, "--tone")
        exe = shutil.which(ESPEAK)
        if exe is None:
            return cls(None, chars_per_second, f"{ESPEAK} not found")
        voice = cls(exe, chars_per_second)
        try:
            voice.speak("ok")  # a broken install (no voice data) is found now, not per request
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            return cls(None, chars_per_second, f"{ESPEAK} does not work: {_short(e)}")
        return voice

    @property
    def speaks(self) -> bool:
        return self.espeak is not None

    def describe(self) -> str:
        return f"{ESPEAK} (real speech)" if self.speaks else f"tone ({self.why})"

    def pcm(self, text: str, n_samples: int, offset: int = 0) -> bytes:
        """Exactly n_samples of s16le.  The tone continues its waveform from `offset` (so
        stream pieces join); speech starts afresh in each piece."""
        if not self.speaks or n_samples <= 0:
            return audio.pcm(n_samples, offset)
        try:
            rate, samples = self.speak(text)
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            if not self._warned:
                self._warned = True
                print(f"audio: {ESPEAK} failed ({_short(e)}); the tone instead", flush=True)
            return audio.pcm(n_samples, offset)
        return fit(trim(samples), rate, n_samples)

    def speak(self, text: str) -> tuple[int, array]:
        """espeak-ng's (sample rate, samples) for `text` (at most MAX_SPOKEN_CHARS of it)."""
        done = subprocess.run(
            [self.espeak, "--stdout", "--stdin", "-b", "1", "-v", "en", "-s", str(self.wpm)],
            input=spoken_part(text).encode("utf-8", "replace"), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, timeout=ESPEAK_TIMEOUT, check=False)
        if done.returncode != 0:
            err = done.stderr.decode("utf-8", "replace").strip().splitlines()[:1]
            raise ValueError(f"exit {done.returncode}" + (f": {err[0]}" if err else ""))
        return parse_wav(done.stdout)


class Renderer:
    """A server's samples, made off its event loop unless the server is --blocking."""

    def __init__(self, voice: Voice, blocking: bool = False):
        self.voice, self.blocking = voice, blocking
        self._threads = asyncio.Semaphore(SPEECH_THREADS)

    def start(self, text: str, n_samples: int, offset: int = 0) -> asyncio.Future:
        if not self.voice.speaks or n_samples <= 0 or self.blocking:
            # The tone costs nothing; a --blocking server waits for its speech as it does
            # for its GPU time.
            done = asyncio.get_running_loop().create_future()
            done.set_result(self.voice.pcm(text, n_samples, offset))
            return done
        return asyncio.ensure_future(self._on_thread(text, n_samples, offset))

    async def _on_thread(self, text: str, n_samples: int, offset: int) -> bytes:
        async with self._threads:
            return await asyncio.to_thread(self.voice.pcm, text, n_samples, offset)


def spoken_part(text: str) -> str:
    """The part of `text` given to espeak: no NULs, at most MAX_SPOKEN_CHARS, cut at a space."""
    text = text.replace("\0", " ")
    if len(text) <= MAX_SPOKEN_CHARS:
        return text
    cut = text.rfind(" ", 0, MAX_SPOKEN_CHARS + 1)
    return text[:cut if cut > 0 else MAX_SPOKEN_CHARS]


def parse_wav(data: bytes) -> tuple[int, array]:
    """(sample rate, samples) of a mono 16-bit PCM WAV.  espeak-ng writes to a pipe, so its
    sizes are placeholders (0x7FFFF...): the data chunk runs to the end of what was read."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a WAV file")
    pos, rate = 12, None
    while pos + 8 <= len(data):
        kind, size = struct.unpack_from("<4sI", data, pos)
        body = data[pos + 8:pos + 8 + size]
        if kind == b"fmt ":
            if len(body) < 16:
                raise ValueError("short fmt chunk")
            fmt, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
            if (fmt, channels, bits) != (1, 1, 16) or not 8000 <= rate <= 96000:
                raise ValueError(f"unexpected WAV format {fmt}/{channels} ch/{bits} bit/{rate} Hz")
        elif kind == b"data":
            if rate is None:
                raise ValueError("data before fmt")
            samples = array("h")
            samples.frombytes(body[:len(body) // 2 * 2])
            if sys.byteorder == "big":
                samples.byteswap()
            return rate, samples
        pos += 8 + size + (size & 1)
    raise ValueError("no data chunk")


def trim(samples: array) -> array:
    """Without the near-silence at both ends."""
    start, end = 0, len(samples)
    while start < end and abs(samples[start]) <= SILENCE:
        start += 1
    while end > start and abs(samples[end - 1]) <= SILENCE:
        end -= 1
    return samples[start:end]


def fit(samples: array, rate: int, n_out: int) -> bytes:
    """`samples` at `rate` Hz as exactly n_out samples at 24 kHz (s16le bytes): resampled by
    linear interpolation; padded with silence if shorter, faster (<= MAX_SPEEDUP) and then
    cut if longer."""
    step = rate / audio.SAMPLE_RATE                  # input samples per output sample
    natural = int(len(samples) / step)               # output samples at the natural speed
    lead = 0
    if natural > n_out:
        step *= min(natural / n_out, MAX_SPEEDUP)
    else:
        lead = min((n_out - natural) // 2, LEAD_IN)
    out = array("h", bytes(2 * n_out))
    last, pos = len(samples) - 1, 0.0
    for i in range(lead, n_out):  # the hot loop: ~0.3 us a sample on one core
        j = int(pos)
        if j > last:
            break
        a = samples[j]
        b = samples[j + 1] if j < last else a
        out[i] = int(a + (b - a) * (pos - j))
        pos += step
    if sys.byteorder == "big":
        out.byteswap()
    return out.tobytes()


def _short(e: BaseException) -> str:
    if isinstance(e, subprocess.TimeoutExpired):
        return f"no result within {ESPEAK_TIMEOUT:g}s"
    return str(e) or type(e).__name__
