"""lb.tts.encoders: PCM -> mp3/opus/aac/flac as a stream, and mp3 -> PCM.

Every encoded output is checked by decoding it back with PyAV's demuxers
(what a caller's player would do): the container and codec, the length, that
it is not silence, and that a 440 Hz tone is still 440 Hz.
"""

import array
import io
import math

import pytest

av = pytest.importorskip("av")

from hypothesis import given, settings, strategies as st  # noqa: E402

from lb.tts import encoders  # noqa: E402
from lb.tts.encoders import (  # noqa: E402
    ENCODED_FORMATS, StreamDecoder, StreamEncoder, available)
from lb.tts.speech_output import CONTENT_TYPES  # noqa: E402

RATE = 24000
# What each format's demuxer and decoder call themselves (ADTS demuxes as "aac").
# FFmpeg decodes mp3 with "mp3float" where it has it.
EXPECTED = {"mp3": ("mp3", ("mp3", "mp3float")), "opus": ("ogg", ("opus", "libopus")),
            "aac": ("aac", ("aac",)), "flac": ("flac", ("flac",))}
UNEVEN = (1, 7, 4000, 333, 2, 12345, 50)


def sine(seconds, rate=RATE, freq=440.0, amplitude=12000):
    n = int(seconds * rate)
    return array.array("h", (int(amplitude * math.sin(2 * math.pi * freq * i / rate))
                             for i in range(n))).tobytes()


def chunks(data, sizes=UNEVEN):
    pos, i = 0, 0
    while pos < len(data):
        yield data[pos:pos + sizes[i % len(sizes)]]
        pos += sizes[i % len(sizes)]
        i += 1


def encode(fmt, pcm, rate=RATE, sizes=UNEVEN):
    enc = StreamEncoder(fmt, rate)
    return b"".join(enc.feed(c) for c in chunks(pcm, sizes)) + enc.finish()


def decode_file(data):
    """(format name, codec name, s16 mono samples at RATE) via av.open."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        pcm = bytearray()
        for frame in list(container.decode(stream)) + [None]:
            for out in resampler.resample(frame):
                pcm += bytes(out.planes[0])[: out.samples * 2]
        return container.format.name, stream.codec_context.name, array.array("h", bytes(pcm))


def rising_crossings(samples, band=1000):
    """Upward passes from below -band to above +band: a tone's cycles,
    not codec noise around zero."""
    count, low = 0, False
    for s in samples:
        if s < -band:
            low = True
        elif s > band and low:
            count, low = count + 1, False
    return count


def assert_tone(samples, seconds=2.0, freq=440.0, slack=0.1):
    duration = len(samples) / RATE
    assert abs(duration - seconds) <= slack, duration
    rms = math.sqrt(sum(s * s for s in samples) / len(samples))
    assert rms > 3000, rms      # the input's rms is 12000/sqrt(2) ~ 8500
    measured = rising_crossings(samples) / duration
    assert abs(measured - freq) < 0.05 * freq, measured


def test_available_lists_all_four():
    assert available() == ENCODED_FORMATS == ("mp3", "opus", "aac", "flac")
    assert set(ENCODED_FORMATS) < set(CONTENT_TYPES)


@pytest.mark.parametrize("fmt", ["wav", "pcm", "ogg", "MP3", ""])
def test_unknown_format_is_a_value_error(fmt):
    with pytest.raises(ValueError):
        StreamEncoder(fmt)


def test_unavailable_format_is_a_value_error(monkeypatch):
    monkeypatch.setattr(encoders, "available", lambda: ("mp3",))
    with pytest.raises(ValueError):
        StreamEncoder("flac")


@pytest.mark.parametrize("fmt", ENCODED_FORMATS)
def test_uneven_chunks_decode_to_the_same_tone(fmt):
    pcm = sine(2.0)
    container, codec, samples = decode_file(encode(fmt, pcm))
    assert container == EXPECTED[fmt][0]
    assert codec in EXPECTED[fmt][1]
    # opus and aac add priming samples, mp3 pads the last frame: 0.1 s covers it.
    assert_tone(samples)
    if fmt == "flac":   # lossless: every sample comes back
        assert samples.tobytes() == pcm


@pytest.mark.parametrize("fmt", ENCODED_FORMATS)
def test_output_is_a_stream_not_a_file_at_the_end(fmt):
    """After 1 s of PCM fed in 100 ms pieces, what feed() returned already
    plays as most of that second.  (flac streams too, a frame of ~96 ms at a time.)"""
    pcm = sine(2.0)
    enc = StreamEncoder(fmt)
    early = b"".join(enc.feed(c) for c in chunks(pcm[: RATE * 2], (RATE * 2 // 10,)))
    _, _, samples = decode_file(early)
    assert len(samples) / RATE >= 0.6, len(samples) / RATE
    rest = b"".join(enc.feed(c) for c in chunks(pcm[RATE * 2:])) + enc.finish()
    assert_tone(decode_file(early + rest)[2])


@pytest.mark.parametrize("fmt", ENCODED_FORMATS)
def test_other_input_rate_is_resampled_if_the_codec_needs_it(fmt):
    # 22050 Hz is no opus rate (it goes out at 24000); the others take it as is.
    _, _, samples = decode_file(encode(fmt, sine(2.0, rate=22050), rate=22050))
    assert_tone(samples)


@settings(max_examples=15, deadline=None)
@given(fmt=st.sampled_from(ENCODED_FORMATS),
       sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=6))
def test_chunking_does_not_change_the_output(fmt, sizes):
    pcm = sine(0.4)
    chunked, whole = encode(fmt, pcm, sizes=tuple(sizes)), encode(fmt, pcm, sizes=(len(pcm),))
    assert packets(chunked) == packets(whole)
    if fmt != "opus":   # an Ogg stream's serial number is random, so its pages' bytes differ
        assert chunked == whole


def packets(data):
    with av.open(io.BytesIO(data)) as container:
        return [bytes(p) for p in container.demux(container.streams.audio[0]) if p.size]


def test_finish_is_final():
    enc = StreamEncoder("mp3")
    enc.feed(sine(0.2))
    assert enc.finish()
    assert enc.finish() == b""
    with pytest.raises(RuntimeError):
        enc.feed(b"\0\0")


def test_empty_input_is_still_a_valid_file():
    enc = StreamEncoder("flac")
    data = enc.feed(b"") + enc.finish()
    assert data.startswith(b"fLaC")
    with av.open(io.BytesIO(data)) as container:
        assert container.streams.audio[0].codec_context.name == "flac"


def decode_chunks(data, fmt="mp3", rate=RATE, sizes=UNEVEN):
    dec = StreamDecoder(fmt, rate)
    pcm = b"".join(dec.feed(c) for c in chunks(data, sizes)) + dec.finish()
    return dec, array.array("h", pcm)


def test_decoder_gets_back_the_tone_from_streamed_mp3():
    dec, samples = decode_chunks(encode("mp3", sine(2.0)))
    assert_tone(samples)
    assert dec.dropped == 0


def test_decoder_skips_id3_tag_and_xing_frame_of_an_mp3_file():
    """An mp3 file as FFmpeg (so ChatTTS's pydub) writes it: ID3v2 tag first,
    then a Xing frame; neither is audio, and an ID3 tag fed to the codec is
    an error."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp3") as out:
        out.metadata["title"] = "a title long enough to span feeds " * 20
        stream = out.add_stream("libmp3lame", rate=RATE, layout="mono")
        frame = av.AudioFrame(format="s16", layout="mono", samples=RATE * 2)
        frame.planes[0].update(sine(2.0))
        frame.sample_rate, frame.pts = RATE, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    data = buf.getvalue()
    assert data.startswith(b"ID3") and (b"Xing" in data[:2000] or b"Info" in data[:2000])
    dec, samples = decode_chunks(data)
    assert dec.dropped == 0
    assert_tone(samples)
    # Same lame, same input, so the same audio frames as StreamEncoder's bare
    # stream: the Xing frame did not add a frame (576 samples) of silence.
    _, bare = decode_chunks(encode("mp3", sine(2.0)))
    assert len(samples) == len(bare)


def test_decoder_resamples_to_the_rate_asked_for():
    _, samples = decode_chunks(encode("mp3", sine(2.0, rate=16000), rate=16000))
    assert_tone(samples)


def test_decoder_reads_adts_aac_too():
    dec, samples = decode_chunks(encode("aac", sine(2.0)), fmt="aac")
    assert_tone(samples)
    assert dec.dropped == 0


@pytest.mark.parametrize("fmt", ["opus", "flac", "wav", "nope"])
def test_decoder_rejects_what_it_cannot_stream(fmt):
    with pytest.raises(ValueError):
        StreamDecoder(fmt)
