"""Sans-io tests for lb.tts.zip_stream: the first file of a zip, streamed as the zip arrives."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.tts.wav_stream import pcm_to_wav_header
from lb.tts.zip_stream import ZipFirstEntry, ZipStreamError

PCM = bytes(range(256)) * 40 + bytes(1000)
FIRST = pcm_to_wav_header(data_bytes=len(PCM)) + PCM
SECOND = b"second file, never read"
FLAG_DESCRIPTOR = 0x8


class NonSeekable:
    """A write-only stream without seek/tell: zipfile then writes data descriptors."""

    def __init__(self):
        self.parts: list[bytes] = []

    def write(self, b) -> int:
        self.parts.append(bytes(b))
        return len(b)

    def flush(self) -> None:
        pass

    def seekable(self) -> bool:
        return False


def make_zip(entries, compression=zipfile.ZIP_DEFLATED, seekable=True, **kw) -> bytes:
    out = io.BytesIO() if seekable else NonSeekable()
    with zipfile.ZipFile(out, "w", compression=compression, **kw) as z:
        for name, data in entries:
            z.writestr(name, data)
    return out.getvalue() if seekable else b"".join(out.parts)


def flags(archive: bytes) -> int:
    return struct.unpack("<H", archive[6:8])[0]


def read_first(archive: bytes, sizes=None) -> tuple[bytes, ZipFirstEntry]:
    """Feed the archive (whole, or in pieces of the given sizes, cycled); finish."""
    z = ZipFirstEntry()
    out, pos, i = [], 0, 0
    while pos < len(archive):
        n = len(archive) if sizes is None else sizes[i % len(sizes)]
        out.append(z.feed(archive[pos:pos + n]))
        pos, i = pos + n, i + 1
    z.finish()
    return b"".join(out), z


DEFLATED = make_zip([("0.wav", FIRST), ("1.wav", SECOND)])
STORED = make_zip([("0.wav", FIRST), ("1.wav", SECOND)], zipfile.ZIP_STORED)
STREAMED = make_zip([("0.wav", FIRST), ("1.wav", SECOND)], seekable=False)


def forced_zip64(compression=zipfile.ZIP_DEFLATED, seekable=True) -> bytes:
    """An archive whose first entry is marked zip64 (as a >4 GiB one would be)."""
    out = io.BytesIO() if seekable else NonSeekable()
    with zipfile.ZipFile(out, "w", compression) as zf:
        with zf.open("0.wav", "w", force_zip64=True) as f:
            f.write(FIRST)
        zf.writestr("1.wav", SECOND)
    return out.getvalue() if seekable else b"".join(out.parts)


ZIP64 = forced_zip64(seekable=False)


def test_streamed_archive_really_uses_data_descriptors():
    assert flags(STREAMED) & FLAG_DESCRIPTOR
    assert struct.unpack("<III", STREAMED[14:26]) == (0, 0, 0)     # no CRC or sizes up front
    assert not flags(DEFLATED) & FLAG_DESCRIPTOR
    with zipfile.ZipFile(io.BytesIO(STREAMED)) as z:                # still a valid archive
        assert z.read("0.wav") == FIRST


@pytest.mark.parametrize("archive", [DEFLATED, STORED, STREAMED],
                         ids=["deflated", "stored", "data-descriptor"])
@pytest.mark.parametrize("sizes", [None, [1], [7, 1, 300]], ids=["whole", "bytewise", "mixed"])
def test_first_entry_comes_out_and_only_it(archive, sizes):
    out, z = read_first(archive, sizes)
    assert out == FIRST
    assert z.name == "0.wav" and z.done


def test_content_streams_before_the_archive_is_complete():
    z = ZipFirstEntry()
    half = len(DEFLATED) // 4
    early = z.feed(DEFLATED[:half])
    assert z.name == "0.wav" and not z.done
    assert len(early) > 0 and FIRST.startswith(early)
    assert early + z.feed(DEFLATED[half:]) == FIRST and z.done


def test_input_after_the_first_entry_is_ignored():
    z = ZipFirstEntry()
    assert z.feed(DEFLATED) == FIRST and z.done
    assert z.feed(b"anything at all") == b""
    z.finish()


def test_name_is_known_once_the_header_is_read():
    z = ZipFirstEntry()
    z.feed(STORED[:30])
    assert z.name is None
    z.feed(STORED[30:35])
    assert z.name == "0.wav"


def test_utf8_name():
    out, z = read_first(make_zip([("früh.wav", b"abc")]), [1])
    assert out == b"abc" and z.name == "früh.wav"


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_empty_first_entry(compression):
    out, z = read_first(make_zip([("empty", b""), ("1", b"x")], compression), [1])
    assert out == b"" and z.done and z.name == "empty"


def test_zip64_data_descriptor():
    assert flags(ZIP64) & FLAG_DESCRIPTOR
    assert struct.unpack("<H", ZIP64[30 + 5:30 + 7])[0] == 0x0001     # zip64 extra field
    assert read_first(ZIP64, [3])[0] == FIRST


def test_zip64_sizes_in_the_extra_field():
    archive = forced_zip64(zipfile.ZIP_STORED)
    assert struct.unpack("<II", archive[18:26]) == (0xFFFFFFFF, 0xFFFFFFFF)
    assert read_first(archive, [5])[0] == FIRST


def test_zip64_sizes_without_the_extra_field():
    archive = forced_zip64(zipfile.ZIP_STORED)
    extra_len = struct.unpack("<H", archive[28:30])[0]
    archive = _patched(archive, 28, "<H", 0)[:35] + archive[35 + extra_len:]
    with pytest.raises(ZipStreamError, match="zip64 sizes but no zip64 extra field"):
        read_first(archive)


# ---- errors ------------------------------------------------------------------------------------

def _patched(archive: bytes, offset: int, fmt: str, value: int) -> bytes:
    return archive[:offset] + struct.pack(fmt, value) + archive[offset + struct.calcsize(fmt):]


def _corrupt_crc_in_header(archive: bytes) -> bytes:
    crc = struct.unpack("<I", archive[14:18])[0]
    return _patched(archive, 14, "<I", crc ^ 1)


def _corrupt_crc_in_descriptor(archive: bytes) -> bytes:
    at = archive.index(b"PK\x07\x08")
    crc = struct.unpack("<I", archive[at + 4:at + 8])[0]
    return _patched(archive, at + 4, "<I", crc ^ 1)


def _flip_stored_content_byte(archive: bytes) -> bytes:
    at = 30 + 5 + 100
    return archive[:at] + bytes([archive[at] ^ 0xFF]) + archive[at + 1:]


@pytest.mark.parametrize("archive, message", [
    (b"not a zip at all, not at all", "not a zip archive"),
    (make_zip([]), "zip has no entry"),
    (_patched(DEFLATED, 6, "<H", flags(DEFLATED) | 1), "first entry is encrypted"),
    (_patched(DEFLATED, 8, "<H", 12), "compression method 12"),
    (make_zip([("0.wav", FIRST)], zipfile.ZIP_LZMA), "compression method 14"),
    (make_zip([("0.wav", FIRST)], zipfile.ZIP_STORED, seekable=False), "stored with a data descriptor"),
    (_corrupt_crc_in_header(DEFLATED), "fails its CRC-32 check"),
    (_corrupt_crc_in_header(STORED), "fails its CRC-32 check"),
    (_flip_stored_content_byte(STORED), "fails its CRC-32 check"),
    (_corrupt_crc_in_descriptor(STREAMED), "fails its CRC-32 check"),
    (_patched(DEFLATED, 22, "<I", len(FIRST) + 1), "inflated to"),
    (_patched(STORED, 22, "<I", len(FIRST) + 1), "compressed size .* but size"),
    (DEFLATED[:30 + 5] + b"\xff" * 40 + DEFLATED[30 + 5 + 40:], "corrupt deflate data"),
])
def test_errors_are_precise_whole_or_byte_at_a_time(archive, message):
    with pytest.raises(ZipStreamError, match=message):
        read_first(archive)
    z = ZipFirstEntry()
    with pytest.raises(ZipStreamError, match=message) as first:
        for i in range(len(archive)):
            z.feed(archive[i:i + 1])
        z.finish()
    with pytest.raises(ZipStreamError) as again:      # it stays broken
        z.feed(b"more")
    assert again.value is first.value


def test_deflate_stream_shorter_than_its_compressed_size():
    # One stored entry claiming to be deflate: the raw deflate "stored block" ends
    # before the recorded compressed size.
    deflated = zlib.compressobj(wbits=-15)
    body = deflated.compress(b"hello") + deflated.flush() + b"junk"
    header = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 8, 0, 0,
                         zlib.crc32(b"hello"), len(body), 5, 1, 0) + b"a"
    with pytest.raises(ZipStreamError, match="ends 4 bytes before its compressed size"):
        read_first(header + body + b"PK\x05\x06")


def test_deflate_stream_longer_than_its_compressed_size():
    archive = _patched(DEFLATED, 18, "<I", struct.unpack("<I", DEFLATED[18:22])[0] - 10)
    with pytest.raises(ZipStreamError, match="does not end at its compressed size"):
        read_first(archive)


def test_descriptor_sizes_must_match():
    at = STREAMED.index(b"PK\x07\x08")
    archive = _patched(STREAMED, at + 12, "<I", len(FIRST) - 1)
    with pytest.raises(ZipStreamError, match="its data descriptor says"):
        read_first(archive)


def test_descriptor_without_its_optional_signature():
    at = STREAMED.index(b"PK\x07\x08")
    archive = STREAMED[:at] + STREAMED[at + 4:]
    out, z = read_first(archive, [1])
    assert out == FIRST and z.done


@pytest.mark.parametrize("archive", [DEFLATED, STORED, STREAMED],
                         ids=["deflated", "stored", "data-descriptor"])
def test_truncated_archive_finish_raises(archive):
    end_of_first = archive.index(b"PK", 40)     # the next record: second entry or descriptor
    for cut, message in [(0, "no entry"), (10, "inside its first entry's header"),
                         (32, "inside its first entry's header"),
                         (200, r"inside its first entry's data \(\d+ compressed bytes read\)"),
                         (end_of_first - 1, "inside its first entry")]:
        z = ZipFirstEntry()
        z.feed(archive[:cut])
        assert not z.done
        with pytest.raises(ZipStreamError, match=message):
            z.finish()


def test_truncated_inside_the_data_descriptor():
    at = STREAMED.index(b"PK\x07\x08")
    z = ZipFirstEntry()
    assert z.feed(STREAMED[:at + 10]) == FIRST     # content is all out; not yet checked
    assert not z.done
    with pytest.raises(ZipStreamError, match="inside its first entry's data descriptor"):
        z.finish()


# ---- properties --------------------------------------------------------------------------------

def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([DEFLATED, STORED, STREAMED, ZIP64]),
       st.lists(st.integers(min_value=0, max_value=20000), max_size=40))
def test_any_split_gives_the_first_entry(archive, cuts):
    z = ZipFirstEntry()
    out = b"".join(z.feed(p) for p in _split(archive, cuts))
    z.finish()
    assert out == FIRST and z.done


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=3000), st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]),
       st.booleans(), st.lists(st.integers(min_value=0, max_value=4000), max_size=10))
def test_any_content_round_trips(content, compression, seekable, cuts):
    if compression == zipfile.ZIP_STORED and not seekable:
        compression = zipfile.ZIP_DEFLATED      # stored + descriptor is refused (tested above)
    archive = make_zip([("a", content), ("b", b"other")], compression, seekable)
    z = ZipFirstEntry()
    out = b"".join(z.feed(p) for p in _split(archive, cuts))
    z.finish()
    assert out == content
