"""Audio for the simulated TTS servers: real 24 kHz mono 16-bit PCM WAV, made cheaply.

    wav_header(n)        the 44-byte header of a WAV file with n bytes of PCM data;
    wav_header(None)     the streaming "unknown size" header chatterbox-tts-api sends
                         (RIFF size 0x7FFFFFFF - 36, data size 0xFFFFFFFF)
    pcm(n, offset=0)     exactly n samples (2n bytes) of s16le: a voiced-sounding tone with a
                         4 Hz "syllable" envelope.  One 0.5 s block is computed at import and
                         repeated; `offset` continues the waveform, so pieces of a stream join
                         without a click: pcm(a) + pcm(b, offset=a) == pcm(a + b)
    wav_file(n)          header + n samples: a complete, playable file
    seconds_for_text(t)  how long the speech for text t lasts (len / 15 chars per second)
"""
from __future__ import annotations

import math
import random
import struct
import sys
from array import array

SAMPLE_RATE = 24000
CHANNELS = 1
SAMPLE_WIDTH = 2                       # bytes: 16-bit
BYTES_PER_SECOND = SAMPLE_RATE * CHANNELS * SAMPLE_WIDTH
HEADER_BYTES = 44
UNKNOWN_RIFF_SIZE = 0x7FFFFFFF - 36    # as chatterbox-tts-api's create_wav_header writes it
UNKNOWN_DATA_SIZE = 0xFFFFFFFF
CHARS_PER_SECOND = 15.0                # speaking rate: ~180 words a minute

_HEADER = struct.Struct("<4sI4s4sIHHIIHH4sI")


def wav_header(data_bytes: int | None) -> bytes:
    """RIFF/WAVE header for 24 kHz mono s16le.  None: the unknown-size streaming header."""
    if data_bytes is None:
        riff, data = UNKNOWN_RIFF_SIZE, UNKNOWN_DATA_SIZE
    else:
        if not 0 <= data_bytes <= 0xFFFFFFFF - 36:
            raise ValueError(f"data_bytes={data_bytes} does not fit a WAV header")
        riff, data = 36 + data_bytes, data_bytes
    return _HEADER.pack(b"RIFF", riff, b"WAVE", b"fmt ", 16, 1, CHANNELS, SAMPLE_RATE,
                        BYTES_PER_SECOND, CHANNELS * SAMPLE_WIDTH, 8 * SAMPLE_WIDTH, b"data", data)


def _make_block() -> bytes:
    # Every frequency is a multiple of 2 Hz, so the 0.5 s block is exactly periodic and
    # repeating it is seamless.  A little fixed noise keeps it from sounding like a test tone.
    n = SAMPLE_RATE // 2
    noise = random.Random(24000)
    out = array("h")
    for i in range(n):
        t = i / SAMPLE_RATE
        envelope = 0.55 - 0.45 * math.cos(2 * math.pi * 4 * t)
        voice = (0.6 * math.sin(2 * math.pi * 150 * t) + 0.3 * math.sin(2 * math.pi * 300 * t)
                 + 0.1 * math.sin(2 * math.pi * 450 * t))
        out.append(int(9000 * envelope * voice + noise.uniform(-300, 300)))
    if sys.byteorder == "big":
        out.byteswap()
    return out.tobytes()


_BLOCK = _make_block()
PERIOD = len(_BLOCK) // SAMPLE_WIDTH   # samples in one block


def pcm(n_samples: int, offset: int = 0) -> bytes:
    """Exactly n_samples samples of s16le PCM, starting at sample `offset` of the waveform."""
    if n_samples <= 0:
        return b""
    start = (offset % PERIOD) * SAMPLE_WIDTH
    end = start + n_samples * SAMPLE_WIDTH
    return (_BLOCK * (end // len(_BLOCK) + 1))[start:end]


def wav_file(n_samples: int) -> bytes:
    """A complete WAV file holding n_samples samples."""
    return wav_header(n_samples * SAMPLE_WIDTH) + pcm(n_samples)


def seconds_for_text(text: str, chars_per_second: float = CHARS_PER_SECOND) -> float:
    """Speech duration for `text`: its length at `chars_per_second` characters a second."""
    return len(text) / chars_per_second


def samples_for_seconds(seconds: float) -> int:
    return max(0, round(seconds * SAMPLE_RATE))


def samples_for_text(text: str, chars_per_second: float = CHARS_PER_SECOND) -> int:
    return samples_for_seconds(seconds_for_text(text, chars_per_second))
