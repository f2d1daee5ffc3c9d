"""Sans-io tests for lb.tts.wav_stream: WAV bytes in any chunks -> whole PCM samples."""

from __future__ import annotations

import io
import struct
import wave

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.tts.wav_stream import SampleAligner, WavError, WavStripper, pcm_to_wav_header

PCM = bytes(range(256)) * 20 + b"\x01\x02"          # 5122 bytes: 2561 16-bit samples


def stdlib_wav(pcm: bytes = PCM, rate: int = 24000, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


def chunk(chunk_id: bytes, body: bytes) -> bytes:
    """A RIFF chunk with its pad byte when the body is odd-sized."""
    return chunk_id + struct.pack("<I", len(body)) + body + b"\x00" * (len(body) & 1)


def fmt_body(tag=1, channels=1, rate=24000, bits=16, extra=b"") -> bytes:
    align = channels * bits // 8
    return struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits) + extra


def riff(*chunks: bytes) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def strip(data: bytes, sizes=None) -> tuple[bytes, WavStripper]:
    """Feed `data` (whole, or in pieces of the given sizes, cycled); finish; return the PCM."""
    s = WavStripper()
    out = []
    if sizes is None:
        out.append(s.feed(data))
    else:
        pos, i = 0, 0
        while pos < len(data):
            n = sizes[i % len(sizes)]
            out.append(s.feed(data[pos:pos + n]))
            pos, i = pos + n, i + 1
    s.finish()
    return b"".join(out), s


SUBFORMAT_PCM = bytes.fromhex("0100000000001000800000aa00389b71")
SUBFORMAT_FLOAT = bytes.fromhex("0300000000001000800000aa00389b71")


def extensible(subformat=SUBFORMAT_PCM, channels=1) -> bytes:
    ext = struct.pack("<HHI", 22, 16, 0x4) + subformat
    return fmt_body(0xFFFE, channels, extra=ext)


# ---- well-formed files -------------------------------------------------------------------------

def test_header_is_44_bytes_and_stdlib_wave_reads_it():
    header = pcm_to_wav_header(24000, 1, len(PCM))
    assert len(header) == 44
    with wave.open(io.BytesIO(header + PCM)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        assert w.readframes(10**6) == PCM


def test_unknown_size_header_has_streaming_sizes():
    header = pcm_to_wav_header()
    assert struct.unpack("<I", header[4:8])[0] == 0x7FFFFFFF - 36
    assert header[36:40] == b"data" and header[40:44] == b"\xff\xff\xff\xff"


def test_header_refuses_sizes_that_do_not_fit():
    with pytest.raises(ValueError):
        pcm_to_wav_header(data_bytes=-1)
    with pytest.raises(ValueError):
        pcm_to_wav_header(data_bytes=2**32)


@pytest.mark.parametrize("make", [
    lambda: pcm_to_wav_header(24000, 1, len(PCM)) + PCM,
    lambda: stdlib_wav(),
    lambda: pcm_to_wav_header() + PCM,
], ids=["own-header", "stdlib-wave", "unknown-size"])
def test_pcm_comes_out_whole_and_byte_at_a_time(make):
    data = make()
    out, s = strip(data)
    assert out == PCM
    assert (s.sample_rate, s.channels, s.bits_per_sample, s.format_tag) == (24000, 1, 16, 1)
    assert s.format_known and s.header_done
    assert strip(data, [1])[0] == PCM


def test_properties_appear_as_the_header_is_read():
    data = stdlib_wav(rate=16000)
    s = WavStripper()
    assert not s.format_known and s.sample_rate is None and not s.header_done
    assert s.feed(data[:12]) == b""
    assert not s.format_known
    assert s.feed(data[:36][12:]) == b""          # fmt chunk complete, data header not yet
    assert s.format_known and s.sample_rate == 16000 and not s.header_done
    assert s.feed(data[36:44]) == b"" and s.header_done
    assert s.feed(data[44:47]) == PCM[:2]          # 3 bytes: one sample, one carried
    assert s.feed(data[47:]) == PCM[2:]


def test_list_chunk_before_data_is_skipped_including_its_pad_byte():
    info = chunk(b"LIST", b"INFOISFT" + struct.pack("<I", 5) + b"Lavf\x00")  # 17 bytes: odd
    data = riff(chunk(b"fmt ", fmt_body()), info, chunk(b"fact", struct.pack("<I", 2561)),
                chunk(b"data", PCM))
    assert struct.unpack("<I", info[4:8])[0] == 17 and strip(data)[0] == PCM
    assert strip(data, [1])[0] == PCM
    assert strip(data, [3, 7, 1])[0] == PCM


def test_odd_sized_fmt_chunk_is_padded():
    data = riff(chunk(b"fmt ", fmt_body(extra=b"\x00")), chunk(b"data", PCM))   # fmt of 17
    assert strip(data, [1])[0] == PCM


def test_real_data_size_drops_a_trailing_chunk():
    tail = chunk(b"LIST", b"INFOICMT" + struct.pack("<I", 4) + b"hey\x00")
    data = pcm_to_wav_header(data_bytes=len(PCM)) + PCM + tail
    assert strip(data)[0] == PCM
    assert strip(data, [1])[0] == PCM
    assert strip(data, [45, 1000])[0] == PCM


@pytest.mark.parametrize("size", [0, 0xFFFFFFFF, len(PCM) * 4])
def test_data_size_unknown_or_too_large_passes_everything_that_arrives(size):
    data = pcm_to_wav_header(data_bytes=len(PCM))[:40] + struct.pack("<I", size) + PCM
    assert strip(data)[0] == PCM


def test_stereo_output_is_whole_frames():
    pcm = PCM[:4000]
    data = stdlib_wav(pcm, channels=2)
    s = WavStripper()
    pieces = [s.feed(data[i:i + 7]) for i in range(0, len(data), 7)]
    assert all(len(p) % 4 == 0 for p in pieces) and b"".join(pieces) == pcm
    assert s.channels == 2


def test_extensible_pcm_is_accepted():
    data = riff(chunk(b"fmt ", extensible()), chunk(b"data", PCM))
    out, s = strip(data, [5])
    assert out == PCM and s.format_tag == 0xFFFE


def test_a_trailing_odd_byte_is_held_back_not_returned():
    s = WavStripper()
    assert s.feed(pcm_to_wav_header() + b"\x01\x02\x03") == b"\x01\x02"
    assert s.feed(b"") == b""
    assert s.feed(b"\x04") == b"\x03\x04"
    s.feed(b"\x05")
    s.finish()                       # an incomplete last sample is dropped, not an error


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, message", [
    (b"RIFX" + b"\x00" * 4 + b"WAVE", "not a RIFF/WAVE file"),
    (b"RIFF" + b"\x00" * 4 + b"AVI ", "not a RIFF/WAVE file"),
    (b"ID3\x04" + b"\x00" * 40, "not a RIFF/WAVE file"),
    (riff(chunk(b"fmt ", fmt_body(tag=3, bits=32))), "format tag 0x0003 is not PCM"),
    (riff(chunk(b"fmt ", fmt_body(tag=0x55))), "format tag 0x0055 is not PCM"),
    (riff(chunk(b"fmt ", fmt_body(bits=8))), "8 bits per sample"),
    (riff(chunk(b"fmt ", fmt_body(bits=24))), "24 bits per sample"),
    (riff(chunk(b"fmt ", fmt_body(channels=0))), "0 channels"),
    (riff(chunk(b"fmt ", fmt_body()[:14])), "fmt chunk is 14 bytes"),
    (riff(chunk(b"fmt ", extensible(SUBFORMAT_FLOAT))), "sub-format is not PCM"),
    (riff(chunk(b"fmt ", fmt_body(tag=0xFFFE))), "extensible fmt chunk is 16 bytes"),
    (riff(chunk(b"data", PCM)), "data chunk comes before its fmt chunk"),
    (riff(chunk(b"fmt ", fmt_body()), chunk(b"fmt ", fmt_body())), "second fmt chunk"),
    (riff(chunk(b"fmt ", fmt_body()), chunk(b"LIST", b"\x00" * 70000)), "runs past 65536 bytes"),
    (riff(chunk(b"fmt ", fmt_body()), b"JUNK\xff\xff\xff\x7f"), "runs past 65536 bytes"),
    (riff(chunk(b"fmt ", fmt_body()), chunk(b"JUNK", b"") * 9000), "runs past 65536 bytes"),
])
def test_errors_are_precise_whole_or_byte_at_a_time(data, message):
    with pytest.raises(WavError, match=message):
        strip(data)
    s = WavStripper()
    with pytest.raises(WavError, match=message) as first:
        for i in range(len(data)):
            s.feed(data[i:i + 1])
        s.finish()
    # Once broken, it stays broken: the same error again, for feed and finish.
    with pytest.raises(WavError) as again:
        s.feed(PCM)
    assert again.value is first.value
    with pytest.raises(WavError):
        s.finish()


def test_header_bound_is_detected_before_the_big_chunk_arrives():
    s = WavStripper()
    s.feed(riff(chunk(b"fmt ", fmt_body()))[:36])
    with pytest.raises(WavError, match=r"'LIST' chunk of 1000000 bytes at offset 36"):
        s.feed(b"LIST" + struct.pack("<I", 1_000_000))


def test_header_bound_is_configurable():
    data = riff(chunk(b"fmt ", fmt_body()), chunk(b"LIST", b"\x00" * 100), chunk(b"data", PCM))
    assert strip(data)[0] == PCM
    s = WavStripper(max_header_bytes=100)
    with pytest.raises(WavError, match="runs past 100 bytes"):
        s.feed(data)


@pytest.mark.parametrize("cut", [0, 1, 11, 12, 20, 36, 43])
def test_finish_inside_the_header_raises(cut):
    s = WavStripper()
    assert s.feed(stdlib_wav()[:cut]) == b""
    with pytest.raises(WavError, match=f"WAV ended inside its header \\(after {cut} bytes"):
        s.finish()


def test_finish_right_after_the_data_header_is_fine():
    s = WavStripper()
    assert s.feed(stdlib_wav()[:44]) == b""
    s.finish()


# ---- properties --------------------------------------------------------------------------------

def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


WAVS = st.sampled_from([
    stdlib_wav(),
    pcm_to_wav_header() + PCM,
    pcm_to_wav_header(data_bytes=len(PCM) - 2) + PCM + b"\x00",   # the last bytes are a trailer
    riff(chunk(b"fmt ", extensible()), chunk(b"LIST", b"abc"), chunk(b"data", PCM)),
    stdlib_wav(PCM[:3000], channels=2),
])


@settings(max_examples=200, deadline=None)
@given(WAVS, st.lists(st.integers(min_value=0, max_value=6000), max_size=40))
def test_any_split_gives_the_same_pcm_in_whole_samples(data, cuts):
    whole, ref = strip(data)
    s = WavStripper()
    pieces = [s.feed(p) for p in _split(data, cuts)]
    s.finish()
    assert b"".join(pieces) == whole
    assert all(len(p) % (ref.channels * 2) == 0 for p in pieces)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=300), max_size=20))
def test_aligner_keeps_whole_samples(data, cuts):
    a = SampleAligner()
    pieces = [a.feed(p) for p in _split(data, cuts)]
    assert all(len(p) % 2 == 0 for p in pieces)
    assert b"".join(pieces) == data[:len(data) // 2 * 2]
    assert a.pending == len(data) % 2


def test_aligner_carries_the_odd_byte():
    a = SampleAligner()
    assert a.feed(b"\x01") == b""
    assert a.feed(b"\x02\x03") == b"\x01\x02"
    assert a.feed(bytearray(b"\x04\x05\x06\x07")) == b"\x03\x04\x05\x06"
    assert a.pending == 1
