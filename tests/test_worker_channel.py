"""The host's end of the sandbox worker stream, over a real socket pair: what it accepts and what it bounds.

No engine needed: the far end plays the worker (or a worker's stream taken over by hostile code)
with docker's multiplexed framing, exactly as an attached exec delivers it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from typing import Any

import pytest

from tracegen.runtime.docker.channel import WorkerChannel, WorkerLost


def frame(data: bytes, stream: int = 1) -> bytes:
    return struct.pack(">BxxxI", stream, len(data)) + data


async def channel_pair(max_line: int = 1 << 20) -> tuple[WorkerChannel, socket.socket]:
    ours, theirs = socket.socketpair()
    channel = WorkerChannel(ours, asyncio.get_running_loop(), max_line)
    await channel.start()
    theirs.setblocking(False)
    return channel, theirs


async def read_request(sock: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        data += await asyncio.get_running_loop().sock_recv(sock, 65536)
    request: dict[str, Any] = json.loads(data)
    return request


@pytest.mark.anyio
async def test_a_reply_echoing_id_and_nonce_is_returned() -> None:
    channel, worker = await channel_pair()

    async def answer() -> None:
        req = await read_request(worker)
        reply = {"op": "pong", "id": req["id"], "nonce": req["nonce"]}
        await asyncio.get_running_loop().sock_sendall(worker, frame(json.dumps(reply).encode() + b"\n"))

    answering = asyncio.create_task(answer())
    assert (await channel.request({"op": "ping"}, 5))["op"] == "pong"
    await answering
    channel.close()
    worker.close()


@pytest.mark.parametrize("tamper", ["nonce", "id"])
@pytest.mark.anyio
async def test_a_reply_to_another_request_is_a_protocol_violation(tamper: str) -> None:
    channel, worker = await channel_pair()

    async def answer() -> None:
        req = await read_request(worker)
        reply = {"op": "result", "exit_code": 0, "id": req["id"], "nonce": req["nonce"]}
        reply[tamper] = "forged" if tamper == "nonce" else req["id"] + 1
        await asyncio.get_running_loop().sock_sendall(worker, frame(json.dumps(reply).encode() + b"\n"))

    answering = asyncio.create_task(answer())
    with pytest.raises(WorkerLost):
        await channel.request({"op": "run"}, 5)
    await answering
    assert channel.lost and channel.violation is not None and "nonce" in channel.violation
    with pytest.raises(WorkerLost):  # lost for good: the container gets replaced
        await channel.request({"op": "ping"}, 5)
    channel.close()
    worker.close()


@pytest.mark.anyio
async def test_a_line_nobody_asked_for_loses_the_channel() -> None:
    channel, worker = await channel_pair()
    worker.sendall(frame(b'{"op": "result", "exit_code": 0}\n'))
    for _ in range(100):
        if channel.lost:
            break
        await asyncio.sleep(0.01)
    assert channel.lost and "answers no request" in (channel.violation or "")
    channel.close()
    worker.close()


@pytest.mark.parametrize("how", ["one long line", "one huge frame"])
@pytest.mark.anyio
async def test_host_buffers_are_bounded(how: str) -> None:
    """A flood ends the channel at max_line bytes instead of growing the host's memory."""

    channel, worker = await channel_pair(max_line=64 * 1024)
    if how == "one long line":
        for _ in range(64):  # up to 4 MB without a newline, in frames
            try:
                worker.sendall(frame(b"x" * 65536))
            except OSError:  # the host stopped reading: it gave up on this stream
                break
            await asyncio.sleep(0.001)
            if channel.lost:
                break
    else:
        worker.sendall(struct.pack(">BxxxI", 1, 1 << 30))  # announces a 1 GB frame
    for _ in range(200):
        if channel.lost:
            break
        await asyncio.sleep(0.01)
    assert channel.lost and "byte" in (channel.violation or "")
    assert len(channel._line) == 0 and len(channel._buffer) == 0
    channel.close()
    worker.close()


def test_feeding_a_line_in_small_chunks_is_linear() -> None:
    """Each chunk is scanned once: 4x the bytes in 64-byte frames takes about 4x the time, not 16x."""

    def feed(size: int) -> float:
        loop = asyncio.new_event_loop()
        try:
            ours, theirs = socket.socketpair()
            channel = WorkerChannel(ours, loop, max_line=size + 1024)
            channel._pending = loop.create_future()
            data = frame(b'{"x": "') + frame(b"x" * 64) * (size // 64) + frame(b'"}\n')  # one JSON object
            started = time.perf_counter()
            for i in range(0, len(data), 72):
                channel._feed(data[i : i + 72])
            took = time.perf_counter() - started
            assert not channel.lost and channel._pending.done()
            channel.close()
            theirs.close()
            return took
        finally:
            loop.close()

    small = min(feed(256 * 1024) for _ in range(3))
    large = min(feed(1024 * 1024) for _ in range(3))
    assert large / small < 8, f"{large / small:.1f}x the time for 4x the bytes"
