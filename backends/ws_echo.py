"""A WebSocket backend for tts-lb's tunnel tests: the websockets library's
asyncio server, or (--starlette) a Starlette app under uvicorn.

Run it:   python -m backends.ws_echo --port N [--starlette]
          (prints "listening on 127.0.0.1:PORT" once listening; port 0 takes a free one;
          exits on SIGTERM/SIGINT)

WebSocket paths (query-string parameters):
  /echo                       every text or binary message is sent back as it came
  /close?code=4001&reason=bye the server closes at once with that code and reason
  /count                      each message is answered with its length, as text
  /flood?n=N&size=S           N binary messages of S bytes, as fast as the peer takes them,
                              then the session stays open until the client closes it;
                              the websockets server's handler receives nothing here, so
                              the library stops reading once 16 messages wait
                              (/flood?n=0: a backend that reads nothing)
HTTP:
  GET /stats                  JSON {"open": sessions open now,
                                    "closed": [the last 100 close codes clients sent on
                                               /echo, /count and /flood; the client went
                                               without a close frame: 1006, or 1005 from
                                               uvicorn, which reports a lost connection so]}
  anything else               404 (a plain GET of a WebSocket path: 426 from the websockets
                              library, 404 from Starlette)

Keepalive pings are off in both servers, so a session is silent unless the client speaks:
the balancer's tunnel_idle tests need a tunnel that really is silent.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import http
import json
import signal
import socket
from urllib.parse import parse_qs, urlsplit

MAX_MESSAGE = 16 * 1024 * 1024   # 16 MiB: the tests echo 10 MB messages
WS_PATHS = ("/echo", "/close", "/count", "/flood")


class Sessions:
    """What /stats reports, shared by both servers."""

    def __init__(self):
        self.open = 0
        self.closed: collections.deque[int] = collections.deque(maxlen=100)

    def as_json(self) -> str:
        return json.dumps({"open": self.open, "closed": list(self.closed)})


def split_target(target: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(target)
    return parts.path, {k: v[-1] for k, v in parse_qs(parts.query).items()}


# --- the websockets library's asyncio server


async def run_websockets(port: int) -> None:
    from websockets.asyncio.server import serve
    from websockets.exceptions import ConnectionClosed

    sessions = Sessions()

    def process_request(connection, request):
        """Plain HTTP answers; None lets the WebSocket handshake go on."""
        path, _ = split_target(request.path)
        if path == "/stats":
            response = connection.respond(http.HTTPStatus.OK, sessions.as_json() + "\n")
            response.headers["Content-Type"] = "application/json"
            return response
        if path not in WS_PATHS:
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        return None

    async def handler(connection) -> None:
        path, query = split_target(connection.request.path)
        sessions.open += 1
        try:
            if path == "/echo":
                async for message in connection:
                    await connection.send(message)
            elif path == "/count":
                async for message in connection:
                    await connection.send(str(len(message)))
            elif path == "/close":
                await connection.close(int(query.get("code", 1000)), query.get("reason", ""))
            elif path == "/flood":
                payload = b"\xa5" * int(query.get("size", 65536))
                for _ in range(int(query.get("n", 1))):
                    await connection.send(payload)   # waits while the peer does not read
            # close_code is set only once the TCP connection is gone.
            await connection.wait_closed()
        except ConnectionClosed:
            await connection.wait_closed()
        except Exception:
            # A bad query parameter: end the session rather than wait for the client,
            # since the library closes the connection only after this handler returns.
            await connection.close(1011, "bad request")
            raise
        finally:
            sessions.open -= 1
        if path != "/close" and connection.close_code is not None:
            sessions.closed.append(connection.close_code)

    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(handler, "127.0.0.1", port, process_request=process_request,
                     max_size=MAX_MESSAGE, ping_interval=None, compression=None) as server:
        bound = server.sockets[0].getsockname()[1]
        print(f"listening on 127.0.0.1:{bound}", flush=True)
        await stop


# --- Starlette under uvicorn


def starlette_app():
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocketDisconnect

    sessions = Sessions()

    async def stats(request):
        return Response(sessions.as_json() + "\n", media_type="application/json")

    async def receive_until_disconnect(websocket, answer=None) -> None:
        """Receive messages (answering each with `answer(message)` if given) until the
        client's close or disconnect, whose code is recorded."""
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                sessions.closed.append(message.get("code", 1005))
                return
            if answer is not None:
                await answer(message)

    async def session(websocket, body) -> None:
        await websocket.accept()
        sessions.open += 1
        try:
            await body(websocket, dict(websocket.query_params))
        except WebSocketDisconnect as gone:   # a send after the client went (1006)
            sessions.closed.append(gone.code)
        finally:
            sessions.open -= 1

    async def echo(websocket, query):
        async def send_back(message):
            if message.get("text") is not None:
                await websocket.send_text(message["text"])
            else:
                await websocket.send_bytes(message.get("bytes") or b"")
        await receive_until_disconnect(websocket, send_back)

    async def count(websocket, query):
        async def send_length(message):
            data = message.get("text") if message.get("text") is not None else message.get("bytes")
            await websocket.send_text(str(len(data or b"")))
        await receive_until_disconnect(websocket, send_length)

    async def close(websocket, query):
        await websocket.close(int(query.get("code", 1000)), query.get("reason", ""))

    async def flood(websocket, query):
        payload = b"\xa5" * int(query.get("size", 65536))
        for _ in range(int(query.get("n", 1))):
            await websocket.send_bytes(payload)
        await receive_until_disconnect(websocket)

    def ws_route(path, body):
        async def endpoint(websocket):
            await session(websocket, body)
        return WebSocketRoute(path, endpoint)

    return Starlette(routes=[Route("/stats", stats), ws_route("/echo", echo),
                             ws_route("/count", count), ws_route("/close", close),
                             ws_route("/flood", flood)])


async def run_starlette(port: int) -> None:
    import uvicorn

    # Our own socket, so that port 0 gives a port we can print.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(starlette_app(), ws_max_size=MAX_MESSAGE, ws_ping_interval=None,
                            ws_per_message_deflate=False, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.01)
    if server.started:
        print(f"listening on 127.0.0.1:{sock.getsockname()[1]}", flush=True)
    await serving   # uvicorn handles SIGTERM/SIGINT itself


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--starlette", action="store_true", help="Starlette + uvicorn")
    args = parser.parse_args()
    asyncio.run(run_starlette(args.port) if args.starlette else run_websockets(args.port))


if __name__ == "__main__":
    main()
