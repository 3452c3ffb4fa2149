"""The HTTP layer of the streaming hot path: keep-alive HTTP/1.1 connections to one origin.

Why not httpx here: at hundreds of concurrent streams its pool does work proportional to the number
of open connections on every request (httpcore 1.0 scans, and calls ``getpeername`` on, each one), and
that, not the network, capped collect at half its ideal throughput on 2 cores (``bench/collect.py``).
This module does only what a chat-completions stream needs: POST a JSON body, read the status and
headers, hand over the body (chunked, sized or close-delimited) as it arrives, and put the
connection back on an idle stack in O(1) when the body was read to its end.

It supports http and https (TLS with the system trust store). It does not do proxies, redirects,
HTTP/2 or content decoding (it never asks for compression); when an HTTP(S)_PROXY applies to the
URL, :func:`open_pool` returns :class:`HttpxPool`, the same interface over httpx, which does.
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.request
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol
from urllib.parse import urlsplit

_MAX_LINE = 1 << 20  # longest header or chunk-size line we accept


class Response(Protocol):
    status: int
    headers: dict[str, str]

    def iter_bytes(self) -> AsyncIterator[bytes]: ...

    async def read(self) -> bytes: ...


class Pool(Protocol):
    def post(self, path: str, body: bytes, headers: dict[str, str]) -> Any:
        """``async with pool.post(...) as response``; raises ConnectionError / TimeoutError."""
        ...

    def get(self, path: str, headers: dict[str, str]) -> Any:
        """``async with pool.get(...) as response`` (the preflight's ``GET /models``)."""
        ...

    async def aclose(self) -> None: ...


def open_pool(base_url: str, connect_timeout: float, read_timeout: float) -> Pool:
    parts = urlsplit(base_url)
    proxies = urllib.request.getproxies()
    if parts.scheme in proxies and not urllib.request.proxy_bypass(parts.hostname or ""):
        return HttpxPool(base_url, connect_timeout, read_timeout)
    return ConnectionPool(base_url, connect_timeout, read_timeout)


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class RawResponse:
    """A response being read off one connection; the body must be consumed for the connection to be reused."""

    def __init__(
        self, conn: _Connection, status: int, headers: dict[str, str], deadline: asyncio.Timeout, idle_s: float
    ) -> None:
        self.status = status
        self.headers = headers
        self._conn = conn
        self._deadline = deadline  # entered by ConnectionPool.post, so it always ends with the request
        self._idle_s = idle_s
        self.complete = False  # body read to its end: the connection may be reused

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        """The body as it arrives; the read timeout is the longest silence, not the total time.

        Moving the deadline on every chunk would cancel and re-arm a timer each time (a tenth of the
        client's CPU at ~20 chunks a turn); it is moved only when it is nearer than the read timeout, and
        then a little past it, so the silence allowed is between the read timeout and that plus
        :func:`_slack` (the request starts with that much too, so a quick reply never moves it at all).
        """
        reader = self._conn.reader
        loop = asyncio.get_running_loop()
        deadline, idle_s = self._deadline, self._idle_s
        slack = _slack(idle_s)

        def extend() -> None:
            now = loop.time()
            when = deadline.when()
            if when is None or when < now + idle_s:
                deadline.reschedule(now + idle_s + slack)

        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0], 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass  # trailers
                    break
                data = await reader.readexactly(size + 2)
                extend()
                yield data[:-2]
        elif "content-length" in self.headers:
            remaining = int(self.headers["content-length"])
            while remaining:
                data = await reader.read(min(remaining, 1 << 16))
                if not data:
                    raise asyncio.IncompleteReadError(b"", remaining)
                remaining -= len(data)
                extend()
                yield data
        else:  # delimited by the server closing the connection
            self.headers["connection"] = "close"
            while data := await reader.read(1 << 16):
                extend()
                yield data
        self.complete = True

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_bytes()])


def _slack(idle_s: float) -> float:
    """How far past the read timeout a silence may last before it counts (see ``RawResponse.iter_bytes``)."""
    return min(1.0, idle_s / 10)


class ConnectionPool:
    def __init__(self, base_url: str, connect_timeout: float, read_timeout: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url}")
        self.host = parts.hostname
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        default_port = self.port == (443 if self.tls else 80)
        self.host_header = self.host if default_port else f"{self.host}:{self.port}"
        self.prefix = parts.path.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: deque[_Connection] = deque()
        self._ssl: ssl.SSLContext | None = None

    async def _connect(self) -> _Connection:
        if self.tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        async with asyncio.timeout(self.connect_timeout):
            reader, writer = await asyncio.open_connection(
                self.host,
                self.port,
                ssl=self._ssl if self.tls else None,
                server_hostname=self.host if self.tls else None,
                limit=_MAX_LINE,
            )
        return _Connection(reader, writer)

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> Any:
        return self._request("POST", path, body, headers)

    def get(self, path: str, headers: dict[str, str]) -> Any:
        return self._request("GET", path, b"", headers)

    @asynccontextmanager
    async def _request(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> AsyncIterator[RawResponse]:
        head = [f"{method} {self.prefix}{path} HTTP/1.1", f"Host: {self.host_header}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        async with asyncio.timeout(self.read_timeout + _slack(self.read_timeout)) as deadline:
            response = await self._send(request, deadline)
            try:
                yield response
            finally:
                reusable = response.complete and response.headers.get("connection", "").lower() != "close"
                if reusable:
                    self._idle.append(response._conn)
                else:
                    response._conn.close()

    async def _send(self, request: bytes, deadline: asyncio.Timeout) -> RawResponse:
        """Write the request and read the response head; a stale idle connection is retried once."""
        while True:
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else await self._connect()
            try:
                conn.writer.write(request)
                head = await conn.reader.readuntil(b"\r\n\r\n")
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                conn.close()
                if reused and not getattr(exc, "partial", b""):
                    continue  # the server closed it while idle: not an error, try another
                raise ConnectionError(f"connection to {self.host_header} lost ({type(exc).__name__})") from exc
            except BaseException:
                conn.close()
                raise
            lines = head.decode("latin-1").split("\r\n")
            try:
                status = int(lines[0].split(" ", 2)[1])
            except (IndexError, ValueError) as exc:
                conn.close()
                raise ConnectionError(f"malformed HTTP status line from {self.host_header}") from exc
            headers = {}
            for line in lines[1:]:
                key, sep, value = line.partition(":")
                if sep:
                    headers[key.strip().lower()] = value.strip()
            return RawResponse(conn, status, headers, deadline, self.read_timeout)

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()


class HttpxPool:
    """The same interface over httpx, for URLs that must go through a proxy."""

    def __init__(self, base_url: str, connect_timeout: float, read_timeout: float) -> None:
        import httpx

        self.prefix = base_url.rstrip("/")
        self._httpx = httpx
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(read_timeout, connect=connect_timeout, pool=None))

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> Any:
        return self._request("POST", path, body, headers)

    def get(self, path: str, headers: dict[str, str]) -> Any:
        return self._request("GET", path, b"", headers)

    @asynccontextmanager
    async def _request(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> AsyncIterator[Response]:
        httpx = self._httpx
        try:
            async with self._client.stream(method, self.prefix + path, content=body, headers=headers) as resp:
                yield _HttpxResponse(resp)
        except httpx.TimeoutException as exc:
            raise TimeoutError(str(exc)) from exc
        except httpx.TransportError as exc:
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        await self._client.aclose()


class _HttpxResponse:
    def __init__(self, resp: Any) -> None:
        self._resp = resp
        self.status: int = resp.status_code
        self.headers: dict[str, str] = {k.lower(): v for k, v in resp.headers.items()}

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        async for chunk in self._resp.aiter_bytes():
            yield chunk

    async def read(self) -> bytes:
        return bytes(await self._resp.aread())
