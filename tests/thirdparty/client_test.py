"""Third-party client test: the `websockets` library against a real fanout process.

Each check talks to the server over loopback with an unmodified third-party client, so it
proves interoperability, not just agreement between fanout and its own test helpers. The server
runs with --ping-interval 1 --idle-timeout 3 --max-message 1024 so keep-alive and size limits are
reached in seconds, and with --compression on: `websockets` offers permessage-deflate by default,
so every check also runs over a compressed connection (client messages compressed by the
library, server messages of 64 bytes and more by fanout). Usage: client_test.py FANOUT_BIN.
"""

import asyncio
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time

import websockets
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

ARRIVES = 10.0  # generous: "does arrive" on a noisy 2-core machine
MAX_MESSAGE = 1024


class Fanout:
    """A fanout process on a free loopback port, stopped by PID."""

    def __init__(self, binary):
        args = [binary, "--listen", "127.0.0.1:0", "--threads", "2",
                "--ping-interval", "1", "--idle-timeout", "3",
                "--max-message", str(MAX_MESSAGE), "--drain-delay", "0", "--drain-time", "0",
                "--compression", "on", "--compression-min-bytes", "64"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, "RUST_LOG": "warn"})
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"fanout did not start: {line!r} {self.proc.stderr.read()!r}")
        self.addr = line.removeprefix("listening on ")
        self.url = f"ws://{self.addr}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def ws(url, **kw):
    # No client-initiated keep-alive pings unless a check asks: server pings must do the work.
    kw.setdefault("ping_interval", None)
    kw.setdefault("open_timeout", ARRIVES)
    kw.setdefault("close_timeout", ARRIVES)
    return connect(url, **kw)


async def recv(conn):
    return await asyncio.wait_for(conn.recv(), ARRIVES)


async def closed_with(conn):
    """Waits for the server to close `conn`; returns the close frame it sent."""
    try:
        while True:
            await recv(conn)
    except ConnectionClosed as e:
        assert e.rcvd is not None, f"connection dropped without a close frame: {e}"
        return e.rcvd


async def raw_chat_between_two_clients(s):
    async with ws(f"{s.url}/ws?channel=tp-chat") as a, ws(f"{s.url}/ws?channel=tp-chat") as b:
        await a.send("hello from a")
        assert await recv(a) == "hello from a"   # the sender gets its own message
        assert await recv(b) == "hello from a"
        await b.send(b"\x00\x01\xffbinary")
        got_a, got_b = await recv(a), await recv(b)
        assert got_a == got_b == b"\x00\x01\xffbinary", (got_a, got_b)  # binary stays binary
        async with ws(f"{s.url}/ws?channel=tp-other") as c:
            await c.send("elsewhere")
            assert await recv(c) == "elsewhere"
            await a.send("second")
            assert await recv(a) == "second", "a saw another channel's message"


async def fragmented_message_is_reassembled(s):
    async with ws(f"{s.url}/ws?channel=tp-frag") as a, ws(f"{s.url}/ws?channel=tp-frag") as b:
        # An iterable makes websockets send one message as several frames (first + continuations).
        await a.send(["frag", "men", "ted ", "é"])
        assert await recv(b) == "fragmented é"
        await a.send([b"\x01\x02", b"", b"\x03"])
        assert await recv(b) == b"\x01\x02\x03"
        assert await recv(a) == "fragmented é"
        assert await recv(a) == b"\x01\x02\x03"


async def fragments_over_the_limit_get_1009(s):
    async with ws(f"{s.url}/ws") as a:
        chunk = "x" * (MAX_MESSAGE // 2)
        await a.send([chunk, chunk, chunk])  # each frame is small, the message is not
        frame = await closed_with(a)
        assert frame.code == 1009, frame


async def client_ping_is_answered(s):
    async with ws(f"{s.url}/ws") as a:
        pong = await a.ping(b"are you there")
        latency = await asyncio.wait_for(pong, ARRIVES)
        assert latency >= 0


async def server_pings_keep_a_polite_client_alive(s):
    pings = []

    class Counter(logging.Handler):
        def emit(self, record):
            if "PING" in record.getMessage() and record.getMessage().startswith("<"):
                pings.append(record)

    logger = logging.getLogger("tp.keepalive")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(Counter())
    logger.propagate = False
    async with ws(f"{s.url}/ws?channel=tp-alive", logger=logger) as a:
        # Idle for longer than --idle-timeout 3; only the library's pong replies keep us open.
        deadline = time.monotonic() + 4.5
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            assert a.close_code is None, f"closed after {4.5 - (deadline - time.monotonic()):.1f}s: {a.close_code}"
        await a.send("still here")
        assert await recv(a) == "still here"
        assert len(pings) >= 2, f"expected server pings every ~1 s, saw {len(pings)}"


def handshake(addr):
    host, port = addr.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=ARRIVES)
    sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "closed during handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock, head.split(b"\r\n\r\n", 1)[1]


async def silent_client_is_closed_1001(s):
    # The control for the keep-alive check: a client that never answers pings is closed, so the
    # check above passes because the library answered, not because the server never closes.
    def run():
        sock, buf = handshake(s.addr)
        opcodes, started = [], time.monotonic()
        while time.monotonic() - started < 15:
            while len(buf) >= 2 and len(buf) >= 2 + (buf[1] & 0x7F):
                op, n = buf[0] & 0x0F, buf[1] & 0x7F
                assert n < 126
                payload, buf = buf[2:2 + n], buf[2 + n:]
                opcodes.append(op)
                if op == 0x8:
                    return opcodes, struct.unpack(">H", payload[:2])[0], time.monotonic() - started
            chunk = sock.recv(4096)
            if not chunk:
                break
            buf += chunk
        raise AssertionError(f"no close frame within 15 s; opcodes {opcodes}")

    opcodes, code, after = await asyncio.to_thread(run)
    assert 0x9 in opcodes, f"server never pinged: {opcodes}"
    assert code == 1001, code
    assert 2.0 <= after, f"closed too early ({after:.1f}s < idle timeout)"


async def client_close_codes_are_echoed(s):
    # RFC 6455 5.5.1: the echo carries the status code; the reason is the server's to choose.
    for code, reason in [(1000, ""), (4000, "bye")]:
        async with ws(f"{s.url}/ws") as a:
            await a.close(code, reason)
            assert a.close_code == code, (code, a.close_code)


async def over_limit_message_gets_1009(s):
    async with ws(f"{s.url}/ws") as a, ws(f"{s.url}/ws") as b:
        await a.send("y" * (MAX_MESSAGE + 1))
        frame = await closed_with(a)
        assert frame.code == 1009, frame
        # Nothing of it reached the channel, and the limit itself still passes.
        await b.send("z" * MAX_MESSAGE)
        assert await recv(b) == "z" * MAX_MESSAGE


async def invalid_utf8_text_gets_1007(s):
    async with ws(f"{s.url}/ws") as a:
        await a.send(b"bad \xff\xfe text", text=True)  # bytes sent as a text frame, unchecked
        frame = await closed_with(a)
        assert frame.code == 1007, frame


async def json_subprotocol_is_negotiated(s):
    async with ws(f"{s.url}/ws", subprotocols=["chat.v2", "fanout.json"]) as j, \
            ws(f"{s.url}/ws?channel=tp-json") as raw:
        assert j.subprotocol == "fanout.json", j.subprotocol
        await j.send(json.dumps({"op": "subscribe", "channel": "tp-json", "id": 1}))
        assert json.loads(await recv(j)) == {"op": "ok", "id": 1}
        await raw.send("from raw")
        assert await recv(raw) == "from raw"
        msg = json.loads(await recv(j))
        assert msg == {"op": "message", "channel": "tp-json", "data": "from raw"}, msg
        await j.send(json.dumps({"op": "publish", "channel": "tp-json", "data": {"k": [1]}, "id": "p"}))
        replies = [json.loads(await recv(j)), json.loads(await recv(j))]
        assert {"op": "ok", "id": "p"} in replies, replies
        assert json.loads(await recv(raw)) == {"k": [1]}  # the data's JSON text, as published
        await j.send(json.dumps({"op": "subscribe", "channel": "bad name", "id": 2}))
        err = json.loads(await recv(j))
        assert err["op"] == "error" and err["id"] == 2, err
    async with ws(f"{s.url}/ws") as plain:
        assert plain.subprotocol is None, plain.subprotocol


def deflate_agreed(conn):
    return any(type(e).__name__ == "PerMessageDeflate" for e in conn.protocol.extensions)


async def compression_is_negotiated_and_used(s):
    chat = json.dumps({"user": "ada", "text": "hello everyone in the room " * 30})
    async with ws(f"{s.url}/ws?channel=tp-zip") as zipped, \
            ws(f"{s.url}/ws?channel=tp-zip", compression=None) as plain:
        assert deflate_agreed(zipped), zipped.protocol.extensions
        assert not deflate_agreed(plain), plain.protocol.extensions
        await zipped.send(chat)  # compressed by the library
        assert await recv(plain) == chat
        assert await recv(zipped) == chat  # compressed by fanout, inflated by the library
        await plain.send(chat)
        assert await recv(zipped) == chat
        assert await recv(plain) == chat
        await zipped.send("short")  # under --compression-min-bytes: plain from fanout
        assert await recv(zipped) == "short"
        assert await recv(plain) == "short"


CHECKS = [
    compression_is_negotiated_and_used,
    raw_chat_between_two_clients,
    fragmented_message_is_reassembled,
    fragments_over_the_limit_get_1009,
    client_ping_is_answered,
    server_pings_keep_a_polite_client_alive,
    silent_client_is_closed_1001,
    client_close_codes_are_echoed,
    over_limit_message_gets_1009,
    invalid_utf8_text_gets_1007,
    json_subprotocol_is_negotiated,
]


async def main(binary):
    server = Fanout(binary)
    passed = failed = 0
    try:
        print(f"thirdparty: websockets {websockets.__version__} against {binary} at {server.addr}")
        for check in CHECKS:
            started = time.monotonic()
            try:
                await asyncio.wait_for(check(server), 60)
                passed += 1
                print(f"PASS {check.__name__} ({time.monotonic() - started:.1f}s)")
            except Exception as e:  # report every check, then fail at the end
                failed += 1
                print(f"FAIL {check.__name__}: {type(e).__name__}: {e}")
        if server.proc.poll() is not None:
            failed += 1
            print(f"FAIL server exited during the test with {server.proc.returncode}")
    finally:
        server.stop()
    print(f"{passed} passed, {failed} failed")
    return failed


if __name__ == "__main__":
    sys.exit(1 if asyncio.run(main(sys.argv[1])) else 0)
