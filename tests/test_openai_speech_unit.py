"""Sans-io tests for the OpenAI front door's decisions: reading a call
(openai_speech), what a route can give and how a call is served
(speech_plan), the caller's bytes (speech_output), and the configuration
keys (config_speech)."""

from __future__ import annotations

import base64
import io
import wave
from types import SimpleNamespace

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.config_model import ConfigError, Speech, Split, Voice
from lb.control.config import parse
from lb.tts.openai_speech import OPENAI_VOICES, SpeechError, error_body, read_speech
from lb.tts.speech_output import SpeechOutput
from lb.tts.speech_plan import SpeechPlan

ALL_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")


def read(body, *, voices=OPENAI_VOICES, pass_unknown=False, formats=ALL_FORMATS,
         max_input=4096, default_format="mp3"):
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return read_speech(raw, known_voices=voices, pass_unknown=pass_unknown, formats=formats,
                       max_input=max_input, default_format=default_format)


def refused(body, **kw) -> SpeechError:
    with pytest.raises(SpeechError) as info:
        read(body, **kw)
    return info.value


# --- reading a call

def test_a_pipecat_call_reads_whole():
    call = read({"input": "Hello.", "model": "gpt-4o-mini-tts", "voice": "alloy",
                 "response_format": "pcm", "speed": 1.25})
    assert (call.text, call.voice, call.response_format, call.speed, call.sse) == \
        ("Hello.", "alloy", "pcm", 1.25, False)
    assert call.format_named and call.model == "gpt-4o-mini-tts"


def test_defaults_are_openais_mp3_or_the_paths_own():
    assert read({"input": "Hi", "voice": "nova"}).response_format == "mp3"
    call = read({"input": "Hi", "voice": "nova"}, default_format="wav")
    assert call.response_format == "wav" and not call.format_named


def test_livekit_sse_call():
    call = read({"input": "Hi", "voice": "ash", "model": "gpt-4o-mini-tts",
                 "stream_format": "sse", "response_format": "mp3"})
    assert call.sse and call.response_format == "mp3"


def test_no_voice_means_each_servers_default():
    assert read({"input": "Hi"}).voice is None


@pytest.mark.parametrize("body,param,code", [
    (b"{nope", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_json"),
    ({"voice": "alloy"}, "input", "missing_required_parameter"),
    ({"input": 5, "voice": "alloy"}, "input", "invalid_type"),
    ({"input": "   ", "voice": "alloy"}, "input", "empty_input"),
    ({"input": "x" * 4097, "voice": "alloy"}, "input", "string_above_max_length"),
    ({"input": "Hi", "voice": "bob"}, "voice", "invalid_value"),
    ({"input": "Hi", "voice": ["alloy"]}, "voice", "invalid_type"),
    ({"input": "Hi", "voice": "alloy", "response_format": "ogg"}, "response_format",
     "invalid_value"),
    ({"input": "Hi", "voice": "alloy", "response_format": 3}, "response_format",
     "invalid_value"),
    ({"input": "Hi", "voice": "alloy", "speed": "fast"}, "speed", "invalid_type"),
    ({"input": "Hi", "voice": "alloy", "speed": True}, "speed", "invalid_type"),
    ({"input": "Hi", "voice": "alloy", "speed": 0.2}, "speed", "invalid_value"),
    ({"input": "Hi", "voice": "alloy", "speed": 4.5}, "speed", "invalid_value"),
    ({"input": "Hi", "voice": "alloy", "stream_format": "ws"}, "stream_format",
     "invalid_value"),
    ({"input": "Hi", "voice": "alloy", "model": ""}, "model", "invalid_type"),
    ({"input": "Hi", "voice": "alloy", "instructions": 7}, "instructions", "invalid_type"),
])
def test_bad_calls_name_the_field(body, param, code):
    exc = refused(body)
    assert (exc.status, exc.param, exc.code) == (400, param, code)


def test_unknown_voice_lists_the_known_ones_unless_passed():
    exc = refused({"input": "Hi", "voice": "bob"})
    assert all(v in exc.message for v in OPENAI_VOICES)
    assert read({"input": "Hi", "voice": "bob"}, pass_unknown=True).voice == "bob"


def test_a_format_the_route_cannot_give_names_those_it_can():
    exc = refused({"input": "Hi", "voice": "alloy", "response_format": "mp3"},
                  formats=("wav", "pcm"))
    assert "wav, pcm" in exc.message


@given(st.binary(max_size=200))
def test_any_bytes_are_a_call_or_a_400(raw):
    try:
        read(raw)
    except SpeechError as exc:
        assert exc.status == 400 and exc.message


def test_error_body_is_openais_shape():
    doc = orjson.loads(error_body(400, "bad", param="voice", code="invalid_value"))
    assert doc == {"error": {"message": "bad", "type": "invalid_request_error",
                             "param": "voice", "code": "invalid_value"}}
    assert orjson.loads(error_body(503, "full"))["error"]["type"] == "server_error"


# --- the plan

def backend(name, api="", formats=(), max_chars=0):
    return SimpleNamespace(name=name, cfg=SimpleNamespace(api=api, formats=formats,
                                                          max_chars=max_chars))


OPENAI_FLEET = [backend("a"), backend("b", api="openai")]


def test_openai_servers_take_a_plain_call_as_it_came():
    plan = SpeechPlan(Speech())
    assert plan.passes_through(read({"input": "Hi", "voice": "alloy"}), OPENAI_FLEET)
    assert plan.passes_through(read({"input": "Hi", "voice": "alloy",
                                     "response_format": "wav"}), OPENAI_FLEET)


@pytest.mark.parametrize("body", [
    {"input": "Hi", "voice": "alloy", "response_format": "pcm"},    # not declared: stripped here
    {"input": "Hi", "voice": "alloy", "stream_format": "sse"},      # SSE made here
    {"input": "Long sentence here. " * 20, "voice": "alloy"},       # over split.min_chars
])
def test_what_openai_servers_do_not_make_goes_through_the_door(body):
    assert not SpeechPlan(Speech()).passes_through(read(body), OPENAI_FLEET)


def test_declared_formats_pass_through():
    fleet = [backend("a", formats=("pcm", "sse", "wav"))]
    call = read({"input": "Hi", "voice": "alloy", "response_format": "pcm",
                 "stream_format": "sse"})
    assert SpeechPlan(Speech()).passes_through(call, fleet)


def test_other_apis_and_renamed_voices_never_pass_through():
    call = read({"input": "Hi", "voice": "alloy"})
    assert not SpeechPlan(Speech()).passes_through(call, [backend("a"), backend("c", "chatterbox")])
    renamed = SpeechPlan(Speech(voices=(("alloy", Voice(openai="Emily.wav")),)))
    assert not renamed.passes_through(call, OPENAI_FLEET)


def test_formats_wav_and_pcm_always_native_ones_only_when_all_make_them():
    plan = SpeechPlan(Speech())
    assert {"wav", "pcm"} <= set(plan.formats([backend("c", "chattts")]))
    mixed = [backend("a", formats=("wav", "flac")), backend("b", formats=("wav", "mp3"))]
    assert "wav" in plan.formats(mixed)


def test_long_text_is_cut_first_sentence_first():
    plan = SpeechPlan(Speech(split=Split(min_chars=100)))
    text = "First one. " + " ".join(f"Sentence {i} goes on a while." for i in range(30))
    pieces = plan.pieces(read({"input": text, "voice": "alloy"}), [backend("c", "chatterbox")])
    assert pieces[0].text == "First one." and len(pieces) > 3
    assert all(len(p.text) <= 100 for p in pieces[1:])


def test_splitting_off_refuses_what_no_backend_takes_whole():
    plan = SpeechPlan(Speech(split=Split(enabled=False)))
    fleet = [backend("c", "chattts", max_chars=50)]
    with pytest.raises(SpeechError) as info:
        plan.pieces(read({"input": "word " * 20, "voice": "alloy"}), fleet)
    assert info.value.param == "input" and "split.enabled" in info.value.message
    assert len(plan.pieces(read({"input": "Short.", "voice": "alloy"}), fleet)) == 1


def test_voices_known_are_openais_and_the_configured():
    plan = SpeechPlan(Speech(voices=(("narrator", Voice(chattts=7)),)))
    assert plan.known_voices == (*OPENAI_VOICES, "narrator")
    piece, = plan.pieces(read({"input": "Hi", "voice": "narrator"},
                              voices=plan.known_voices), [backend("c", "chattts")])
    assert piece.voice.chattts == 7


# --- the caller's bytes

def test_pcm_is_the_samples_only():
    out = SpeechOutput("pcm", sse=False)
    assert out.feed(b"\x01\x02\x03\x04") + out.finish(characters=2) == b"\x01\x02\x03\x04"
    assert out.content_type == b"audio/pcm"


def test_wav_is_a_streaming_header_then_the_samples():
    out = SpeechOutput("wav", sse=False)
    body = out.feed(b"\x00\x01" * 2400) + out.feed(b"\x02\x03" * 2400) + out.finish(characters=1)
    assert body[:4] == b"RIFF" and len(body) == 44 + 9600
    with wave.open(io.BytesIO(body[:40] + (9600).to_bytes(4, "little") + body[44:])) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)


def test_empty_wav_is_still_a_file():
    assert SpeechOutput("wav", sse=False).finish(characters=1)[:4] == b"RIFF"


def test_sse_frames_each_piece_then_done_with_usage():
    out = SpeechOutput("pcm", sse=True)
    body = out.feed(b"\x01\x00" * 10) + out.finish(characters=40)
    events = [orjson.loads(b[6:]) for b in body.split(b"\n\n") if b]
    assert events[0]["type"] == "speech.audio.delta"
    assert base64.b64decode(events[0]["audio"]) == b"\x01\x00" * 10
    assert events[-1] == {"type": "speech.audio.done",
                          "usage": {"input_tokens": 10, "output_tokens": 0, "total_tokens": 10,
                                    "input_characters": 40, "audio_seconds": 0.0}}
    assert out.content_type == b"text/event-stream"


# --- configuration

def parsed(route: dict, backends=({"name": "a", "url": "http://127.0.0.1:1"},)):
    return parse({"backend": list(backends), "route": [route]})


def test_route_voices_split_and_models_parse():
    config = parsed({"path": "/v1/audio/speech", "kind": "openai", "pass_unknown_voices": True,
                     "models": ["tts-1"], "max_input": 8000,
                     "voices": {"alloy": {"openai": "Emily.wav",
                                          "chatterbox": {"seed": 3, "exaggeration": 0.7},
                                          "chattts": 2222},
                                "narrator": "Adrian.wav"},
                     "split": {"min_chars": 120, "parallel": 5}})
    speech = config.routes[0].speech
    assert speech.pass_unknown_voices and speech.models == ("tts-1",) and speech.max_input == 8000
    assert dict(speech.voices)["alloy"] == Voice("Emily.wav", (("seed", 3), ("exaggeration", 0.7)),
                                                 2222)
    assert dict(speech.voices)["narrator"] == Voice(openai="Adrian.wav")
    assert speech.split == Split(enabled=True, min_chars=120, parallel=5)


def test_backend_api_formats_and_max_chars_parse():
    config = parse({"backend": [{"name": "a", "url": "http://127.0.0.1:1", "api": "chattts",
                                 "formats": ["mp3", "pcm"], "max_chars": 1000}]})
    b = config.backends[0]
    assert (b.api, b.formats, b.max_chars) == ("chattts", ("mp3", "pcm"), 1000)


@pytest.mark.parametrize("route,key", [
    ({"voices": {"alloy": {"chattts": "seven"}}}, "route[0].voices.alloy.chattts"),
    ({"voices": {"alloy": {"chatterbox": {"text": "x"}}}}, "route[0].voices.alloy.chatterbox.text"),
    ({"voices": {"alloy": {"kokoro": "x"}}}, "route[0].voices.alloy.kokoro"),
    ({"voices": {"bad name": "x"}}, "route[0].voices.bad name"),
    ({"voices": 3}, "route[0].voices"),
    ({"split": {"parallel": 0}}, "route[0].split.parallel"),
    ({"split": {"size": 3}}, "route[0].split.size"),
    ({"models": []}, "route[0].models"),
    ({"max_input": 0}, "route[0].max_input"),
    ({"pass_unknown_voices": "yes"}, "route[0].pass_unknown_voices"),
])
def test_bad_front_door_keys_name_the_key(route, key):
    with pytest.raises(ConfigError) as info:
        parsed({"path": "/v1/audio/speech", "kind": "openai", **route})
    assert info.value.key == key


def test_front_door_keys_only_on_openai_routes():
    with pytest.raises(ConfigError) as info:
        parsed({"path": "/synthesize-json", "kind": "chatterbox", "voices": {}})
    assert info.value.key == "route[0].voices" and "openai" in info.value.reason


@pytest.mark.parametrize("entry,key", [
    ({"api": "kokoro"}, "api"), ({"formats": ["ogg"]}, "formats"), ({"formats": "mp3"}, "formats"),
    ({"max_chars": 0}, "max_chars"),
])
def test_bad_backend_api_keys(entry, key):
    with pytest.raises(ConfigError) as info:
        parse({"backend": [{"name": "a", "url": "http://127.0.0.1:1", **entry}]})
    assert info.value.key == f'backend "a".{key}'


# --- what each API is asked

def test_speed_applied_on_each_apis_scale():
    from lb.tts.backend_apis import applied_speed
    assert applied_speed("openai", 1.7) == 1.7
    assert applied_speed("chatterbox", 4.0) == 2.0 and applied_speed("chatterbox", 0.25) == 0.5
    assert applied_speed("chattts", 1.0) == 1.0 and applied_speed("chattts", 4.0) == 1.8
    assert applied_speed("chattts", 0.25) == 0.2       # [speed_1]
    assert applied_speed("cartesia", 3.0) == 1.5
    assert applied_speed("chatterbox", None) is None


@pytest.mark.parametrize("answer,path", [
    ({"audio_url": "/audio/abc.wav"}, "/audio/abc.wav"),
    ({"audio_url": "http://10.0.0.5:6093/audio/abc.wav"}, "/audio/abc.wav"),
])
def test_chatterbox_audio_url_is_fetched_from_the_same_server(answer, path):
    from lb.tts.backend_apis import _audio_url
    assert _audio_url("b0", orjson.dumps(answer)) == path


@pytest.mark.parametrize("answer", [b"{}", b"nope", b'{"audio_url": 5}',
                                    b'{"audio_url": "/a b"}', b'{"audio_url": "audio"}'])
def test_a_chatterbox_answer_without_a_usable_audio_url_is_the_servers_fault(answer):
    from lb.tts.backend_apis import _audio_url
    from lb.tts.backend_http import BackendFailure
    with pytest.raises(BackendFailure) as info:
        _audio_url("b0", answer)
    assert info.value.kind == "bad_response" and "b0" in info.value.reason


def test_a_custom_voice_object_names_its_voice():
    assert read({"input": "Hi", "voice": {"id": "nova"}}).voice == "nova"
    assert refused({"input": "Hi", "voice": {"name": "nova"}}).param == "voice"


def test_audio_at_another_rate_is_the_servers_fault():
    import asyncio
    from lb.tts.backend_apis import _strip_wav
    from lb.tts.backend_http import BackendFailure
    from lb.tts.wav_stream import pcm_to_wav_header

    async def chunks():
        yield pcm_to_wav_header(22050, 1, 400) + b"\x00" * 400

    async def read():
        return [c async for c in _strip_wav("b0", chunks())]

    with pytest.raises(BackendFailure) as info:
        asyncio.run(read())
    assert "22050 Hz" in info.value.reason and info.value.kind == "bad_response"
