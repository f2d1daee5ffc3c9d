"""What a kind = "openai" route can give, and how one call will be served:
straight through to OpenAI-style servers as before, or by the front door
(speech_service) over whatever API each backend speaks, cut into pieces
when it is long.  Sans-io: decided from the configuration and the call,
before any backend is touched.
"""

from __future__ import annotations

from ..config_model import Speech, Voice
from .backend_apis import API_MAX_CHARS, Piece
from .openai_speech import OPENAI_VOICES, RESPONSE_FORMATS, SpeechCall, SpeechError
from .text_split import should_split, split_text

FIRST_PIECE_MAX = 200       # characters: the first piece is short, so audio starts soon
PCM_FORMATS = ("wav", "pcm")   # made from PCM by the balancer itself, always


def api_of(backend) -> str:
    """The API a backend speaks on an openai route ("" in its config: OpenAI's)."""
    return backend.cfg.api or "openai"


def _declared(backend) -> tuple[str, ...]:
    """What an OpenAI-style server makes itself: WAV unless it says more."""
    return backend.cfg.formats or ("wav",)


class SpeechPlan:
    """One openai route's front door, over the backends of the moment."""

    def __init__(self, speech: Speech):
        self.speech = speech
        self.voices: dict[str, Voice] = dict(speech.voices)
        # The OpenAI names always work (frameworks send nothing else); those
        # not mapped get each API's default voice.
        self.known_voices = tuple(dict.fromkeys((*OPENAI_VOICES, *self.voices)))

    def formats(self, backends) -> tuple[str, ...]:
        """response_format values this route can answer: wav and pcm always,
        the others where the balancer can encode them or every server makes them."""
        from .encoders import available
        encodable = set(available())
        native = set.intersection(*(set(_declared(b)) for b in backends)) \
            if backends and all(api_of(b) == "openai" for b in backends) else set()
        return tuple(f for f in RESPONSE_FORMATS
                     if f in PCM_FORMATS or f in encodable or f in native)

    def max_chars(self, backends) -> int:
        """The longest text every backend takes."""
        return min((b.cfg.max_chars or API_MAX_CHARS[api_of(b)] for b in backends),
                   default=API_MAX_CHARS["openai"])

    def passes_through(self, call: SpeechCall, backends) -> bool:
        """True when the call goes to the servers as it came, byte for byte:
        every server is OpenAI-style and makes what was asked itself, the
        voice keeps its name, and the text is not to be cut."""
        if not backends or any(api_of(b) != "openai" for b in backends):
            return False
        voice = self.voices.get(call.voice)
        if voice is not None and voice.openai not in (None, call.voice):
            return False
        for backend in backends:
            declared = _declared(backend)
            if call.format_named and call.response_format not in declared:
                return False
            if call.sse and "sse" not in declared:
                return False
        return not self._cut(call, backends)

    def _cut(self, call: SpeechCall, backends) -> bool:
        split = self.speech.split
        return split.enabled and should_split(call.text, min_chars=split.min_chars,
                                              max_chars=self.max_chars(backends))

    def pieces(self, call: SpeechCall, backends) -> list[Piece]:
        """The call's pieces, in order (one when it is not cut); SpeechError
        for a text no backend takes whole when splitting is off."""
        limit = self.max_chars(backends)
        split = self.speech.split
        if self._cut(call, backends):
            texts = split_text(call.text, max_chars=limit,
                               first_max=min(limit, FIRST_PIECE_MAX),
                               target=min(limit, split.min_chars))
        elif len(call.text) > limit:
            raise SpeechError(f"'input' is {len(call.text)} characters; the servers here take "
                              f"at most {limit} at once and splitting is off "
                              "(split.enabled = false).", param="input",
                              code="string_above_max_length")
        else:
            texts = [call.text]
        native = self._native(call, backends, len(texts))
        voice = self.voices.get(call.voice)
        return [Piece(text=t, voice_name=call.voice, voice=voice, speed=call.speed,
                      fields=call.fields, native=native) for t in texts]

    def _native(self, call: SpeechCall, backends, count: int) -> str | None:
        """An encoded format every server makes itself, for a call of one
        piece: asked for and passed through (pieces are joined as PCM)."""
        fmt = call.response_format
        if count != 1 or fmt in PCM_FORMATS:
            return None
        if backends and all(api_of(b) == "openai" and fmt in _declared(b) for b in backends):
            return fmt
        return None
