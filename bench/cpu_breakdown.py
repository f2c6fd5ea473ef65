"""Where the daemon's CPU goes, per request and per component: ``python -m bench.cpu_breakdown``.

Runs a fake upstream and ``python -m bench.cpu_breakdown daemon``: the real daemon after
wrapping some of its functions from outside (ccgate's code is not changed), each wrapper adding
the thread CPU time (``time.thread_time_ns``) spent inside the function, minus what nested
wrapped functions took, to its component's total. A coroutine is timed step by step (each
``send`` into it), so its waits count nothing. The garbage collector is timed through
``gc.callbacks``. Then one batch of streams and one of non-streaming 100 KB requests, sent one
at a time; per batch it prints each component's CPU per request on each thread, what no wrapper
covered (``unattributed``: uvloop's own C work, its socket reads, task switching, the code
between the wrapped calls), and each thread's user and system time from ``/proc``.

The wrappers cost CPU themselves (two clock reads, each a system call, and a Python call per
wrapped call), so the instrumented totals are higher than an unwrapped daemon's; ``--plain``
also measures an unwrapped daemon's per-thread CPU for comparison.

    .venv/bin/python -m bench.cpu_breakdown --requests 1000 --plain
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

_NOW = time.thread_time_ns
_TOTALS: dict[tuple[str, str], list[int]] = {}
"""(thread, component) -> [exclusive CPU ns, calls]."""
_LOCAL = threading.local()
_MISSING: list[str] = []


def _thread() -> str:
    return "loop" if threading.current_thread() is threading.main_thread() else "writer"


def _stack() -> list[list[Any]]:
    stack: list[list[Any]] | None = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    return stack


def _enter(label: str) -> None:
    _stack().append([label, _NOW(), 0])


def _leave() -> None:
    now = _NOW()
    stack = _stack()
    label, started, nested = stack.pop()
    spent = now - started
    if stack:
        stack[-1][2] += spent
    cell = _TOTALS.setdefault((_thread(), label), [0, 0])
    cell[0] += spent - nested
    cell[1] += 1


class _TimedCoroutine:
    """A coroutine whose every step (``send``/``throw``) is timed under ``label``."""

    __slots__ = ("_coro", "_label")

    def __init__(self, coro: Any, label: str) -> None:
        self._coro, self._label = coro, label

    def __await__(self) -> _TimedCoroutine:
        return self

    def __iter__(self) -> _TimedCoroutine:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def send(self, value: Any) -> Any:
        _enter(self._label)
        try:
            return self._coro.send(value)
        finally:
            _leave()

    def throw(self, *args: Any) -> Any:
        _enter(self._label)
        try:
            return self._coro.throw(*args)
        finally:
            _leave()

    def close(self) -> None:
        self._coro.close()


def _wrap(owner: Any, attribute: str, label: str) -> None:
    original = vars(owner).get(attribute) if isinstance(owner, type) else getattr(owner, attribute)
    if original is None:
        _MISSING.append(f"{getattr(owner, '__name__', owner)}.{attribute}")
        return
    if isinstance(original, staticmethod | classmethod):
        _MISSING.append(f"{owner.__name__}.{attribute} (static or class method)")
        return
    import inspect

    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return _TimedCoroutine(original(*args, **kwargs), label)

    else:

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            _enter(label)
            try:
                return original(*args, **kwargs)
            finally:
                _leave()

    setattr(owner, attribute, wrapper)


def _gc_callback(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _enter("garbage collector")
    else:
        _leave()


# Component, then what it covers; the first wrapped function of a component that calls another
# gets only its own time (exclusive), so each line is what that code itself costs.
COMPONENTS: tuple[tuple[str, str, str, str], ...] = (
    # (module, owner ("" for a module function), attribute, component)
    ("ccgate.gateway._http", "HttpToolsDeadlineProtocol", "data_received",
     "client request in: llhttp parse, body copies (uvicorn callbacks)"),
    ("uvicorn.protocols.http.httptools_impl", "RequestResponseCycle", "run_asgi",
     "uvicorn's request task (run_asgi, lean)"),
    ("ccgate.gateway.proxy", "_GuardMiddleware", "direct", "guard: refusal checks"),
    ("ccgate.gateway._http", "DirectExchange", "read_body", "body wait and join"),
    ("ccgate.gateway.proxy", "", "parse_body", "body parse (parse_body)"),
    ("ccgate.gateway.proxy", "Gateway", "_admit", "admission (Gateway._admit)"),
    ("ccgate.gateway.proxy", "Gateway", "proxy", "Gateway.proxy: plan, attempts, Relay"),
    ("ccgate.gateway.proxy", "Gateway", "_raw_opener", "upstream request head (_raw_opener)"),
    ("ccgate.gateway.relay", "Relay", "direct", "relay: direct (cancel scope, observation)"),
    ("ccgate.gateway.relay", "Relay", "_relay", "relay: _relay, _attempt, _pump, _push"),
    ("ccgate.gateway.relay", "Relay", "_attempt", "relay: _relay, _attempt, _pump, _push"),
    ("ccgate.gateway.relay", "Relay", "_pump", "relay: _relay, _attempt, _pump, _push"),
    ("ccgate.gateway.relay", "Relay", "_push", "relay: _relay, _attempt, _pump, _push"),
    ("ccgate.gateway.relay", "Relay", "_checkpoint", "relay: checkpoints"),
    ("ccgate.gateway._upstream", "HttpToolsTransport", "open", "upstream: open (pool, timeouts)"),
    ("ccgate.gateway._upstream", "_Connection", "send", "upstream: request write (writev)"),
    ("ccgate.gateway._upstream", "_Connection", "response_head", "upstream: head wait"),
    ("ccgate.gateway._upstream", "_Connection", "push", "upstream: push (per-read wait)"),
    ("ccgate.gateway._upstream", "_Connection", "data_received",
     "upstream read: llhttp parse, hand-on (deliver's own code)"),
    ("ccgate.gateway.proxy", "Gateway", "_ready", "pending row: build and estimate (_ready)"),
    ("ccgate.store.ledger", "Ledger", "commit_start", "pending row: SQLite commit on the loop"),
    ("ccgate.gateway._http", "DirectExchange", "_start", "client: response head build + write"),
    ("ccgate.gateway._http", "DirectExchange", "_write", "client: body writes"),
    ("ccgate.gateway._http", "DirectExchange", "_end", "client: last write, uvicorn's completion"),
    ("ccgate.accounting.metering", "ResponseMeter", "feed", "SSE/JSON meter: feed"),
    ("ccgate.accounting.metering", "ResponseMeter", "result", "SSE/JSON meter: result"),
    ("ccgate.accounting.metering", "ResponseMeter", "peek", "SSE/JSON meter: result"),
    ("ccgate.accounting.billing", "", "charge", "pricing: charge and estimate"),
    ("ccgate.accounting.billing", "", "provisional", "pricing: charge and estimate"),
    ("ccgate.gateway.proxy", "_Finish", "done", "final row: build (_Finish.done, own code)"),
    ("ccgate.gateway.proxy", "_Finish", "progress", "checkpoint row (_Finish.progress)"),
    ("ccgate.store.ledger", "Ledger", "record_finish", "final row: snapshot and queue put"),
    ("ccgate.store.ledger", "", "_apply", "ledger: SQLite statement (_apply)"),
    ("ccgate.store.ledger", "_Writer", "_write", "ledger writer: transaction, wake-ups"),
)  # fmt: skip


def install() -> None:
    import importlib

    for module_name, owner_name, attribute, label in COMPONENTS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            _MISSING.append(module_name)
            continue
        owner = getattr(module, owner_name, None) if owner_name else module
        if owner is None:
            _MISSING.append(f"{module_name}.{owner_name}")
            continue
        _wrap(owner, attribute, label)
    gc.callbacks.append(_gc_callback)
    signal.signal(signal.SIGUSR1, _dump)


def _dump(signum: int, frame: Any) -> None:
    path = os.environ["CCGATE_BENCH_BREAKDOWN"]
    totals = [[t, label, ns, n] for (t, label), (ns, n) in _TOTALS.items()]
    data: dict[str, Any] = {"totals": totals, "missing": _MISSING}
    Path(path + ".tmp").write_text(json.dumps(data), encoding="utf-8")
    os.replace(path + ".tmp", path)


def _daemon_main() -> None:
    install()
    from ccgate.cli import main as ccgate_main

    sys.argv = ["ccgate", *sys.argv[1:]]
    ccgate_main()


# --- the driver -------------------------------------------------------------------------------


def _threads(pid: int) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        name = "loop" if task.name == str(pid) else "writer"
        user, system = out.get(name, (0, 0))
        out[name] = (user + int(fields[11]), system + int(fields[12]))
    return out


def _snapshot(pid: int, path: Path) -> dict[tuple[str, str], tuple[int, int]]:
    before = path.stat().st_mtime_ns if path.exists() else 0
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_mtime_ns != before:
            break
        time.sleep(0.01)
    data = json.loads(path.read_text(encoding="utf-8"))
    if data["missing"]:
        print(f"(not wrapped: {data['missing']})")
    return {(t, label): (ns, n) for t, label, ns, n in data["totals"]}


@contextlib.contextmanager
def _stack_of(src: Path, module: str) -> Iterator[tuple[Any, Any, dict[str, str], Path]]:
    from bench.processes import REPO, ccgate_daemon, fake_upstream, isolated_env

    with tempfile.TemporaryDirectory(prefix="ccgate-cpu-") as tmp, contextlib.ExitStack() as st:
        work = Path(tmp)
        (work / "u").mkdir()
        (work / "d").mkdir()
        upstream = st.enter_context(fake_upstream(env=isolated_env(work / "u"), work=work / "u"))
        env = isolated_env(work / "d")
        env["PYTHONPATH"] = f"{src}{os.pathsep}{REPO}"
        out = work / "breakdown.json"
        env["CCGATE_BENCH_BREAKDOWN"] = str(out)
        daemon = st.enter_context(
            ccgate_daemon(upstream_url=upstream.url, env=env, work=work / "d", module=module)
        )
        yield upstream, daemon, env, out


def _batches(
    daemon: Any, env: dict[str, str], requests: int, between: Callable[[str], None]
) -> dict[str, dict[str, tuple[int, int]]]:
    import httpx

    from bench import measure
    from bench.measure import Target
    from bench.processes import client_key
    from bench.workload import claude_code_headers, request_body

    headers = claude_code_headers(token=client_key(env), session_id="breakdown")
    target = Target("ccgate", daemon.url, headers)
    pid = daemon.process.pid
    cpu: dict[str, dict[str, tuple[int, int]]] = {}
    for kind, once in (("stream", measure.stream_once), ("non-streaming", measure.json_once)):
        body = request_body(stream=kind == "stream")
        with httpx.Client(trust_env=False, timeout=60) as client:
            for _ in range(30):
                once(client, target, body)
            time.sleep(0.3)  # the writer's last rows
            between(f"{kind}:before")
            start = _threads(pid)
            for _ in range(requests):
                once(client, target, body)
            time.sleep(0.3)
            end = _threads(pid)
            between(f"{kind}:after")
        cpu[kind] = {t: (end[t][0] - start[t][0], end[t][1] - start[t][1]) for t in end}
    return cpu


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["daemon"]:
        _daemon_main()
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_breakdown", description=__doc__)
    parser.add_argument("--requests", type=int, default=600, help="per kind")
    parser.add_argument("--src", type=Path, default=Path(__file__).parent.parent / "src")
    parser.add_argument("--plain", action="store_true", help="also an unwrapped daemon's CPU")
    args = parser.parse_args(argv)
    tick = os.sysconf("SC_CLK_TCK")
    n: int = args.requests

    def per(ticks: int) -> float:
        return ticks * 1000 / tick / n

    if args.plain:
        with _stack_of(args.src.resolve(), "ccgate") as (_, daemon, env, _out):
            plain = _batches(daemon, env, n, lambda _: None)
    snaps: dict[str, dict[tuple[str, str], tuple[int, int]]] = {}
    with _stack_of(args.src.resolve(), "bench.cpu_breakdown") as (_, daemon, env, out):
        pid = daemon.process.pid
        cpu = _batches(daemon, env, n, lambda name: snaps.__setitem__(name, _snapshot(pid, out)))
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"{n} requests of each kind, sent one at a time; load average {load}\n")
    for kind in ("stream", "non-streaming"):
        before, after = snaps[f"{kind}:before"], snaps[f"{kind}:after"]
        print(f"### {kind}: CPU µs per request, by component\n")
        print("| thread | component | µs / request | calls / request |")
        print("| --- | --- | ---: | ---: |")
        for thread in ("loop", "writer"):
            user, system = cpu[kind].get(thread, (0, 0))
            total_us = per(user + system) * 1000
            rows = []
            for key, (ns, calls) in after.items():
                if key[0] != thread:
                    continue
                was_ns, was_calls = before.get(key, (0, 0))
                rows.append((key[1], (ns - was_ns) / 1000 / n, (calls - was_calls) / n))
            rows.sort(key=lambda row: -row[1])
            covered = sum(row[1] for row in rows)
            for label, us, per_call in rows:
                if us >= 0.5:
                    print(f"| {thread} | {label} | {us:.1f} | {per_call:.1f} |")
            print(
                f"| {thread} | unattributed (uvloop's C loop, reads, task steps, between) "
                f"| {total_us - covered:.1f} | |"
            )
            print(
                f"| {thread} | **total (/proc: user {per(user) * 1000:.0f} + system "
                f"{per(system) * 1000:.0f})** | **{total_us:.0f}** | |"
            )
            if args.plain:
                pu, ps = plain[kind].get(thread, (0, 0))
                print(
                    f"| {thread} | unwrapped daemon, same batch (user {per(pu) * 1000:.0f} + "
                    f"system {per(ps) * 1000:.0f}) | {per(pu + ps) * 1000:.0f} | |"
                )
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
