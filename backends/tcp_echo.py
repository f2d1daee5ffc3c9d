"""A raw TCP echo server for tts-lb's [[tcp]] listener tests.

Run it:  python -m backends.tcp_echo --port N [--host 127.0.0.1] [--port-file F] [--greeting TEXT]
         (prints "listening on 127.0.0.1:PORT"; exits cleanly on SIGTERM/SIGINT)

Per connection: TEXT first when --greeting is given (a server-speaks-first
protocol), then every byte received is echoed back.  On EOF from the client
it writes "\\n<bytes received>\\n" and half-closes (write_eof), so a test sees
that a half-close travelled both ways through the balancer.

Stdout, one line per event, for tests that read them with wait_for_line:
  "accepted N open M"  on connect (N: connections so far, M: open now)
  "peak P"             on close (P: most connections open at once so far)
"""

from __future__ import annotations

import asyncio

from .plumbing import READ_SIZE, Server, cli_parser, serve_until_signal


class EchoConn:
    """One connection (what plumbing.Server runs and stops: reader, writer, task, run())."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 greeting: bytes):
        self.reader, self.writer, self.greeting = reader, writer, greeting
        self.task = asyncio.current_task()

    async def run(self) -> None:
        reader, writer = self.reader, self.writer
        received = 0
        if self.greeting:
            writer.write(self.greeting)
            await writer.drain()
        while data := await reader.read(READ_SIZE):
            received += len(data)
            writer.write(data)
            await writer.drain()   # backpressure: stop reading while the peer is not
        writer.write(f"\n{received}\n".encode())
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        writer.close()
        await writer.wait_closed()


class TcpEcho(Server):
    def __init__(self, greeting: bytes):
        super().__init__()
        self.greeting = greeting
        self.accepted = 0
        self.open = 0
        self.peak = 0

    def new_conn(self, reader, writer) -> EchoConn:
        self.accepted += 1
        self.open += 1
        self.peak = max(self.peak, self.open)
        print(f"accepted {self.accepted} open {self.open}", flush=True)
        return EchoConn(reader, writer, self.greeting)

    def conn_ended(self, c: EchoConn) -> None:
        self.open -= 1
        print(f"peak {self.peak}", flush=True)


def main() -> None:
    p = cli_parser("tcp_echo", __doc__)
    p.add_argument("--greeting", default="", help="sent first on every connection")
    args = p.parse_args()
    serve_until_signal(lambda: TcpEcho(args.greeting.encode()), args)


if __name__ == "__main__":
    main()
