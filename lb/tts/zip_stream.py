"""The first file of a zip archive, streamed out as the archive arrives (sans-io).

ChatTTS's /generate_voice answers application/zip with one audio file per
text.  For a single-text call the caller wants that one file's audio, and
wants it before the zip is complete, so the archive is read front to back
from its local file header; the central directory (at the end) is never
needed.  Only stored (0) and deflate (8) entries are read.

Flag bit 3 (a data descriptor after the data; the local header's sizes and
CRC are zero, as zipfile writes to a non-seekable stream): a deflate stream
ends itself, so its end is found without the sizes, and the descriptor that
follows is read to check the CRC and sizes.  A stored entry has no such end
marker, so stored + bit 3 is refused.

The CRC is checked when the entry ends; output already handed out cannot be
taken back, so a mismatch raises on the feed that completes the entry.
"""

from __future__ import annotations

import struct
import zlib

LOCAL_HEADER_SIG = b"PK\x03\x04"
CENTRAL_DIR_SIG = b"PK\x01\x02"
END_OF_DIR_SIG = b"PK\x05\x06"
DESCRIPTOR_SIG = b"PK\x07\x08"
STORED, DEFLATED = 0, 8
_FLAG_ENCRYPTED, _FLAG_DESCRIPTOR, _FLAG_UTF8 = 0x1, 0x8, 0x800
_ZIP64_EXTRA_ID = 0x0001
_LOCAL = struct.Struct("<4sHHHHHIIIHH")      # 30 bytes

_SIG, _HEADER, _NAME, _DATA, _DESC_START, _DESC_REST, _DONE = range(7)


class ZipStreamError(ValueError):
    """The stream is not a zip whose first entry can be read as it arrives."""


class ZipFirstEntry:
    """Feed zip bytes in any chunks; get the first entry's contents out of them."""

    def __init__(self) -> None:
        self.name: str | None = None
        self._state = _SIG                # the signature first: an empty zip is only 22 bytes
        self._need = 4                    # bytes of the header field being collected
        self._buf = bytearray()           # bounded: 30 + two 16-bit lengths
        self._received = 0
        self._flags = self._method = 0
        self._crc_expected = 0
        self._csize: int | None = None    # None: unknown (bit 3)
        self._usize: int | None = None
        self._zip64 = False
        self._left = 0                    # compressed bytes still to come (sizes known)
        self._read = 0                    # compressed bytes consumed
        self._written = 0                 # content bytes produced
        self._crc = 0
        self._name_len = 0
        self._desc_prefix = b""
        self._inflater: zlib._Decompress | None = None
        self._error: ZipStreamError | None = None

    @property
    def done(self) -> bool:
        """The first entry has ended (and been checked); further input is ignored."""
        return self._state == _DONE

    def feed(self, chunk: bytes | bytearray | memoryview) -> bytes:
        """Content of the first entry available so far (maybe b"").
        After a ZipStreamError every feed re-raises it."""
        if self._error is not None:
            raise self._error
        try:
            return self._feed(bytes(chunk))
        except ZipStreamError as e:
            self._error = e
            raise

    def finish(self) -> None:
        """The stream has ended; raises ZipStreamError unless the first entry ended in it."""
        if self._error is not None:
            raise self._error
        if self._state == _DONE:
            return
        if self._received == 0:
            raise ZipStreamError("zip ended with no entry (no bytes arrived)")
        where = ("its first entry's header" if self._state in (_SIG, _HEADER, _NAME) else
                 f"its first entry's data ({self._read} compressed bytes read)"
                 if self._state == _DATA else "its first entry's data descriptor")
        raise ZipStreamError(f"zip ended inside {where}")

    def _feed(self, data: bytes) -> bytes:
        self._received += len(data)
        out = []
        # Each pass consumes at least one byte of `data`: bounded by len(data).
        while data and self._state != _DONE:
            if self._state == _DATA:
                piece, data = self._on_data(data)
                out.append(piece)
                continue
            take = self._need - len(self._buf)
            self._buf += data[:take]
            data = data[take:]
            if len(self._buf) == self._need:
                field = bytes(self._buf)
                self._buf.clear()
                {_SIG: self._on_signature, _HEADER: self._on_local_header, _NAME: self._on_name_extra,
                 _DESC_START: self._on_descriptor_start,
                 _DESC_REST: self._on_descriptor_rest}[self._state](field)
        return b"".join(out)

    def _on_signature(self, sig: bytes) -> None:
        if sig in (CENTRAL_DIR_SIG, END_OF_DIR_SIG):
            raise ZipStreamError("zip has no entry (it starts with its central directory)")
        if sig != LOCAL_HEADER_SIG:
            raise ZipStreamError(f"not a zip archive (starts with {sig!r}, not {LOCAL_HEADER_SIG!r})")
        self._state, self._need = _HEADER, _LOCAL.size - 4

    def _on_local_header(self, rest: bytes) -> None:
        h = LOCAL_HEADER_SIG + rest
        (_, _version, flags, method, _time, _date, crc, csize, usize,
         name_len, extra_len) = _LOCAL.unpack(h)
        if flags & _FLAG_ENCRYPTED:
            raise ZipStreamError("zip's first entry is encrypted")
        if method not in (STORED, DEFLATED):
            raise ZipStreamError(f"zip's first entry uses compression method {method}"
                                 " (only 0 stored and 8 deflate are read)")
        if method == STORED and flags & _FLAG_DESCRIPTOR:
            raise ZipStreamError("zip's first entry is stored with a data descriptor"
                                 " (flag bit 3): its end cannot be found while streaming")
        self._flags, self._method = flags, method
        if not flags & _FLAG_DESCRIPTOR:
            self._crc_expected, self._csize, self._usize = crc, csize, usize
        self._state, self._need = _NAME, name_len + extra_len
        self._name_len = name_len
        if self._need == 0:
            self._on_name_extra(b"")

    def _on_name_extra(self, field: bytes) -> None:
        raw, extra = field[:self._name_len], field[self._name_len:]
        try:
            self.name = raw.decode("utf-8" if self._flags & _FLAG_UTF8 else "cp437")
        except UnicodeDecodeError:
            raise ZipStreamError(f"zip's first entry name is not valid UTF-8: {raw!r}") from None
        self._read_zip64(extra)
        if self._method == STORED and self._csize != self._usize:
            raise ZipStreamError(f"zip's stored first entry has compressed size {self._csize}"
                                 f" but size {self._usize}")
        if self._method == DEFLATED:
            self._inflater = zlib.decompressobj(-15)
        self._left = self._csize or 0
        self._state = _DATA
        if self._csize == 0:            # an empty entry with known sizes
            self._end_of_data()

    def _read_zip64(self, extra: bytes) -> None:
        """Zip64 entries put 0xFFFFFFFF in the header and the real sizes in an extra field."""
        pos = 0
        while pos + 4 <= len(extra):    # bounded: pos grows by at least 4
            kind, size = struct.unpack("<HH", extra[pos:pos + 4])
            body = extra[pos + 4:pos + 4 + size]
            pos += 4 + size
            if kind != _ZIP64_EXTRA_ID:
                continue
            self._zip64 = True
            fields = [v for (v,) in struct.iter_unpack("<Q", body[:len(body) // 8 * 8])]
            if self._usize == 0xFFFFFFFF and fields:
                self._usize = fields.pop(0)
            if self._csize == 0xFFFFFFFF and fields:
                self._csize = fields.pop(0)
        if 0xFFFFFFFF in (self._csize, self._usize):
            raise ZipStreamError("zip's first entry has zip64 sizes but no zip64 extra field")

    def _on_data(self, data: bytes) -> tuple[bytes, bytes]:
        """Consume entry data from `data`; returns (content, the input left over)."""
        rest = b""
        if self._csize is not None:
            data, rest = data[:self._left], data[self._left:]
            self._left -= len(data)
        if self._inflater is None:
            piece, ended = data, self._left == 0
        else:
            try:
                piece = self._inflater.decompress(data)
            except zlib.error as e:
                raise ZipStreamError(f"zip's first entry has corrupt deflate data: {e}") from None
            ended = self._inflater.eof
            if ended:
                unused = self._inflater.unused_data
                if self._csize is not None and (unused or self._left):
                    raise ZipStreamError(f"zip's first entry's deflate data ends"
                                         f" {len(unused) + self._left} bytes before its"
                                         f" compressed size ({self._csize})")
                data, rest = data[:len(data) - len(unused)], unused + rest
            elif self._csize is not None and self._left == 0:
                raise ZipStreamError("zip's first entry's deflate data does not end at its"
                                     f" compressed size ({self._csize} bytes)")
        self._read += len(data)
        self._crc = zlib.crc32(piece, self._crc)
        self._written += len(piece)
        if ended:
            self._end_of_data()
        return piece, rest

    def _end_of_data(self) -> None:
        if self._flags & _FLAG_DESCRIPTOR:
            self._state, self._need = _DESC_START, 4
        else:
            self._check(self._crc_expected)

    def _on_descriptor_start(self, first4: bytes) -> None:
        """The descriptor's signature is optional (zipfile writes it): without
        one, these 4 bytes are already the CRC.  (A CRC that happens to equal
        the signature would be misread; the sizes check below then fails.)"""
        self._desc_prefix = b"" if first4 == DESCRIPTOR_SIG else first4
        self._state = _DESC_REST
        self._need = (20 if self._zip64 else 12) - len(self._desc_prefix)

    def _on_descriptor_rest(self, field: bytes) -> None:
        crc, csize, usize = struct.unpack("<IQQ" if self._zip64 else "<III",
                                          self._desc_prefix + field)
        if csize != self._read or usize != self._written:
            raise ZipStreamError(f"zip's first entry is {self._read} bytes compressed,"
                                 f" {self._written} bytes inflated, but its data descriptor"
                                 f" says {csize} and {usize}")
        self._check(crc)

    def _check(self, crc: int) -> None:
        if self._usize is not None and self._written != self._usize:
            raise ZipStreamError(f"zip's first entry inflated to {self._written} bytes,"
                                 f" its header says {self._usize}")
        if self._crc != crc:
            raise ZipStreamError(f"zip's first entry fails its CRC-32 check"
                                 f" (data {self._crc:#010x}, recorded {crc:#010x})")
        self._state = _DONE
