"""Bodies stream through the balancer as they arrive, both ways, in bounded memory."""

from __future__ import annotations

import hashlib
import select
import threading

from conftest import RawReader, connect

MB = 1024 * 1024


def test_first_chunk_arrives_before_backend_finishes(lb):
    # The backend sends chunk 0, then waits 1.5 s before chunk 1.  A buffering
    # proxy would show nothing until the end; we must see chunk 0 alone.
    with connect(lb.port, timeout=10) as sock:
        sock.sendall(b"GET /stream?chunks=2&size=64&delay=1.5 HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b"chunk-0|" not in received:
            data = sock.recv(65536)
            assert data, "connection closed before the first chunk"
            received += data
        assert b"chunk-1|" not in received
        # Nothing more is readable while the backend is still sleeping.
        readable, _, _ = select.select([sock], [], [], 0.5)
        assert not readable, "more data arrived although the backend had not sent it yet"
        while not received.endswith(b"0\r\n\r\n"):
            data = sock.recv(65536)
            assert data, "connection closed before the response ended"
            received += data
        assert b"chunk-1|" in received


def _pattern_stream(total: int, piece: int = 256 * 1024):
    block = (b"0123456789abcdef" * (piece // 16 + 1))[:piece]
    sent = 0
    while sent < total:
        n = min(piece, total - sent)
        yield block[:n]
        sent += n


def test_large_upload_echoed_back_in_bounded_memory(start_backend, start_lb):
    total = 64 * MB
    backend = start_backend()
    lb = start_lb([backend.url], limits={"max_body_bytes": 256 * MB})
    rss_before = lb.rss_kib("VmRSS")
    expected = hashlib.sha256()
    for piece in _pattern_stream(total):
        expected.update(piece)

    with connect(lb.port, timeout=30) as sock:
        sock.sendall(b"POST /echo?cl=1 HTTP/1.1\r\nHost: x\r\n"
                     + f"Content-Length: {total}\r\n\r\n".encode())
        errors = []

        def send_body():
            try:
                for piece in _pattern_stream(total):
                    sock.sendall(piece)
            except OSError as exc:
                errors.append(exc)

        sender = threading.Thread(target=send_body)
        sender.start()
        reader = RawReader(sock)
        resp = reader.response(head_only=True)
        assert resp.status == 200
        got = hashlib.sha256()
        received = len(reader.buf)
        got.update(reader.buf)
        while received < total:
            data = sock.recv(MB)
            assert data, f"closed after {received} bytes"
            got.update(data)
            received += len(data)
        sender.join(30)
        assert not errors
    assert received == total
    assert got.hexdigest() == expected.hexdigest()
    growth_mib = (lb.rss_kib("VmHWM") - rss_before) / 1024
    assert growth_mib < 8, f"balancer peak memory grew {growth_mib:.1f} MiB for a 64 MiB body"


def test_large_download_to_a_stalled_client_is_not_buffered(lb):
    # The client reads nothing for a while: backpressure must stop reading
    # from the backend instead of piling 64 MiB up inside the balancer.
    total = 64 * MB
    rss_before = lb.rss_kib("VmRSS")
    with connect(lb.port, timeout=30) as sock:
        sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 65536)
        sock.sendall(f"GET /bytes?n={total} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        select.select([], [], [], 1.5)  # stall: let the backend push as much as it can
        stalled_growth = (lb.rss_kib("VmHWM") - rss_before) / 1024
        reader = RawReader(sock)
        resp = reader.response(head_only=True)
        assert resp.status == 200 and resp.header("content-length") == str(total)
        received = len(reader.buf)
        while received < total:
            data = sock.recv(MB)
            assert data
            received += len(data)
    assert received == total
    assert stalled_growth < 8, f"balancer buffered {stalled_growth:.1f} MiB for a stalled client"
    growth_mib = (lb.rss_kib("VmHWM") - rss_before) / 1024
    assert growth_mib < 8, f"balancer peak memory grew {growth_mib:.1f} MiB"


def test_chunked_upload_streams_through(start_backend, start_lb):
    # A body that cannot be kept for a retry (over retry.replay_max_bytes,
    # here 0) is streamed: it takes its slot and goes on as it comes.
    lb = start_lb([start_backend().url], retry={"replay_max_bytes": 0})
    with connect(lb.port, timeout=10) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        reader = RawReader(sock)
        # The backend answers as soon as it has the head; the first piece of the
        # body comes back before the client has sent the rest.
        sock.sendall(b"5\r\nhello\r\n")
        resp = reader.response(head_only=True)
        assert resp.status == 200
        while b"hello" not in reader.buf:
            assert reader._fill()
        sock.sendall(b"6\r\n world\r\n0\r\n\r\n")
        while not reader.buf.endswith(b"0\r\n\r\n"):
            assert reader._fill()
        assert b"hello" in reader.buf and b" world" in reader.buf
