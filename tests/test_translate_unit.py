"""Sans-io tests for lb.translate: each local call kind read into one form,
and the Cartesia request made from it."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.tts import translate as tr

VOICES = {"default": "11111111-1111-1111-1111-111111111111",
          "alloy": "22222222-2222-2222-2222-222222222222"}


def read(kind: str, body, path: str = "/", content_type: str = "application/json"):
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return tr.read_call(kind, path, content_type, raw)


# --- chatterbox

def test_chatterbox_json_keeps_text_speed_and_its_own_parameters():
    call = read("chatterbox", {"text": "Hello there.", "speech_rate": 1.2, "exaggeration": 0.7,
                               "seed": 3})
    assert call.texts == ("Hello there.",) and call.speed == 1.2
    assert call.shape == tr.CHATTERBOX_JSON and call.voice is None
    assert call.parameters == {"speech_rate": 1.2, "exaggeration": 0.7, "seed": 3}


def test_chatterbox_multipart_form_reads_the_text_fields_and_skips_the_file():
    boundary = "XyZ"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\n"
            "Bonjour à tous\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"speech_rate\"\r\n\r\n"
            "0.5\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"audio_prompt\"; "
            "filename=\"me.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF....\r\n"
            f"--{boundary}--\r\n").encode()
    call = read("chatterbox", body, "/synthesize", f"multipart/form-data; boundary={boundary}")
    assert call.texts == ("Bonjour à tous",)
    assert call.speed == tr.SPEED_MIN                 # 0.5 clamped up to Cartesia's 0.6
    assert "audio_prompt" not in call.parameters


@pytest.mark.parametrize("body, words", [
    ({}, "text must be a non-empty string"),
    ({"text": "   "}, "text must be a non-empty string"),
    ({"text": "x" * 5001}, "longer than 5000"),
    ({"text": "hi", "speech_rate": "fast"}, "speech_rate must be a number"),
    ({"text": "hi", "speech_rate": 0}, "speech_rate must be positive"),
    (b"{not json", "body is not JSON"),
    ([1, 2], "must be a JSON object"),
])
def test_chatterbox_bad_calls_are_the_callers_error(body, words):
    with pytest.raises(tr.BadRequest, match=words):
        read("chatterbox", body)


# --- openai

@pytest.mark.parametrize("path, extra, shape", [
    ("/v1/audio/speech", {}, tr.WAV),
    ("/v1/audio/speech", {"stream_format": "sse"}, tr.SSE),
    ("/v1/audio/speech/stream", {}, tr.WAV_STREAM),
])
def test_openai_shape_follows_path_and_stream_format(path, extra, shape):
    call = read("openai", {"input": "Hi.", "voice": "alloy", **extra}, path)
    assert call.shape == shape and call.voice == "alloy" and call.texts == ("Hi.",)


def test_openai_speed_is_clamped_to_cartesias_range():
    assert read("openai", {"input": "a", "speed": 4.0}).speed == tr.SPEED_MAX
    assert read("openai", {"input": "a", "speed": 0.25}).speed == tr.SPEED_MIN
    assert read("openai", {"input": "a"}).speed is None


def test_openai_voice_must_be_a_string():
    with pytest.raises(tr.BadRequest, match="voice"):
        read("openai", {"input": "a", "voice": 7})


# --- chattts

def test_chattts_reads_every_text_item_and_the_speed_prompt():
    call = read("chattts", {"text": ["One.", "Two."],
                            "params_infer_code": {"prompt": "[speed_7]", "temperature": 0.3}})
    assert call.texts == ("One.", "Two.") and call.shape == tr.ZIP
    assert call.speed == 1.4
    assert call.characters == 8


@pytest.mark.parametrize("text", [[], "", [""], [1], None])
def test_chattts_bad_text_lists(text):
    with pytest.raises(tr.BadRequest):
        read("chattts", {"text": text})


# --- Cartesia

def test_cartesia_request_has_what_the_api_requires():
    call = read("openai", {"input": "Hello", "voice": "alloy", "speed": 1.1})
    body = orjson.loads(tr.cartesia_request(
        call, "Hello", model_id="sonic-3", language="en",
        voice_id=tr.voice_id(VOICES, call.voice), container=tr.container_for(call.shape)))
    assert body == {
        "model_id": "sonic-3", "transcript": "Hello",
        "voice": {"mode": "id", "id": VOICES["alloy"]}, "language": "en",
        "output_format": {"container": "wav", "encoding": "pcm_s16le", "sample_rate": 24000},
        "generation_config": {"speed": 1.1},
    }


def test_no_speed_means_no_generation_config():
    call = read("chatterbox", {"text": "Hi"})
    body = orjson.loads(tr.cartesia_request(call, "Hi", model_id="sonic-3", language="en",
                                            voice_id="v", container="wav"))
    assert "generation_config" not in body


def test_unknown_voice_names_use_the_default():
    assert tr.voice_id(VOICES, "nobody") == VOICES["default"]
    assert tr.voice_id(VOICES, None) == VOICES["default"]


@pytest.mark.parametrize("shape, container", [
    (tr.WAV, "wav"), (tr.CHATTERBOX_JSON, "raw"), (tr.ZIP, "raw"),
    (tr.WAV_STREAM, "raw"), (tr.SSE, "raw")])
def test_container_per_shape(shape, container):
    assert tr.container_for(shape) == container


@settings(max_examples=200, deadline=None)
@given(speed=st.floats(min_value=1e-6, max_value=1e6, allow_nan=False))
def test_any_positive_speed_lands_in_cartesias_range(speed):
    call = read("openai", {"input": "a", "speed": speed})
    assert tr.SPEED_MIN <= call.speed <= tr.SPEED_MAX


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=1, max_size=300).filter(str.strip))
def test_text_reaches_cartesia_unchanged(text):
    for kind, body in (("chatterbox", {"text": text}), ("openai", {"input": text}),
                       ("chattts", {"text": [text]})):
        call = read(kind, body)
        assert call.texts == (text,)
        sent = orjson.loads(tr.cartesia_request(call, call.texts[0], model_id="sonic-3",
                                                language="en", voice_id="v", container="raw"))
        assert sent["transcript"] == text
