"""Streaming PCM <-> mp3/opus/aac/flac with FFmpeg's codecs (through PyAV).

GPU servers send raw s16le mono PCM as they synthesize it; a caller of
/v1/audio/speech may want `response_format` mp3, opus, aac or flac.
`StreamEncoder` turns PCM into that format piece by piece, so the first
encoded bytes leave while the rest is still being synthesized.
`StreamDecoder` goes the other way for a server that only answers mp3
(the real ChatTTS zips mp3 files).

Streaming, container by container (all measured: bytes come out during
`feed`, none of the four waits for `finish`):
  mp3  -> raw MP3 frames ("mp3" muxer, no ID3 tag, no Xing header);
          libmp3lame holds back ~2 frames (576 samples each at 24 kHz).
  opus -> Ogg Opus ("ogg"), a page (OGG_PAGE_US) at a time.
  aac  -> ADTS ("adts"), a frame (1024 samples) at a time after one of delay.
  flac -> native FLAC ("flac"), a frame (2304 samples at 24 kHz) at a time;
          STREAMINFO's total samples stays 0, "unknown" (no rewinding).
The output object has write() and nothing else, so PyAV hands FFmpeg a
non-seekable AVIOContext: no muxer tries to go back to patch a header.

Cost (measured: 10 s of speech-shaped 24 kHz audio in 100 ms feeds, one
core): mp3 ~140 ms, opus ~110 ms, aac ~90 ms, flac ~15 ms, i.e. 0.2-1.4 % of
real time, the slowest 100 ms feed ~2.5 ms; decoding 10 s of mp3 ~25 ms.
A feed encodes only the whole codec frames it completes, so its work is
proportional to its input and it holds the event loop for milliseconds.
Frames are built from bytes: numpy is not a dependency of the balancer.
"""

from __future__ import annotations

import functools
from fractions import Fraction

try:
    import av
except ImportError:             # the balancer still serves wav/pcm without it
    av = None

ENCODED_FORMATS = ("mp3", "opus", "aac", "flac")

# One Ogg page per ~100 ms of opus: measured page overhead ~6 % at 32 kb/s
# (~2 % at FFmpeg's 1 s pages, which would hold the first second back).
OGG_PAGE_US = 100_000

# format -> (muxer, encoder, bit rate (None: the codec's), muxer options).  Rates
# for mono speech: FFmpeg's defaults (lame ~35k, opus 64k, aac 69k) are thin or lavish.
_RECIPES = {
    "mp3": ("mp3", "libmp3lame", 64_000, {"id3v2_version": "0", "write_xing": "0"}),
    "opus": ("ogg", "libopus", 32_000, {"page_duration": str(OGG_PAGE_US)}),
    "aac": ("adts", "aac", 64_000, {}),
    # No 8 KiB of padding after the header for tags added later: there is no later.
    "flac": ("flac", "flac", None, {"metadata_header_padding": "0"}),
}

# Decoding reads the bare stream with the codec's parser (no demuxer: it
# would want to probe and seek).  Not flac: FFmpeg's flac parser holds ~1 s
# of frames back and gives them up one per flush call.  Not opus: Ogg needs
# a demuxer.
_DECODERS = {"mp3": "mp3", "aac": "aac"}
_MAX_FLUSHES = 64   # parse(None) returns one held packet per call; mp3/aac hold ~1

_SAMPLE_BYTES = 2   # s16le mono


@functools.cache
def available() -> tuple[str, ...]:
    """The ENCODED_FORMATS this install can encode: PyAV importable and its
    FFmpeg built with the encoder and the muxer."""
    if av is None:
        return ()
    found = []
    for fmt in ENCODED_FORMATS:
        muxer, codec, _, _ = _RECIPES[fmt]
        try:
            av.Codec(codec, "w")
            av.ContainerFormat(muxer, "w")
        except (ValueError, av.FFmpegError):
            continue
        found.append(fmt)
    return tuple(found)


def _codec_rate(codec: str, rate: int) -> int:
    """`rate` if the encoder takes it, else the next higher rate it takes (the
    top one if none is higher); PyAV resamples frames to it on the way in."""
    rates = av.Codec(codec, "w").audio_rates
    if not rates or rate in rates:
        return rate
    return min((r for r in rates if r >= rate), default=max(rates))


class _ByteSink:
    """The muxer's output: appends to a buffer drained after every mux.
    Deliberately no seek()/tell(), which makes PyAV's AVIOContext non-seekable."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def write(self, data: bytes) -> int:
        self._buf += data
        return len(data)

    def drain(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


class StreamEncoder:
    """s16le mono PCM in, `fmt` bytes out as soon as the codec gives them."""

    def __init__(self, fmt: str, sample_rate: int = 24000) -> None:
        if fmt not in available():
            raise ValueError(f"cannot encode {fmt!r}: this install encodes {available()}")
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, not {sample_rate}")
        muxer, codec, bit_rate, options = _RECIPES[fmt]
        self.fmt = fmt
        self._rate = sample_rate
        self._time_base = Fraction(1, sample_rate)
        self._sink = _ByteSink()
        # flush_packets: each packet reaches the sink at once, not when PyAV's 32 KiB
        # IO buffer fills (seconds of audio).  FFmpeg's default does so here too.
        self._out = av.open(self._sink, mode="w", format=muxer,
                            container_options={"flush_packets": "1", **options})
        self._stream = self._out.add_stream(codec, rate=_codec_rate(codec, sample_rate),
                                            layout="mono")
        ctx = self._stream.codec_context
        if bit_rate:
            ctx.bit_rate = bit_rate
        ctx.open()   # now, not at the first mux: the frame size is known after open
        self._frame_bytes = (ctx.frame_size or 1024) * _SAMPLE_BYTES
        self._pending = bytearray()
        self._pts = 0
        self._finished = False

    def feed(self, pcm: bytes) -> bytes:
        """Encode the whole codec frames now available; returns what the muxer wrote."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._pending += pcm
        whole = len(self._pending) - len(self._pending) % self._frame_bytes
        for start in range(0, whole, self._frame_bytes):
            self._encode(self._pending[start:start + self._frame_bytes])
        del self._pending[:whole]
        return self._sink.drain()

    def finish(self) -> bytes:
        """Encode the short last frame, flush the codec, write the trailer.
        A dangling odd byte (half a sample) is dropped.  Idempotent."""
        if self._finished:
            return b""
        self._finished = True
        tail = len(self._pending) - len(self._pending) % _SAMPLE_BYTES
        if tail:   # shorter than frame_size: FFmpeg pads it (or the codec takes it short)
            self._encode(self._pending[:tail])
        self._pending.clear()
        self._out.mux(self._stream.encode(None))
        self._out.close()
        return self._sink.drain()

    def _encode(self, pcm: bytearray) -> None:
        samples = len(pcm) // _SAMPLE_BYTES
        frame = av.AudioFrame(format="s16", layout="mono", samples=samples)
        frame.planes[0].update(pcm)
        frame.sample_rate = self._rate
        frame.time_base = self._time_base
        frame.pts = self._pts
        self._pts += samples
        # PyAV converts to the encoder's sample format/rate (s16p, fltp, ...).
        self._out.mux(self._stream.encode(frame))


def _id3v2_size(head: bytes) -> int:
    """Bytes taken by an ID3v2 tag at the start of `head` (>= 10 bytes), else 0:
    4 "synchsafe" size bytes (7 bits each) + the header's 10 (+ a footer's 10)."""
    if head[:3] != b"ID3":
        return 0
    size = 0
    for b in head[6:10]:
        size = (size << 7) | (b & 0x7F)
    return size + 10 + (10 if head[5] & 0x10 else 0)


class StreamDecoder:
    """Compressed bytes in (mp3; also ADTS aac), s16le mono PCM at
    `sample_rate` out.  One decoder per file: an ID3v2 tag is skipped only at
    the start.  A packet the codec rejects is dropped and counted in
    `dropped` (as the ffmpeg tool does) rather than ending the stream."""

    def __init__(self, fmt: str = "mp3", sample_rate: int = 24000) -> None:
        if av is None or fmt not in _DECODERS:
            raise ValueError(f"cannot decode {fmt!r}: decodes {tuple(_DECODERS) if av else ()}")
        self._codec = av.CodecContext.create(_DECODERS[fmt], "r")
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
        self._head = bytearray()    # the first bytes, until we know if they are a tag
        self._skip = -1             # tag bytes still to skip; -1: not yet known
        self._first_packet = fmt == "mp3"
        self._finished = False
        self.dropped = 0

    def feed(self, data: bytes) -> bytes:
        """The PCM of the frames `data` completes."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        data = self._strip_tag(data)
        if not data:        # parse(b"") would flush the parser mid-stream
            return b""
        return self._decode(self._codec.parse(data))

    def finish(self) -> bytes:
        """The PCM of what the parser, decoder and resampler still hold."""
        if self._finished:
            return b""
        self._finished = True
        rest = bytes(self._head) if self._skip < 0 else b""   # under 10 bytes, never a tag
        packets = self._codec.parse(rest) if rest else []
        for _ in range(_MAX_FLUSHES):
            held = self._codec.parse(None)
            if not held:
                break
            packets += held
        out = self._decode(packets) + self._decode([None])
        return out + self._pcm(self._resampler.resample(None))

    def _strip_tag(self, data: bytes) -> bytes:
        if self._skip < 0:
            self._head += data
            if len(self._head) < 10:
                return b""
            data, self._head = bytes(self._head), bytearray()
            self._skip = _id3v2_size(data)
        if self._skip:
            cut = min(self._skip, len(data))
            self._skip -= cut
            data = data[cut:]
        return data

    def _decode(self, packets: list) -> bytes:
        out = []
        for packet in packets:
            if packet is not None and self._first_packet:
                self._first_packet = False
                # A Xing/Info (VBR/gapless) header rides in an otherwise silent
                # first frame; the demuxer would hide it, the parser does not.
                head = bytes(packet)[4:40]
                if b"Xing" in head or b"Info" in head:
                    continue
            try:
                frames = self._codec.decode(packet)
            except av.InvalidDataError:
                self.dropped += 1
                continue
            for frame in frames:
                out.append(self._pcm(self._resampler.resample(frame)))
        return b"".join(out)

    @staticmethod
    def _pcm(frames: list) -> bytes:
        # A plane's buffer may be padded past the samples; cut it to them.
        return b"".join(bytes(f.planes[0])[: f.samples * _SAMPLE_BYTES] for f in frames)
