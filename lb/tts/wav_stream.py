"""WAV byte stream -> raw PCM samples, as the bytes arrive (sans-io).

A backend's WAV answer is turned into PCM (for SSE deltas, for re-wrapping
with true sizes) while it is still streaming, so the header is parsed
incrementally and no feed waits for the whole file.  Streaming servers
write "unknown size" headers (RIFF size 0x7FFFFFFF-36, data size
0xFFFFFFFF), so the data chunk's size is only trusted when it is a real
value: then bytes after it are a trailing chunk, not audio, and are dropped.

Returned PCM is always whole sample frames (a multiple of block_align): a
split sample would swap the byte order of everything after it downstream.
"""

from __future__ import annotations

import struct

UNKNOWN_RIFF_SIZE = 0x7FFFFFFF - 36     # as chatterbox-tts-api writes it
UNKNOWN_DATA_SIZE = 0xFFFFFFFF
MAX_HEADER_BYTES = 64 * 1024            # RIFF header + every chunk before "data"
FORMAT_PCM = 1
FORMAT_EXTENSIBLE = 0xFFFE
# The tail of KSDATAFORMAT_SUBTYPE_PCM's GUID; its first two bytes are the format tag.
_SUBFORMAT_GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")

_RIFF, _CHUNK, _FMT, _SKIP, _DATA, _TRAILER = range(6)


class WavError(ValueError):
    """The stream is not a WAV this balancer can pass on as 16-bit PCM."""


def pcm_to_wav_header(sample_rate: int = 24000, channels: int = 1,
                      data_bytes: int | None = None) -> bytes:
    """A 44-byte header for 16-bit PCM.  None: the streaming form with the
    sizes set to "unknown" (the data size 0xFFFFFFFF, RIFF size 0x7FFFFFFF-36)."""
    if data_bytes is None:
        riff, data = UNKNOWN_RIFF_SIZE, UNKNOWN_DATA_SIZE
    elif 0 <= data_bytes <= 0xFFFFFFFF - 36:
        riff, data = 36 + data_bytes, data_bytes
    else:
        raise ValueError(f"data_bytes {data_bytes} does not fit a WAV header")
    block_align = channels * 2
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, FORMAT_PCM, channels, sample_rate,
                          sample_rate * block_align, block_align, 16)
            + b"data" + struct.pack("<I", data))


class SampleAligner:
    """Passes bytes on in whole samples (frames), carrying a partial one to the next feed."""

    def __init__(self, block_align: int = 2):
        if block_align < 1:
            raise ValueError("block_align must be at least 1")
        self.block_align = block_align
        self._carry = b""

    @property
    def pending(self) -> int:
        """Bytes of an incomplete sample held back."""
        return len(self._carry)

    def feed(self, chunk: bytes | bytearray | memoryview) -> bytes:
        data = self._carry + chunk if self._carry else bytes(chunk)
        cut = len(data) - len(data) % self.block_align
        self._carry = data[cut:]
        return data[:cut]


class WavStripper:
    """Feed WAV bytes in any chunks; get the PCM sample bytes out of them."""

    def __init__(self, max_header_bytes: int = MAX_HEADER_BYTES):
        self.max_header_bytes = max_header_bytes
        self.sample_rate: int | None = None
        self.channels: int | None = None
        self.bits_per_sample: int | None = None
        self.format_tag: int | None = None
        self._state = _RIFF
        self._need = 12                 # bytes of the header field being collected
        self._buf = bytearray()
        self._consumed = 0              # header bytes used up so far (bounded)
        self._skip = 0                  # bytes of an unwanted chunk still to skip
        self._fmt_pad = 0
        self._remaining: int | None = None   # data bytes still expected; None: to the end
        self._aligner: SampleAligner | None = None
        self._error: WavError | None = None

    @property
    def format_known(self) -> bool:
        return self.format_tag is not None

    @property
    def header_done(self) -> bool:
        """The data chunk has begun: everything from here on is audio (or trailer)."""
        return self._state in (_DATA, _TRAILER)

    def feed(self, chunk: bytes | bytearray | memoryview) -> bytes:
        """The PCM available so far (maybe b"").  After a WavError every feed re-raises it."""
        if self._error is not None:
            raise self._error
        try:
            return self._feed(memoryview(chunk).cast("B"))
        except WavError as e:
            self._error = e
            raise

    def finish(self) -> None:
        """The stream has ended; raises WavError if it ended before the audio began.
        An incomplete last sample is dropped (it cannot be played)."""
        if self._error is not None:
            raise self._error
        if not self.header_done:
            raise WavError(f"WAV ended inside its header (after {self._consumed + len(self._buf)}"
                           " bytes, before the data chunk)")

    def _feed(self, chunk: memoryview) -> bytes:
        pos, end = 0, len(chunk)
        # Every pass consumes at least one byte: bounded by len(chunk).
        while pos < end and self._state not in (_DATA, _TRAILER):
            if self._state == _SKIP:
                n = min(self._skip, end - pos)
                pos += n
                self._skip -= n
                self._consumed += n
                if self._skip == 0:
                    self._expect(_CHUNK, 8)
                continue
            take = min(self._need - len(self._buf), end - pos)
            self._buf += chunk[pos:pos + take]
            pos += take
            if len(self._buf) == self._need:
                field = bytes(self._buf)
                self._buf.clear()
                self._consumed += len(field)
                self._on_field(field)
        if self._state == _TRAILER or pos == end:
            return b""
        rest = chunk[pos:]
        if self._remaining is not None:
            if len(rest) >= self._remaining:
                # The data chunk's real end: what follows is another chunk, not audio.
                rest = rest[:self._remaining]
                self._state = _TRAILER
            self._remaining -= len(rest)
        assert self._aligner is not None
        return self._aligner.feed(rest)

    def _expect(self, state: int, need: int) -> None:
        self._state, self._need = state, need

    def _on_field(self, field: bytes) -> None:
        if self._state == _RIFF:
            if field[:4] != b"RIFF" or field[8:12] != b"WAVE":
                raise WavError(f"not a RIFF/WAVE file (starts with {field[:4]!r}..{field[8:12]!r})")
            self._expect(_CHUNK, 8)
        elif self._state == _CHUNK:
            self._on_chunk_header(field[:4], struct.unpack("<I", field[4:])[0])
        elif self._state == _FMT:
            self._on_fmt(field)
            if self._fmt_pad:
                self._skip = 1
                self._state = _SKIP
            else:
                self._expect(_CHUNK, 8)

    def _on_chunk_header(self, chunk_id: bytes, size: int) -> None:
        if chunk_id == b"data":
            if not self.format_known:
                raise WavError("WAV data chunk comes before its fmt chunk")
            self._remaining = None if size in (0, UNKNOWN_DATA_SIZE) else size
            self._state = _DATA
            return
        padded = size + (size & 1)      # RIFF chunks are word-aligned
        if self._consumed + padded > self.max_header_bytes:
            raise WavError(f"WAV header runs past {self.max_header_bytes} bytes before the data"
                           f" chunk ({chunk_id!r} chunk of {size} bytes at offset {self._consumed - 8})")
        if chunk_id == b"fmt ":
            if self.format_known:
                raise WavError("WAV has a second fmt chunk")
            if size < 16:
                raise WavError(f"WAV fmt chunk is {size} bytes (at least 16 needed)")
            self._fmt_pad = size & 1
            self._expect(_FMT, size)
        elif padded:
            self._skip = padded
            self._state = _SKIP
        # else: an empty chunk; the next chunk header follows directly.

    def _on_fmt(self, fmt: bytes) -> None:
        tag, channels, rate, _byte_rate, _align, bits = struct.unpack("<HHIIHH", fmt[:16])
        if tag == FORMAT_EXTENSIBLE:
            if len(fmt) < 40:
                raise WavError(f"WAV extensible fmt chunk is {len(fmt)} bytes (40 needed)")
            sub_tag, tail = struct.unpack("<H", fmt[24:26])[0], fmt[26:40]
            if sub_tag != FORMAT_PCM or tail != _SUBFORMAT_GUID_TAIL:
                raise WavError(f"WAV extensible sub-format is not PCM ({fmt[24:40].hex()})")
        elif tag != FORMAT_PCM:
            raise WavError(f"WAV format tag {tag:#06x} is not PCM (1) or extensible (0xfffe)")
        if bits != 16:
            raise WavError(f"WAV has {bits} bits per sample (only 16-bit PCM is passed on)")
        if channels < 1 or rate < 1:
            raise WavError(f"WAV fmt chunk has {channels} channels at {rate} Hz")
        self.format_tag, self.channels, self.sample_rate, self.bits_per_sample = (
            tag, channels, rate, bits)
        self._aligner = SampleAligner(channels * bits // 8)
