"""The hot-path HTTP client against real loopback servers."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest

from tracegen.client.http import ConnectionPool, HttpxPool, open_pool
from tracegen.testing.fake_server import FakeServer, ReactScript, Scripted, text_reply

Start = Callable[[Any], FakeServer]
BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true, "tools": [{"x": 1}]}'


async def post_many(pool: Any, n: int, concurrency: int) -> list[bytes]:
    sem = asyncio.Semaphore(concurrency)

    async def one() -> bytes:
        async with sem, pool.post("/chat/completions", BODY, {"Content-Type": "application/json"}) as resp:
            assert resp.status == 200
            return bytes(await resp.read())

    try:
        return await asyncio.gather(*(one() for _ in range(n)))
    finally:
        await pool.aclose()


def test_connections_are_kept_alive_and_reused(fake_server: Start) -> None:
    server = fake_server(ReactScript(turns=2, latency_s=0.01))
    bodies = asyncio.run(post_many(ConnectionPool(server.base_url, 5, 5), n=40, concurrency=4))
    assert all(b.rstrip().endswith(b"data: [DONE]") for b in bodies)
    assert len(server.requests) == 40
    assert server.connections <= 4  # one per concurrent request, reused after that


def test_httpx_fallback_speaks_the_same_interface(fake_server: Start) -> None:
    server = fake_server(ReactScript(turns=2, latency_s=0.0))
    bodies = asyncio.run(post_many(HttpxPool(server.base_url, 5, 5), n=5, concurrency=2))
    assert all(b"data: [DONE]" in b for b in bodies)


def test_proxy_settings_select_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "localhost")
    assert isinstance(open_pool("https://api.example.com/v1", 1, 1), HttpxPool)
    assert isinstance(open_pool("http://127.0.0.1:9/v1", 1, 1), ConnectionPool)


def test_content_length_response_and_stale_idle_connection(fake_server: Start) -> None:
    """A server that answers with Content-Length and closes idle connections: the pool recovers."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    served: list[int] = []

    def run() -> None:
        for i in range(2):
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                body = f'{{"n": {i}}}'.encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                served.append(i)
            # closing right after: the pooled connection is now stale

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    async def go() -> list[bytes]:
        pool = ConnectionPool(f"http://127.0.0.1:{port}/v1", 5, 5)
        out = []
        for _ in range(2):
            async with pool.post("/x", b"{}", {}) as resp:
                out.append(await resp.read())
            await asyncio.sleep(0.05)  # let the server's close arrive
        await pool.aclose()
        return out

    assert asyncio.run(go()) == [b'{"n": 0}', b'{"n": 1}']
    thread.join(5)
    listener.close()


def test_read_timeout_is_the_longest_silence(fake_server: Start) -> None:
    slow = text_reply("a b c d e f", pieces=6)
    slow.event_delay_s = 0.15  # 0.15 s between events, about 1 s in all
    server = fake_server(Scripted([slow]))

    async def go() -> bytes:
        pool = ConnectionPool(server.base_url, 5, read_timeout=0.5)
        try:
            async with pool.post("/chat/completions", BODY, {}) as resp:
                return await resp.read()
        finally:
            await pool.aclose()

    assert b"[DONE]" in asyncio.run(go())  # never silent for 0.5 s, so no timeout
