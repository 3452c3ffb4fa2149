"""The host's end of one sandbox worker's exec stream."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import secrets
import socket
import struct
import threading
from typing import Any

log = logging.getLogger(__name__)


class WorkerLost(Exception):
    """The worker's stream ended: the worker (or its container) is gone."""


class WorkerChannel:
    """One attached exec stream to the worker: JSON lines in, docker-multiplexed JSON lines out.

    One request at a time. Every request carries a fresh ``id`` and random ``nonce``; the reply must
    echo both. Anything else (a reply to another request, a line nobody asked for, a line longer
    than ``max_line`` bytes, a frame larger than that) is a protocol violation: the channel is
    lost, so the container is replaced, and nothing of it is returned as a call's output. What the
    host holds per channel is bounded: one line of at most ``max_line`` bytes and a short stderr
    tail; input is scanned once, in time linear in the bytes received.

    Plain (unix or tcp) sockets are driven by asyncio directly; other transports (TLS, ssh) by a
    reader thread of their own, so a waiting call never holds one of the bounded API threads.
    """

    STDERR_KEEP = 4096

    def __init__(self, raw: Any, loop: asyncio.AbstractEventLoop, max_line: int = 1 << 24) -> None:
        self._raw = raw
        self._loop = loop
        self.max_line = max_line
        self._pending: asyncio.Future[dict[str, Any]] | None = None
        self._buffer = bytearray()
        self._line = bytearray()
        self._stderr: collections.deque[bytes] = collections.deque(maxlen=8)
        self._sent = 0
        self.lost = False
        self.violation: str | None = None
        """Why the channel was declared lost by the host (a protocol violation), if it was."""
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        if type(self._raw) is socket.socket:
            self._raw.setblocking(False)
            if self._raw.family == socket.AF_UNIX:
                reader, self._writer = await asyncio.open_unix_connection(sock=self._raw, limit=1 << 16)
            else:
                reader, self._writer = await asyncio.open_connection(sock=self._raw, limit=1 << 16)
            self._reader_task = asyncio.create_task(self._pump_async(reader))
        else:
            self._thread = threading.Thread(target=self._pump_thread, name="tracegen-worker-stream", daemon=True)
            self._thread.start()

    async def _pump_async(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while not self.lost and (data := await reader.read(1 << 16)):
                self._feed(data)
        self._feed_eof()

    def _pump_thread(self) -> None:
        recv = getattr(self._raw, "recv", None) or self._raw.read
        with contextlib.suppress(OSError, ValueError, EOFError):
            while not self.lost and (data := recv(1 << 16)):
                self._loop.call_soon_threadsafe(self._feed, data)
        with contextlib.suppress(RuntimeError):  # the loop may be closed already
            self._loop.call_soon_threadsafe(self._feed_eof)

    def _feed(self, data: bytes) -> None:
        if self.lost:
            return
        # Docker multiplexes a non-tty exec: 8-byte header (stream, 0, 0, 0, big-endian length).
        self._buffer += data
        offset = 0
        while len(self._buffer) - offset >= 8:
            kind = self._buffer[offset]
            (size,) = struct.unpack_from(">I", self._buffer, offset + 4)
            if size > self.max_line + 8:
                return self._violate(f"a {size}-byte frame from the worker")
            if len(self._buffer) - offset < 8 + size:
                break
            payload = bytes(self._buffer[offset + 8 : offset + 8 + size])
            offset += 8 + size
            if kind == 2:
                self._stderr.append(payload[-self.STDERR_KEEP :])
            elif not self._feed_stdout(payload):
                return
        del self._buffer[:offset]

    def _feed_stdout(self, payload: bytes) -> bool:
        """Add one frame's bytes to the current line; hand out each complete line. False once lost."""
        scan_from = len(self._line)  # only the new bytes can hold the newline: linear, not quadratic
        self._line += payload
        while (end := self._line.find(b"\n", scan_from)) >= 0:
            line = bytes(self._line[:end])
            del self._line[: end + 1]
            scan_from = 0
            if not self._deliver(line):
                return False
        if len(self._line) > self.max_line:
            self._violate(f"a reply line over {self.max_line} bytes from the worker")
            return False
        return True

    def _deliver(self, line: bytes) -> bool:
        pending = self._pending
        if pending is None or pending.done():
            self._violate("a line from the worker that answers no request")
            return False
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self._violate("a reply from the worker that is not a JSON object")
            return False
        pending.set_result(message)
        return True

    def _violate(self, why: str) -> None:
        self.violation = why
        log.warning("sandbox worker protocol violation: %s", why)
        self._feed_eof()

    def _feed_eof(self) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(WorkerLost(self.violation or "the worker stream ended"))
        self.lost = True
        self._buffer.clear()
        self._line.clear()

    def stderr_tail(self) -> str:
        return b"".join(self._stderr).decode("utf-8", "replace")[-2000:]

    async def request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one message, return the worker's reply to it.

        Raises WorkerLost when the stream ends or breaks the protocol (a reply whose id or nonce is
        not this request's included), TimeoutError past ``timeout``.
        """
        if self.lost:
            raise WorkerLost(self.violation or "the worker stream is closed")
        if self._pending is not None:
            raise RuntimeError("one request at a time on a worker channel")
        self._sent += 1
        ident, nonce = self._sent, secrets.token_hex(16)
        data = json.dumps({**message, "id": ident, "nonce": nonce}).encode() + b"\n"
        assert self._loop is not None
        self._pending = self._loop.create_future()
        try:
            try:
                if self._writer is not None:
                    self._writer.write(data)
                    await self._writer.drain()
                else:
                    await asyncio.to_thread(self._raw.sendall, data)
            except (OSError, RuntimeError) as exc:
                self.lost = True
                raise WorkerLost(f"cannot write to the worker: {exc}") from exc
            reply = await asyncio.wait_for(asyncio.shield(self._pending), timeout)
        finally:
            self._pending = None
        if reply.get("id") != ident or reply.get("nonce") != nonce:
            self._violate(f"a reply whose id or nonce is not its request's (op {str(reply.get('op'))[:20]!r})")
            raise WorkerLost(self.violation or "protocol violation")
        return reply

    def close(self) -> None:
        self.lost = True
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(WorkerLost("the worker stream was closed"))
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.transport.abort()  # unregisters the socket from the loop at once
        # Close the socket now rather than in the transport's deferred callback: the loop may be closed
        # before that runs, and the socket would then be left open until garbage collection.
        with contextlib.suppress(OSError):
            self._raw.close()
