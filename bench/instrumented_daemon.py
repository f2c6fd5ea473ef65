"""``ccgate daemon`` with timestamps at each step before a request goes upstream (bench only).

``python -m bench.instrumented_daemon daemon --port P --upstream URL`` runs the real daemon after
wrapping a few of its functions, from outside (ccgate's code is not changed): for every
``POST /v1/messages`` it notes the time when the ASGI app is called (headers parsed), the body has
been read, the body is parsed (``json.loads``), admission has answered, the pending row is handed
to the ledger, its commit has been made on the spot or awaited, the upstream request is built
(it is sent next), and the upstream's response headers are in. As each request ends it appends
them, one JSON line per request, to the file named by ``CCGATE_BENCH_TIMINGS``.
``bench.profile`` reads that file.

The wrapped names are ccgate internals and may move; a hook whose target is gone is reported
in the file's ``missing`` list and its step is simply absent, so the run still works.
"""

from __future__ import annotations

import contextvars
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

_CURRENT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "ccgate_bench_stamps", default=None
)
_MISSING: list[str] = []


def _stamp(name: str) -> None:
    current = _CURRENT.get()
    if current is not None and name not in current:
        current[name] = time.perf_counter()


def _wrap_async(owner: Any, attribute: str, *, before: str | None, after: str | None) -> None:
    original = getattr(owner, attribute, None)
    if original is None:
        _MISSING.append(f"{getattr(owner, '__name__', owner)}.{attribute}")
        return

    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before:
            _stamp(before)
        result = await original(*args, **kwargs)
        if after:
            _stamp(after)
        return result

    setattr(owner, attribute, wrapper)


def _wrap_sync(owner: Any, attribute: str, *, before: str | None, after: str | None) -> None:
    original = getattr(owner, attribute, None)
    if original is None:
        _MISSING.append(f"{getattr(owner, '__name__', owner)}.{attribute}")
        return

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before:
            _stamp(before)
        result = original(*args, **kwargs)
        if after:
            _stamp(after)
        return result

    setattr(owner, attribute, wrapper)


def _wrap_commit_start(owner: Any) -> None:
    """The pending row committed on the loop (``Ledger.commit_start``): its commit is done when
    it returns True; when it returns False the row was queued and ``committed`` stamps it."""
    original = getattr(owner, "commit_start", None)
    if original is None:
        _MISSING.append(f"{owner.__name__}.commit_start")
        return

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _stamp("record_start")
        done = original(*args, **kwargs)
        if done:
            _stamp("committed")
        return done

    owner.commit_start = wrapper


def _timed_parse(real: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """Stands in for ``parse_body`` inside ccgate.gateway.proxy: stamps the body's parse."""

    def parse_body(body: bytes) -> Any:
        current = _CURRENT.get()
        if current is not None and "parse_start" not in current:
            current["parse_start"] = time.perf_counter()
            value = real(body)
            current["parsed"] = time.perf_counter()
            if isinstance(value, dict):
                current["stream"] = value.get("stream") is True
            return value
        return real(body)

    return parse_body


def install() -> None:
    from ccgate.gateway import policy, proxy, relay
    from ccgate.store import ledger

    guard = proxy._GuardMiddleware
    original_call: Callable[..., Any] = guard.__call__

    async def call(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("path") != "/v1/messages":
            await original_call(self, scope, receive, send)
            return
        stamps: dict[str, Any] = {"arrive": time.perf_counter()}
        token = _CURRENT.set(stamps)
        try:
            await original_call(self, scope, receive, send)
        finally:
            stamps["end"] = time.perf_counter()
            _CURRENT.reset(token)
            _write({"request": stamps})

    guard.__call__ = call  # type: ignore[method-assign]
    original_direct: Callable[..., Any] | None = getattr(guard, "direct", None)
    if original_direct is not None:  # the server's lean path for POST /v1/messages

        async def direct(self: Any, exchange: Any) -> None:
            assert original_direct is not None
            stamps: dict[str, Any] = {"arrive": time.perf_counter()}
            token = _CURRENT.set(stamps)
            try:
                await original_direct(self, exchange)
            finally:
                stamps["end"] = time.perf_counter()
                _CURRENT.reset(token)
                _write({"request": stamps})

        guard.direct = direct  # type: ignore[method-assign]
    _wrap_async(proxy, "_read_body", before=None, after="body_read")
    vars(proxy)["parse_body"] = _timed_parse(vars(proxy)["parse_body"])
    _wrap_async(policy.LocalPolicy, "admit", before=None, after="admitted")
    _wrap_sync(ledger.Ledger, "record_start", before="record_start", after=None)
    _wrap_async(ledger.Ledger, "committed", before=None, after="committed")
    _wrap_commit_start(ledger.Ledger)
    _wrap_sync(proxy.Gateway, "upstream_request", before=None, after="send")
    if hasattr(proxy.Gateway, "_raw_opener"):  # the lean upstream leg builds its bytes here
        _wrap_sync(proxy.Gateway, "_raw_opener", before=None, after="send")
    _wrap_async(relay.Relay, "_pump", before="upstream_headers", after=None)
    _write({"missing": _MISSING})


def _write(line: dict[str, Any]) -> None:
    """One JSON line per request, appended as it ends (the daemon may not run exit hooks)."""
    path = os.environ.get("CCGATE_BENCH_TIMINGS")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")


def main() -> None:
    install()
    from ccgate.cli import main as ccgate_main

    sys.argv = ["ccgate", *sys.argv[1:]]
    ccgate_main()


if __name__ == "__main__":
    main()
