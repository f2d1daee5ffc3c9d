"""PCM in, the caller's answer out: `response_format`, optionally framed as
OpenAI's SSE events.  Sans-io.

    pcm   the samples themselves (24 kHz mono s16le), no container byte
    wav   a 44-byte "unknown size" header, then the samples (a stream's
          length is not known when its first bytes go out)
    mp3, opus, aac, flac   encoded as the samples arrive (encoders), or the
          server's own bytes passed through (`native`)
    sse   `data: {"type":"speech.audio.delta","audio":"<base64>"}` for each
          piece of audio in the format above, then speech.audio.done with usage
"""

from __future__ import annotations

import base64

import orjson

from .translate import SAMPLE_RATE
from .wav_stream import pcm_to_wav_header

BYTES_PER_SECOND = SAMPLE_RATE * 2
CONTENT_TYPES = {"mp3": b"audio/mpeg", "opus": b"audio/opus", "aac": b"audio/aac",
                 "flac": b"audio/flac", "wav": b"audio/wav", "pcm": b"audio/pcm"}
SSE_TYPE = b"text/event-stream"


class SpeechOutput:
    def __init__(self, fmt: str, *, sse: bool, native: bool = False):
        self.fmt, self.sse = fmt, sse
        self.content_type = SSE_TYPE if sse else CONTENT_TYPES[fmt]
        self.audio_bytes = 0            # PCM seen (for the usage figures)
        self._native = native           # the server's own encoded bytes: not PCM
        self._encoder = None
        if fmt not in ("pcm", "wav") and not native:
            from .encoders import StreamEncoder   # FFmpeg: loaded only where it is needed
            self._encoder = StreamEncoder(fmt, SAMPLE_RATE)
        self._started = False

    def feed(self, audio: bytes) -> bytes:
        """The caller's bytes for this audio (PCM, or native bytes passed through)."""
        if not self._native:
            self.audio_bytes += len(audio)
        out = b""
        if not self._started:
            self._started = True
            if self.fmt == "wav":
                out = pcm_to_wav_header(SAMPLE_RATE, 1, None)
        if self._encoder is not None:
            out += self._encoder.feed(audio)
        else:
            out += audio
        return self._frame(out)

    def finish(self, *, characters: int) -> bytes:
        """What is left: the encoder's tail, and for SSE the done event."""
        out = b""
        if not self._started:    # no audio at all: still a well-formed answer
            self._started = True
            if self.fmt == "wav":
                out = pcm_to_wav_header(SAMPLE_RATE, 1, 0)
        if self._encoder is not None:
            out += self._encoder.finish()
        framed = self._frame(out)
        if self.sse:
            framed += event({"type": "speech.audio.done", "usage": self.usage(characters)})
        return framed

    def usage(self, characters: int) -> dict:
        """OpenAI counts tokens; these servers have none: an estimate of the
        input's (about 4 characters a token), and what was made, in seconds."""
        tokens = max(1, round(characters / 4))
        usage = {"input_tokens": tokens, "output_tokens": 0, "total_tokens": tokens,
                 "input_characters": characters}
        if not self._native:
            usage["audio_seconds"] = round(self.audio_bytes / BYTES_PER_SECOND, 3)
        return usage

    def _frame(self, data: bytes) -> bytes:
        if not data or not self.sse:
            return data
        return event({"type": "speech.audio.delta",
                      "audio": base64.b64encode(data).decode("ascii")})


def event(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"
