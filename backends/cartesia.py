"""A fake Cartesia TTS API (tts-lb's cloud fallback) that checks what the real one checks.

Run it:     python -m backends.cartesia --port N [--host 127.0.0.1] [--port-file PATH]
                [--api-key KEY | --api-key-env NAME] [--concurrency N]
                [--tls-cert FILE --tls-key FILE] [--chars-per-second F] [--rtf F]
                [--wav-sizes exact|unknown] [--misbehave MODE]
            (prints "listening on 127.0.0.1:PORT", plus " (https)" when serving TLS; exits 0 on
            SIGTERM/SIGINT.  With neither key option the key comes from $CARTESIA_API_KEY; prefer
            --api-key-env, which keeps the key out of `ps`.)
In-process: fake = FakeCartesia(api_key="k", concurrency=2, ssl=ctx); await fake.start(host, 0);
            fake.port, fake.stats, fake.requests; await fake.stop().
            From synchronous code: `with CartesiaThread(api_key="k") as c: c.port`.

Endpoints (facts from /work/shared/reference/tts-apis.md, docs.cartesia.ai and the SDKs):
  POST /tts/bytes   JSON {model_id, transcript, voice:{mode:"id", id:UUID}, language?,
                    output_format:{container raw|wav|mp3, encoding, sample_rate[, bit_rate]},
                    generation_config?:{speed 0.6-1.5, volume 0.5-2.0, emotion}, duration?}.
                    200: the audio, chunked, as it is "generated" (a 440 Hz tone).
  POST /tts/sse     same body, container raw only; text/event-stream of
                    data: {"type":"chunk","data":"<base64>","done":false,"status_code":206}
                    ... then data: {"type":"done","done":true,"status_code":200}
  GET /             {"ok":true,"version":"2026-03-01"}, no key needed (a reachability probe)
  GET /_requests    every /tts/* request so far (the newest 10000): method, path, headers (key values replaced by
                    a marker saying whether they matched), auth verdict, version, parsed body,
                    status, completed, audio_bytes.  The key never appears anywhere in it.
  GET /_stats       {"requests", "in_flight", "max_in_flight", "by_status", "characters_billed",
                    "probes", "concurrency"}      GET /_reset  forgets the log and the counters.
  GET /_mode?misbehave=MODE   sets (and answers) {"misbehave": MODE}; --misbehave sets it at start,
                    /_reset leaves it.  Unknown parameters or modes: 400 {"error": ...}, no change.
  (/_* paths need no key and are never logged or counted.)

Misbehaving (a broken Cartesia or a proxy in front of it that reflects what it was sent), for
  tests that the balancer never passes on or logs what the other side says.  Applied to /tts/*
  requests that pass the version and key checks; their /_requests entry gets "misbehaved": MODE.
  off              (default) behave.
  bad-status-line  the body is read, then "HTTP/1.1 2OO Authorization: <the request's
                   Authorization (or X-API-Key) value>" and a blank line, then close.
  bad-header-line  "HTTP/1.1 200 OK", then the header line "Your Authorization: <value>" (a
                   space in the name: malformed), then close.
  quote-key-NNN    status NNN (200-599) whose reason phrase and X-Echo-Authorization header
                   quote the value; 200 then streams the audio as usual, any other status has
                   the usual error body with a message quoting the key in pieces: whole, in the
                   Bearer form, a prefix, a suffix, an 8-character middle, lower and upper case.

Checks, in this order, on /tts/*:  405 for a method other than POST;
  Cartesia-Version: missing, not a YYYY-MM-DD date, or older than 2024-06-10 -> 400;
  key: versions >= 2025-04-16 want "Authorization: Bearer KEY", older ones "X-API-Key: KEY";
       missing or wrong -> 401 (the other header, even with the right key, does not count);
  concurrency: more than N TTS requests at once -> 429 "concurrency_limited" (0: no limit);
  body: > 1 MiB -> 413; not JSON / invalid -> 400 (the SDK documents 400 for an empty
       transcript and for a null output_format, so every validation failure is 400; a retired
       model is 400 with error_code "model_sunsetted", the body Cartesia documents for it).
Error bodies: Cartesia-Version >= 2026-03-01 gets JSON {"error_code", "title", "message",
  "request_id"} (error_code is null unless Cartesia documents one: concurrency_limited,
  model_sunsetted); older versions, and requests whose version header is missing or unusable,
  get text/plain "Title: Message".

Audio: duration = len(transcript) / chars_per_second / speed (capped by "duration"); the
  generation of t seconds of audio takes rtf * t seconds, sent in 0.1 s pieces.  Billing: the
  transcript's characters are billed when the 200 head is sent.
  wav: the fake knows the length before it sends the first byte, so by default (wav_sizes
       "exact") the RIFF and data sizes are exact - streamed, yet parseable by `wave`.
       wav_sizes="unknown" writes 0xFFFFFFFF placeholders instead, as streaming servers that do
       not know the length do (OpenAI, ffmpeg pipes), to test clients that must cope with that.
       s16le is WAVE_FORMAT_PCM (1); f32le (3), alaw (6) and mulaw (7) get the 18-byte fmt chunk
       and the fact chunk that non-PCM WAVs require.
  mp3: silent MPEG Layer III frames (see cartesia_audio.mp3_silent_frame), not a 400: the
       fallback may be asked for mp3, no encoder is available, and valid all-zero frames cost a
       few lines.  As in the real API, mp3 takes sample_rate and bit_rate (no encoding).

The code, one concern per module (this one: the command line, and the names to import):
  cartesia_audio.py       output formats, G.711 codecs, the tone, WAV headers, silent MP3 frames
  cartesia_validation.py  the version, key and body checks, and the error bodies (ApiError)
  cartesia_misbehave.py   the misbehave modes: what they send and how it quotes the key
  cartesia_server.py      FakeCartesia and CartesiaThread: routing, streaming, /_* introspection
"""
from __future__ import annotations

import argparse, math, os, ssl as _ssl, sys

# Tests import the fake from here (the in-process API above, the G.711 codecs): the split
# into modules must not show to them.
from .cartesia_audio import alaw2lin, lin2alaw, lin2ulaw, ulaw2lin  # noqa: F401
from .cartesia_misbehave import check_misbehave
from .cartesia_server import CartesiaThread, FakeCartesia, server_ssl_context  # noqa: F401
from .plumbing import cli_parser, serve_until_signal


def _positive(kind):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (v >= 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"{text!r}: want a finite number >= 0")
        return v
    return parse


def _mode(text):
    try:
        return check_misbehave(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None):
    p = cli_parser("cartesia", __doc__)
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--api-key", help="the key clients must send (visible in ps: prefer --api-key-env)")
    keys.add_argument("--api-key-env", metavar="NAME",
                      help="read the key from this environment variable (default CARTESIA_API_KEY)")
    p.add_argument("--concurrency", type=_positive(int), default=0, metavar="N",
                   help="simultaneous TTS requests before 429 (plans: Free 2, Pro 3, Startup 5, "
                        "Scale 15; default 0: no limit)")
    p.add_argument("--tls-cert", help="serve HTTPS with this certificate chain (PEM)")
    p.add_argument("--tls-key", help="... and this private key (PEM)")
    p.add_argument("--chars-per-second", type=_positive(float), default=15.0, metavar="F",
                   help="transcript characters per second of audio (default 15)")
    p.add_argument("--rtf", type=_positive(float), default=0.1, metavar="F",
                   help="real-time factor: seconds of work per second of audio (default 0.1; "
                        "0: as fast as the socket takes it)")
    p.add_argument("--wav-sizes", choices=("exact", "unknown"), default="exact",
                   help="WAV header sizes: exact (default) or 0xFFFFFFFF placeholders")
    p.add_argument("--misbehave", type=_mode, default="off", metavar="MODE",
                   help="answer TTS calls badly, quoting the key: off (default), "
                        "bad-status-line, bad-header-line, quote-key-NNN (see the module doc)")
    args = p.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if args.chars_per_second == 0:
        p.error("--chars-per-second must be > 0")
    if args.api_key is not None:
        api_key = args.api_key
    else:
        name = args.api_key_env or "CARTESIA_API_KEY"
        api_key = os.environ.get(name, "")
        if not api_key:
            p.error(f"no API key: ${name} is unset or empty (pass --api-key or --api-key-env)")
    if not api_key:
        p.error("the API key must not be empty")
    try:
        ctx = server_ssl_context(args.tls_cert, args.tls_key) if args.tls_cert else None
        serve_until_signal(lambda: FakeCartesia(api_key, args.concurrency, args.chars_per_second,
                                                args.rtf, args.wav_sizes, ctx, args.misbehave),
                           args, " (https)" if ctx else "")
    except (OSError, _ssl.SSLError, ValueError) as e:
        print(f"fake cartesia: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
