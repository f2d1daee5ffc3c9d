"""The real ChatTTS server puts MP3 files in its zip (the simulator, having
no MP3 encoder, puts WAVs): the front door decodes the first file as the zip
arrives.  A small stand-in server here answers /generate_voice the way
2noise's examples/api does, with a real MP3 made by FFmpeg's encoder."""

from __future__ import annotations

import http.client
import http.server
import io
import json
import math
import struct
import threading
import zipfile

import pytest

pytest.importorskip("av")

from lb.tts.encoders import StreamEncoder  # noqa: E402

SECONDS = 1.5
RATE = 24000


def tone_mp3(seconds: float) -> bytes:
    n = int(seconds * RATE)
    pcm = struct.pack(f"<{n}h", *(int(8000 * math.sin(2 * math.pi * 440 * i / RATE))
                                  for i in range(n)))
    encoder = StreamEncoder("mp3", RATE)
    return encoder.feed(pcm) + encoder.finish()


class ChatTTSWithMp3(http.server.BaseHTTPRequestHandler):
    zip_body = b""
    seen: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).seen.append((self.path, json.loads(body)))
        self.send_response(200)
        self.send_header("content-type", "application/zip")
        self.send_header("content-length", str(len(self.zip_body)))
        self.end_headers()
        self.wfile.write(self.zip_body)

    def log_message(self, *args):
        pass


@pytest.fixture
def chattts_mp3():
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("0.mp3", tone_mp3(SECONDS))
    ChatTTSWithMp3.zip_body = archive.getvalue()
    ChatTTSWithMp3.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ChatTTSWithMp3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def speech(port: int, body: dict, path: str = "/v1/audio/speech"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    response = conn.getresponse()
    return response, response.read()


def test_mp3_in_the_zip_comes_out_as_pcm(start_lb, chattts_mp3):
    lb = start_lb([{"url": chattts_mp3, "api": "chattts"}],
                  routes=[("/v1/audio/speech", "openai")])
    response, pcm = speech(lb.port, {"input": "Hello there.", "voice": "alloy",
                                     "response_format": "pcm", "speed": 1.2})
    assert response.status == 200, pcm[:300]
    assert response.getheader("content-type") == "audio/pcm"
    assert not pcm.startswith(b"RIFF") and len(pcm) % 2 == 0
    # MP3 pads a frame or so at each end: within 0.1 s of the tone's length
    assert abs(len(pcm) / 2 / RATE - SECONDS) < 0.1, len(pcm)
    samples = struct.unpack(f"<{len(pcm) // 2}h", pcm)
    assert max(abs(s) for s in samples) > 4000          # the tone, not silence
    path, sent = ChatTTSWithMp3.seen[0]
    assert path == "/generate_voice" and sent["text"] == ["Hello there."]
    assert sent["params_infer_code"]["prompt"] == "[speed_6]"
    assert response.getheader("x-tts-speed-applied") == "1.2"


def test_stream_path_defaults_to_wav(start_lb, chattts_mp3):
    lb = start_lb([{"url": chattts_mp3, "api": "chattts"}],
                  routes=[("/v1/audio/speech/stream", "openai")])
    response, wav = speech(lb.port, {"input": "Hello there."}, path="/v1/audio/speech/stream")
    assert response.status == 200 and response.getheader("content-type") == "audio/wav"
    assert wav[:4] == b"RIFF" and wav[36:40] == b"data"
    assert abs((len(wav) - 44) / 2 / RATE - SECONDS) < 0.1
