"""The demo speaks (issue 9, item 10): with espeak-ng installed, the simulated servers' audio
says the text (backends/speech.py); without it, or with --tone, it is audio.py's tone.
Lengths never change: every WAV is len(text) / chars_per_second long either way.

Tests that need espeak-ng are skipped where it is not installed (CI installs it); the
fallbacks to the tone run everywhere.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import shutil
import stat
import struct
import sys
import time
import wave
import zipfile
from array import array

import pytest

from backends import audio, speech
from backends.speech import Renderer, Voice
from tests.conftest import Process, connect
from tests.test_sim_tts import FAST, Sim, call, expected_frames, raw_post, sim  # noqa: F401

ESPEAK = shutil.which("espeak-ng")
needs_espeak = pytest.mark.skipif(ESPEAK is None, reason="espeak-ng is not installed "
                                  "(apt-get install espeak-ng; CI has it)")
SPEECH_LINE = r"^audio: espeak-ng \(real speech\)$"


def samples_of(wav_bytes: bytes) -> array:
    with wave.open(io.BytesIO(wav_bytes)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
        data = w.readframes(w.getnframes())
    out = array("h")
    out.frombytes(data)
    if sys.byteorder == "big":
        out.byteswap()
    return out


def pcm_samples(pcm: bytes) -> array:
    out = array("h")
    out.frombytes(pcm)
    if sys.byteorder == "big":
        out.byteswap()
    return out


def rms(x) -> float:
    return math.sqrt(sum(v * v for v in x) / len(x)) if len(x) else 0.0


def tone_share(x, rate: int = audio.SAMPLE_RATE) -> float:
    """The share of the energy of `x` at the tone's partials (150, 300, 450 Hz and their 4 Hz
    'syllable' sidebands), by Goertzel: ~1 for the tone, near 0 for speech."""
    def power(f):
        c = 2 * math.cos(2 * math.pi * f / rate)
        s1 = s2 = 0.0
        for v in x:
            s1, s2 = v + c * s1 - s2, s1
        return s1 * s1 + s2 * s2 - c * s1 * s2
    energy = sum(v * v for v in x)
    return sum(2 * power(f + d) / len(x) for f in (150, 300, 450) for d in (-4, 0, 4)) / energy


def chatterbox_wav(s: Sim, text: str) -> bytes:
    status, _, doc = call(s.port, "POST", "/synthesize-json", {"text": text})
    assert status == 200, doc
    status, hs, wav = call(s.port, "GET", doc["audio_url"])
    assert status == 200 and hs["content-type"] == "audio/wav"
    return wav


# --- with espeak-ng: speech -----------------------------------------------------------------


@needs_espeak
def test_chatterbox_says_hello_there_and_says_so_at_start_up(sim):
    s = sim("chatterbox", *FAST)
    s.wait_for_line(SPEECH_LINE, 1)
    wav = chatterbox_wav(s, "Hello there")
    x = samples_of(wav)
    n = expected_frames("Hello there")
    assert len(x) == n                                   # the timing model's length
    assert rms(x) > 1000 and max(map(abs, x)) > 8000     # not silence
    assert wav != audio.wav_file(n)                      # not the tone ...
    assert tone_share(pcm_samples(audio.pcm(n))) > 0.8   # (the measure tells the tone ...)
    assert tone_share(x) < 0.3                           # ... nor anything like it
    assert chatterbox_wav(s, "Hello there") == wav       # the same words, the same audio
    other = samples_of(chatterbox_wav(s, "Goodbye, then"))   # other words, other audio
    assert len(other) == expected_frames("Goodbye, then")
    assert other[:n] != x and tone_share(other) < 0.3


@needs_espeak
def test_openai_speaks_whole_files_and_each_streamed_piece_as_it_is_generated(sim):
    s = sim("openai_tts", "--load-time", "0", "--rtf", "0.2")
    s.wait_for_line(SPEECH_LINE, 1)
    status, _, wav = call(s.port, "POST", "/v1/audio/speech", {"input": "Hello there"})
    assert status == 200 and len(samples_of(wav)) == expected_frames("Hello there")
    assert tone_share(samples_of(wav)) < 0.3

    sentence = "This sentence is forty-five characters long.."  # 3 s of audio, 0.6 s of GPU
    body = json.dumps({"input": " ".join([sentence] * 3), "streaming_chunk_size": 50}).encode()
    sock = connect(s.port, timeout=10)
    sock.sendall(b"POST /v1/audio/speech/stream HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    start, got, arrivals = time.monotonic(), b"", []
    while not got.endswith(b"\r\n0\r\n\r\n"):
        data = sock.recv(65536)
        assert data, "stream ended early"
        got += data
        arrivals.append((time.monotonic() - start, len(got)))
    sock.close()
    total = arrivals[-1][0]
    piece = 2 * 3 * 24000
    first_piece_at = next(t for t, n in arrivals if n > piece)
    assert first_piece_at < total - 0.4, arrivals  # streamed, not made whole (ideal: 0.6 / 1.8)
    r = raw_post(s.port, "/v1/audio/speech/stream", json.loads(body))
    assert r.complete and len(r.body) == 44 + 3 * piece
    pieces = [r.body[44 + i * piece:44 + (i + 1) * piece] for i in range(3)]
    for p in pieces:
        assert rms(pcm_samples(p)) > 1000 and tone_share(pcm_samples(p)) < 0.3
    assert pieces[0] == pieces[1] == pieces[2]   # the same sentence three times, said alike

    r = raw_post(s.port, "/v1/audio/speech", {"input": sentence, "stream_format": "sse"})
    events = [json.loads(b[len("data: "):]) for b in r.body.decode().split("\n\n") if b]
    assert [e["type"] for e in events] == ["speech.audio.info", "speech.audio.delta",
                                           "speech.audio.done"]
    assert base64.b64decode(events[1]["audio"]) == pieces[0]


@needs_espeak
def test_chattts_zip_entries_say_their_own_text(sim):
    s = sim("chattts", *FAST)
    s.wait_for_line(SPEECH_LINE, 1)
    texts = ["Hello there", "Something else entirely"]
    status, _, data = call(s.port, "POST", "/generate_voice",
                           {"text": texts, "params_infer_code": {}})
    assert status == 200
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        entries = [samples_of(z.read(f"{i}.wav")) for i in range(2)]
    for x, text in zip(entries, texts):
        assert len(x) == expected_frames(text) and rms(x) > 1000 and tone_share(x) < 0.3
    assert entries[0] != entries[1][:len(entries[0])]


@needs_espeak
def test_text_reaches_espeak_as_text_never_as_options():
    voice = Voice.choose()
    assert voice.speaks and voice.describe() == "espeak-ng (real speech)"
    rate, x = voice.speak("--help -q --version")  # said, not obeyed: a WAV comes back
    assert rate == 22050 and rms(x) > 500


@needs_espeak
def test_speech_is_made_off_the_event_loop_unless_the_server_blocks():
    voice = Voice.choose()
    n = expected_frames("Hello there")

    text = "A sentence long enough to keep espeak-ng and the resampler busy a while. " * 6
    n_long = audio.samples_for_text(text)

    async def main():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        await asyncio.sleep(0.01)
        before = ticks
        speech_ = await Renderer(voice).start(text, n_long)
        during = ticks - before           # on a thread: the loop went on meanwhile
        ticker.cancel()
        assert len(speech_) == 2 * n_long and during >= 3, during
        blocking = Renderer(voice, blocking=True).start("Hello there", n)
        assert blocking.done()            # --blocking: made right here, as the GPU time is
        assert blocking.result() == await Renderer(voice).start("Hello there", n)

    asyncio.run(main())


# --- without espeak-ng, or with --tone: the tone -----------------------------------------------


def fake_path(tmp_path, script: str | None) -> dict:
    """An environment whose PATH has only a fake espeak-ng (or none at all)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if script is not None:
        exe = bin_dir / "espeak-ng"
        exe.write_text(f"#!/bin/sh\n{script}\n")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return {**os.environ, "PATH": str(bin_dir)}


class EnvSim(Process):
    """`python -m backends.chatterbox` with an environment of its own."""

    def __init__(self, env: dict | None, *args: str):
        super().__init__(["-m", "backends.chatterbox", "--port", "0", *args], env=env)
        try:
            self.port = int(self.wait_for_line(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        except BaseException:
            self.stop()
            raise


@pytest.mark.parametrize("case", ["--tone", "no espeak-ng", "broken espeak-ng"])
def test_the_tone_when_asked_or_when_espeak_is_missing_or_broken(case, tmp_path):
    args, env, line = [], None, r"^audio: tone \(--tone\)$"
    if case == "--tone":
        args = ["--tone"]
    elif case == "no espeak-ng":
        env, line = fake_path(tmp_path, None), r"^audio: tone \(espeak-ng not found\)$"
    else:
        env = fake_path(tmp_path, "echo 'no voice data' >&2; exit 1")
        line = r"^audio: tone \(espeak-ng does not work: exit 1: no voice data\)$"
    s = EnvSim(env, *FAST, *args)
    try:
        s.wait_for_line(line, 1)
        wav = chatterbox_wav(s, "Hello there")
        assert wav == audio.wav_file(expected_frames("Hello there"))
    finally:
        code = s.stop()
        s.proc.stdout.close()
    assert code == 0 and "Traceback" not in s.output(), s.output()


def test_a_failing_espeak_gives_the_tone_for_that_piece_and_says_so_once(capsys):
    voice = Voice("/bin/false")
    assert voice.speaks
    assert voice.pcm("Hello there", 1000, 7) == audio.pcm(1000, 7)
    assert voice.pcm("Hello again", 500) == audio.pcm(500)
    assert capsys.readouterr().out.count("audio: espeak-ng failed (exit 1)") == 1


# --- the pieces of speech.py, sans-io ----------------------------------------------------------


def test_fit_resamples_pads_speeds_up_and_cuts_to_exactly_n_samples():
    ramp = array("h", range(0, 22050, 10))               # 2205 samples at 22050 Hz: 0.1 s
    natural = int(len(ramp) * 24000 / 22050)             # 2400 at 24 kHz
    padded = pcm_samples(speech.fit(ramp, 22050, 4000))
    assert len(padded) == 4000
    lead = min((4000 - natural) // 2, speech.LEAD_IN)
    assert set(padded[:lead]) == {0} and set(padded[lead + natural:]) == {0}
    body = padded[lead:lead + natural]
    assert all(b >= a for a, b in zip(body, body[1:]))   # linear interpolation of a ramp
    assert body[0] == 0 and abs(body[-1] - ramp[-1]) < 20
    faster = pcm_samples(speech.fit(ramp, 22050, 2000))  # 1.2x faster: all of it still
    assert len(faster) == 2000 and abs(max(faster) - ramp[-1]) < 30
    cut = pcm_samples(speech.fit(ramp, 22050, 1000))     # past MAX_SPEEDUP: the end is cut
    reached = 1000 * 22050 / 24000 * speech.MAX_SPEEDUP  # input samples 1000 outputs cover
    assert len(cut) == 1000 and abs(max(cut) - 10 * reached) < 30 and max(cut) < ramp[-1]
    assert speech.fit(array("h"), 22050, 10) == bytes(20)


def test_parse_wav_reads_espeaks_placeholder_sizes_and_refuses_other_formats():
    head = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 0x7FFFFFFF, b"WAVE", b"fmt ", 16, 1, 1,
                       22050, 44100, 2, 16, b"data", 0x7FFFFFF0)
    rate, x = speech.parse_wav(head + array("h", [1, -2, 3]).tobytes() + b"\x09")
    assert rate == 22050 and list(x) == [1, -2, 3]
    stereo = head[:22] + struct.pack("<H", 2) + head[24:]
    for bad in (b"", b"usage: espeak-ng ...", stereo, head[:36]):
        with pytest.raises(ValueError):
            speech.parse_wav(bad)


def test_spoken_part_is_bounded_cut_at_a_space_and_has_no_nul():
    assert speech.spoken_part("a\0b") == "a b"
    long = "word " * 200
    part = speech.spoken_part(long)
    assert len(part) <= speech.MAX_SPOKEN_CHARS and not part.endswith("wor")
    assert long.startswith(part)
    assert len(speech.spoken_part("x" * 2000)) == speech.MAX_SPOKEN_CHARS


def test_trim_drops_near_silence_at_both_ends_only():
    x = array("h", [0, 5, -50, 900, 0, -700, 30, 0])
    assert list(speech.trim(x)) == [900, 0, -700]
    assert list(speech.trim(array("h", [0, 1, -1]))) == []
