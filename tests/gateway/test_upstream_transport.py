"""The daemon's upstream transport (gateway/_upstream.py) against a real socket server.

The server is scripted per test: it reads one request at a time and writes exactly the bytes it
is given, with pauses where a test needs them, so framing, coalescing, keep-alive and every way
an answer can break are seen as a client on a real connection sees them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from ccgate.gateway import _upstream
from ccgate.gateway._upstream import HttpToolsTransport

pytestmark = pytest.mark.anyio

Writer = Callable[[asyncio.StreamWriter], Awaitable[None]]


class Script:
    """Answers the n-th request with the n-th writer; counts connections and requests seen."""

    def __init__(self, *writers: Writer) -> None:
        self.writers = list(writers)
        self.connections = 0
        self.requests: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.writers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                await self.writers.pop(0)(writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serving(script: Script) -> AsyncIterator[str]:
    server = await asyncio.start_server(script.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


def write(*parts: bytes, pause: float = 0.0, close: bool = False) -> Writer:
    async def go(writer: asyncio.StreamWriter) -> None:
        for part in parts:
            writer.write(part)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        if close:
            writer.close()

    return go


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nx-a: 1\r\n\r\n%s" % (len(body), body)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=HttpToolsTransport(), timeout=5)


async def test_a_kept_alive_connection_serves_the_next_request() -> None:
    script = Script(write(ok(b"one")), write(ok(b"two")))
    async with serving(script) as url, client() as c:
        first = await c.post(f"{url}/v1/messages?beta=true", content=b'{"a": 1}')
        second = await c.post(f"{url}/v1/messages", content=b"x" * 200_000)
    assert (first.status_code, first.content, first.headers["x-a"]) == (200, b"one", "1")
    assert second.content == b"two"
    assert script.connections == 1
    assert script.requests[0].startswith(b"POST /v1/messages?beta=true HTTP/1.1\r\n")
    assert script.requests[0].endswith(b'\r\n\r\n{"a": 1}')
    assert len(script.requests[1]) > 200_000


async def test_events_that_arrive_together_come_out_as_one_piece_and_none_waits() -> None:
    together = CHUNKED_HEAD + chunk(b"event: a\n\n") + chunk(b"event: b\n\n") + b"0\r\n\r\n"
    script = Script(
        write(together),
        write(CHUNKED_HEAD + chunk(b"first"), chunk(b"second") + b"0\r\n\r\n", pause=0.3),
    )
    async with serving(script) as url, client() as c:
        async with c.stream("POST", url, content=b"{}") as response:
            pieces = [piece async for piece in response.aiter_raw()]
        # The second answer's first chunk arrives 0.3 s before its second: it must not wait.
        async with c.stream("POST", url, content=b"{}") as response:
            stamps = []
            async for piece in response.aiter_raw():
                stamps.append((piece, asyncio.get_running_loop().time()))
    assert pieces == [b"event: a\n\nevent: b\n\n"]
    assert [p for p, _ in stamps] == [b"first", b"second"]
    assert stamps[1][1] - stamps[0][1] > 0.2


async def test_a_body_delimited_by_the_connection_closing_is_read_to_the_end() -> None:
    script = Script(write(b"HTTP/1.1 200 OK\r\n\r\nall of it", close=True))
    async with serving(script) as url, client() as c:
        response = await c.get(url)
    assert response.content == b"all of it"


async def test_no_body_for_204_and_head() -> None:
    script = Script(
        write(b"HTTP/1.1 204 No Content\r\n\r\n"),
        write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"),
        write(ok(b"after")),
    )
    async with serving(script) as url, client() as c:
        assert (await c.get(url)).content == b""
        assert (await c.head(url)).content == b""
        assert (await c.get(url)).content == b"after"
    assert script.connections == 1


async def test_an_interim_answer_is_skipped() -> None:
    script = Script(write(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + ok(b"real")))
    async with serving(script) as url, client() as c:
        response = await c.get(url)
    assert (response.status_code, response.content) == (200, b"real")
    assert "link" not in response.headers


async def test_a_connection_dropped_mid_answer_is_a_protocol_error_and_not_reused() -> None:
    script = Script(
        write(CHUNKED_HEAD + chunk(b"part"), close=True),
        write(ok(b"fresh")),
    )
    async with serving(script) as url, client() as c:
        async with c.stream("GET", url) as response:
            seen = []
            with pytest.raises(httpx.RemoteProtocolError):
                async for piece in response.aiter_raw():
                    seen.append(piece)
        assert seen == [b"part"]
        assert (await c.get(url)).content == b"fresh"
    assert script.connections == 2


async def test_an_answer_abandoned_half_way_closes_its_connection() -> None:
    script = Script(write(CHUNKED_HEAD + chunk(b"a"), chunk(b"b") + b"0\r\n\r\n", pause=0.2))
    script.writers.append(write(ok(b"next")))
    async with serving(script) as url, client() as c:
        async with c.stream("GET", url) as response:
            async for _ in response.aiter_raw():
                break
        assert (await c.get(url)).content == b"next"
    assert script.connections == 2  # the half-read answer never leaks into the next request


async def test_garbage_is_a_protocol_error() -> None:
    script = Script(write(b"SPDY/9 what\r\n\r\n"))
    async with serving(script) as url, client() as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get(url)


async def test_no_answer_before_the_close_is_a_protocol_error() -> None:
    script = Script(write(b"", close=True))
    async with serving(script) as url, client() as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get(url)


async def test_timeouts_and_refusals_are_httpx_errors() -> None:
    script = Script(write(CHUNKED_HEAD, chunk(b"late"), pause=1.0))
    async with serving(script) as url:
        async with httpx.AsyncClient(transport=HttpToolsTransport(), timeout=0.3) as c:
            async with c.stream("GET", url) as response:
                with pytest.raises(httpx.ReadTimeout):
                    async for _ in response.aiter_raw():
                        pass
    async with serving(Script()) as url:
        pass  # the port is free again
    async with client() as c:
        with pytest.raises(httpx.ConnectError):
            await c.get(url)


def test_a_configured_proxy_leaves_it_to_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    assert isinstance(_upstream.transport(), HttpToolsTransport)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert _upstream.transport() is None


async def test_the_body_reads_its_timeout_when_it_starts_as_httpcore_does() -> None:
    """The relay lowers (or raises) the read timeout once the headers are in: the first-byte
    limit bounds the headers, the idle limit each wait for more of the body."""
    script = Script(write(CHUNKED_HEAD, chunk(b"late"), pause=0.6))
    async with serving(script) as url, client() as c:
        limits: dict[str, float | None] = {"connect": 5, "read": 5, "write": 5, "pool": 5}
        request = c.build_request("POST", url, content=b"{}")
        request.extensions = {**request.extensions, "timeout": limits}
        response = await c.send(request, stream=True)
        limits["read"] = 0.2  # the idle limit, now that the headers are in
        try:
            with pytest.raises(httpx.ReadTimeout):
                async for _ in response.aiter_raw():
                    pass
        finally:
            await response.aclose()


async def test_the_idle_limit_bounds_each_wait_not_the_whole_answer() -> None:
    # Six pieces 0.15 s apart under a 0.5 s idle limit: 0.9 s in all, never 0.5 s of silence.
    parts = [CHUNKED_HEAD] + [chunk(b"piece %d" % n) for n in range(6)] + [b"0\r\n\r\n"]
    script = Script(write(*parts, pause=0.15), write(ok(b"again")))
    async with serving(script) as url:
        async with httpx.AsyncClient(transport=HttpToolsTransport(), timeout=0.5) as c:
            async with c.stream("GET", url) as response:
                body = b"".join([piece async for piece in response.aiter_raw()])
            assert body == b"".join(b"piece %d" % n for n in range(6))
            # The same connection, reused after the slow answer, still times nothing out early.
            assert (await c.get(url)).content == b"again"
    assert script.connections == 1


async def test_open_sends_raw_bytes_and_says_when_the_answer_is_all_out() -> None:
    script = Script(
        write(CHUNKED_HEAD + chunk(b"first"), chunk(b"last") + b"0\r\n\r\n", pause=0.2),
        write(ok(b"second")),
    )
    transport = HttpToolsTransport()
    async with serving(script) as url:
        key, _, host = _upstream.origin(url)
        headers = [(b"Host", host), (b"Content-Length", b"2")]
        limits: dict[str, float | None] = {"connect": 5, "read": 5, "write": 5, "pool": 5}
        raw = _upstream.RawRequest(b"POST", key, b"/v1/messages?beta=true", headers, b"{}")
        response = await transport.open(raw, limits)
        seen = []
        async for piece in response.chunks():
            seen.append((piece, response.finished()))
        await response.aclose()
        assert response.status == 200
        assert (b"transfer-encoding", b"chunked") in response.headers
        assert seen == [(b"first", False), (b"last", True)]
        again = await transport.open(raw, limits)
        assert [piece async for piece in again.chunks()] == [b"second"] and again.finished()
        await again.aclose()
        await transport.aclose()
    assert script.connections == 1  # given back to the pool once the answer was all out
    assert script.requests[0] == (
        b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: "
        + host
        + b"\r\nContent-Length: 2\r\n\r\n{}"
    )


async def test_an_answer_left_half_read_closes_its_connection() -> None:
    script = Script(write(CHUNKED_HEAD + chunk(b"first"), chunk(b"rest") + b"0\r\n\r\n", pause=0.3))
    transport = HttpToolsTransport()
    async with serving(script) as url:
        key, _, host = _upstream.origin(url)
        limits: dict[str, float | None] = {"connect": 5, "read": 5, "write": 5, "pool": 5}
        raw = _upstream.RawRequest(b"GET", key, b"/", [(b"Host", host)], b"")
        response = await transport.open(raw, limits)
        async for _ in response.chunks():
            break
        assert not response.finished()
        await response.aclose()
        assert transport._take_idle(key) is None  # not pooled: its rest would reach the next
        await transport.aclose()
