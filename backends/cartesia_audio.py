"""The fake Cartesia's audio: what it can produce, and the bytes of it (backends/cartesia.py).

Kept apart from the HTTP side because it is pure computation with no I/O and no knowledge of
requests beyond a few attributes, so the codecs and containers can be read, and tested
(tests/test_fake_cartesia.py compares the codecs with audioop's), on their own:

  * the output formats the API offers (ENCODINGS, SAMPLE_RATES, CONTAINERS, CONTENT_TYPES),
    which request validation (cartesia_validation.py) checks against;
  * G.711 mu-law / A-law codecs (lin2ulaw, ulaw2lin, lin2alaw, alaw2lin) for pcm_mulaw and
    pcm_alaw: audioop, which had them, is deprecated and gone from Python 3.13;
  * tone(): the 440 Hz test tone in any encoding; wav_header(): exact or "unknown length"
    RIFF headers; mp3_silent_frame(): valid silent MPEG Layer III frames (no encoder needed);
  * audio_pieces(): a response body as timed pieces, which the server paces and sends.
"""
from __future__ import annotations

import math, struct, sys
from array import array
from functools import lru_cache

ENCODINGS = {"pcm_s16le": 2, "pcm_f32le": 4, "pcm_mulaw": 1, "pcm_alaw": 1}  # bytes per sample
SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
CONTAINERS = ("raw", "wav", "mp3")
CONTENT_TYPES = {"raw": "application/octet-stream", "wav": "audio/wav", "mp3": "audio/mpeg"}

TONE_HZ = 440            # integer Hz: one second of samples repeats seamlessly
TONE_AMPLITUDE = 0.25    # times generation_config.volume (<= 2.0), so never clips
PIECE_SECONDS = 0.1      # audio per streamed piece


def lin2ulaw(s: int) -> int:
    """G.711 mu-law byte for a 16-bit sample (the Sun reference code that audioop used)."""
    s >>= 2  # 14 bits
    if s < 0:
        s, mask = -s, 0x7F
    else:
        mask = 0xFF
    s = min(s, 8159) + 0x21
    seg = s.bit_length() - 6
    if seg >= 8:
        return 0x7F ^ mask
    return ((seg << 4) | ((s >> (seg + 1)) & 0x0F)) ^ mask


def ulaw2lin(u: int) -> int:
    u = ~u & 0xFF
    s = ((((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 7)) - 0x84
    return -s if u & 0x80 else s


_ALAW_SEG_END = (0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)


def lin2alaw(s: int) -> int:
    """G.711 A-law byte for a 16-bit sample (the Sun reference code that audioop used)."""
    s >>= 3
    if s >= 0:
        mask = 0xD5
    else:
        mask, s = 0x55, -s - 1
    seg = next((i for i, end in enumerate(_ALAW_SEG_END) if s <= end), 8)
    if seg >= 8:
        return 0x7F ^ mask
    return ((seg << 4) | ((s >> (1 if seg < 2 else seg)) & 0x0F)) ^ mask


def alaw2lin(a: int) -> int:
    a ^= 0x55
    t, seg = (a & 0x0F) << 4, (a & 0x70) >> 4
    if seg == 0:
        t += 8
    else:
        t = (t + 0x108) << (seg - 1)
    return t if a & 0x80 else -t


def _little_endian(a: array) -> bytes:
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


@lru_cache(maxsize=64)
def tone(encoding: str, rate: int, volume: float = 1.0) -> bytes:
    """Two seconds of the tone in `encoding`: any piece of up to one second starting at
    (sample index mod rate) is a slice of it, continuous across pieces."""
    amp = TONE_AMPLITUDE * volume
    w = 2 * math.pi * TONE_HZ / rate
    floats = [amp * math.sin(w * n) for n in range(rate)]
    if encoding == "pcm_f32le":
        one = _little_endian(array("f", floats))
    else:
        ints = [round(x * 32767) for x in floats]
        if encoding == "pcm_s16le":
            one = _little_endian(array("h", ints))
        else:
            one = bytes(map(lin2ulaw if encoding == "pcm_mulaw" else lin2alaw, ints))
    return one * 2


WAV_TAGS = {"pcm_s16le": 1, "pcm_f32le": 3, "pcm_alaw": 6, "pcm_mulaw": 7}
UNKNOWN_SIZE = 0xFFFFFFFF


def wav_header(encoding: str, rate: int, nframes: int | None) -> bytes:
    """A mono RIFF/WAVE header.  nframes None: "unknown length" placeholders (0xFFFFFFFF)."""
    tag, width = WAV_TAGS[encoding], ENCODINGS[encoding]
    fmt = (tag, 1, rate, rate * width, width, width * 8)
    chunks = b"fmt " + (b"\x10\x00\x00\x00" + struct.pack("<HHIIHH", *fmt) if tag == 1 else
                        b"\x12\x00\x00\x00" + struct.pack("<HHIIHHH", *fmt, 0))
    if tag != 1:  # non-PCM formats carry a fact chunk: the number of samples
        chunks += b"fact\x04\x00\x00\x00" + struct.pack("<I", UNKNOWN_SIZE if nframes is None else nframes)
    if nframes is None:
        data_size = riff_size = UNKNOWN_SIZE
    else:
        data_size = nframes * width
        riff_size = 4 + len(chunks) + 8 + data_size + (data_size & 1)  # odd chunks get a pad byte
    return b"RIFF" + struct.pack("<I", riff_size) + b"WAVE" + chunks + b"data" + struct.pack("<I", data_size)


# sample rate -> (MPEG version bits: 3 MPEG-1, 2 MPEG-2, 0 MPEG-2.5; sample-rate index)
MP3_RATES = {44100: (3, 0), 48000: (3, 1), 22050: (2, 0), 24000: (2, 1), 16000: (2, 2), 8000: (0, 2)}
MP3_KBPS_V1 = (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)   # Layer III
MP3_KBPS_V2 = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)       # MPEG-2 and 2.5


@lru_cache(maxsize=32)
def mp3_silent_frame(rate: int, bit_rate: int) -> tuple[bytes, int]:
    """One silent mono MPEG Layer III frame and its samples per frame.

    Every sample rate Cartesia offers exists in some MPEG version: 44.1/48 kHz in MPEG-1
    (1152 samples a frame), 16/22.05/24 kHz in MPEG-2 and 8 kHz in MPEG-2.5 (576).  The header
    says: no CRC, no padding, mono; the bitrate is the largest of the version's table that is
    <= bit_rate.  The side information (17 bytes in MPEG-1 mono, 9 in MPEG-2/2.5) and the
    main data are all zero: main_data_begin 0, part2_3_length 0, big_values 0, i.e. no
    Huffman data, which every decoder renders as silence.  The frame length is the standard
    floor(samples/8 * bitrate / rate) bytes, so frames follow each other without padding."""
    version, rate_index = MP3_RATES[rate]
    table = MP3_KBPS_V1 if version == 3 else MP3_KBPS_V2
    kbps = max([k for k in table if k * 1000 <= bit_rate] or [table[0]])
    spf = 1152 if version == 3 else 576
    size = spf // 8 * kbps * 1000 // rate
    header = ((0x7FF << 21) | (version << 19) | (1 << 17)   # sync, version, layer III
              | (1 << 16)                                   # protection bit 1: no CRC
              | ((table.index(kbps) + 1) << 12) | (rate_index << 10)
              | (3 << 6))                                   # channel mode 11: mono
    return struct.pack(">I", header) + bytes(size - 4), spf


def audio_pieces(req, nsamples: int, wav_sizes: str):
    """(audio seconds generated so far, bytes) per piece of the response body.  req is a
    validated cartesia_validation.TTSRequest: only its container, encoding, rate, bit_rate and
    volume are read (duck-typed, so this module imports nothing above it)."""
    rate = req.rate
    if req.container == "mp3":
        frame, spf = mp3_silent_frame(rate, req.bit_rate)
        nframes = -(-nsamples // spf)
        per_piece = max(1, round(PIECE_SECONDS * rate / spf))
        for first in range(0, nframes, per_piece):
            n = min(per_piece, nframes - first)
            yield (first + n) * spf / rate, frame * n
        return
    width = ENCODINGS[req.encoding]
    table = tone(req.encoding, rate, req.volume)
    header = b""
    if req.container == "wav":
        header = wav_header(req.encoding, rate, None if wav_sizes == "unknown" else nsamples)
    per_piece = max(1, round(PIECE_SECONDS * rate))
    pos = 0
    while pos < nsamples:
        n = min(per_piece, nsamples - pos)
        start = pos % rate
        piece = table[start * width:(start + n) * width]
        pos += n
        if pos == nsamples and req.container == "wav" and wav_sizes != "unknown" and (n * width) & 1:
            piece += b"\x00"  # RIFF pad byte after an odd-sized data chunk
        yield pos / rate, header + piece
        header = b""
