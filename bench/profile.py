"""Where the daemon's added time and CPU go: ``.venv/bin/python -m bench.profile``.

Two measurements, each against a fresh fake upstream and daemon, with the 100 KB body:

1. **Steps before the upstream send**, from ``bench.instrumented_daemon`` (timestamps around
   ccgate's own functions, ccgate unchanged): receiving the body, parsing it, admission, the
   pending row's commit wait, building the upstream request, and the upstream's answer, per
   request, for non-streaming and streaming requests sent one at a time.
2. **A py-spy profile** of an unmodified daemon (py-spy is in the ``dev`` extra) under
   sequential non-streaming requests and then under 4 concurrent streams: the functions the
   samples end in (self time) and a breakdown by component (the first frame from the leaf up
   that falls into a known component).

Prints markdown (pasted into docs/benchmarks.md) and writes bench/results/profile.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import linecache
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import measure, report
from bench.measure import Target
from bench.processes import (
    REPO,
    BenchError,
    ccgate_daemon,
    client_key,
    fake_upstream,
    isolated_env,
)
from bench.workload import claude_code_headers, request_body

DEFAULT_JSON = REPO / "bench" / "results" / "profile.json"
STEPS = (
    ("receive body", "arrive", "body_read"),
    ("parse JSON", "parse_start", "parsed"),
    ("admission", "parsed", "admitted"),
    ("to pending row", "admitted", "record_start"),
    ("commit wait", "record_start", "committed"),
    ("build upstream request", "committed", "send"),
    ("upstream answers (headers)", "send", "upstream_headers"),
)
# Components, checked from the leaf frame upward; the first that matches takes the sample.
COMPONENTS = (
    ("sqlite (ledger writer)", re.compile(r"sqlite3|ledger\.py")),
    ("JSON", re.compile(r"\bjson[/\\]|json\.py|\(json")),
    ("metering", re.compile(r"metering\.py")),
    ("h11 (HTTP/1.1 parsing, server and client)", re.compile(r"h11[/\\]")),
    ("httpcore/httpx (upstream client)", re.compile(r"httpcore[/\\]|httpx[/\\]")),
    ("uvicorn (server)", re.compile(r"uvicorn[/\\]")),
    ("starlette", re.compile(r"starlette[/\\]")),
    ("ccgate proxy", re.compile(r"ccgate[/\\]gateway[/\\]proxy\.py")),
    ("ccgate relay", re.compile(r"ccgate[/\\]gateway[/\\]relay\.py")),
    ("ccgate upstream transport (httptools)", re.compile(r"ccgate[/\\]gateway[/\\]_upstream\.py")),
    ("anyio", re.compile(r"anyio[/\\]")),
    ("asyncio (loop, sockets)", re.compile(r"asyncio[/\\]|selectors\.py|socket\.py")),
    ("threading (hand-off)", re.compile(r"threading\.py|queue\.py")),
)


def _headers(env: dict[str, str]) -> dict[str, str]:
    return claude_code_headers(token=client_key(env), session_id=str(uuid.uuid4()))


def steps(requests: int) -> dict[str, Any]:
    """Per-step medians and p99s (ms) from the instrumented daemon."""
    with tempfile.TemporaryDirectory(prefix="ccgate-bench-profile-") as tmp:
        work = Path(tmp)
        env = isolated_env(work)
        timings = work / "timings.json"
        env["CCGATE_BENCH_TIMINGS"] = str(timings)
        with (
            fake_upstream(env=env, work=work) as upstream,
            ccgate_daemon(
                upstream_url=upstream.url, env=env, work=work, module="bench.instrumented_daemon"
            ) as daemon,
            measure.sync_client() as client,
        ):
            target = Target("ccgate", daemon.url, _headers(env))
            bodies = {True: request_body(stream=True), False: request_body(stream=False)}
            for _ in range(10):
                measure.stream_once(client, target, bodies[True])
                measure.json_once(client, target, bodies[False])
            for _ in range(requests):
                measure.json_once(client, target, bodies[False])
                measure.stream_once(client, target, bodies[True])
        lines = [json.loads(x) for x in timings.read_text(encoding="utf-8").splitlines()]
    missing: list[str] = next((x["missing"] for x in lines if "missing" in x), [])
    rows = [x["request"] for x in lines if "request" in x][20:]  # after the warm-up
    out: dict[str, Any] = {"missing_hooks": missing, "requests": len(rows)}
    for stream in (False, True):
        chosen = [r for r in rows if r.get("stream") is stream]
        table: dict[str, dict[str, float]] = {}
        for label, start, end in (*STEPS, ("arrival to upstream send", "arrive", "send")):
            values = [(r[end] - r[start]) * 1000 for r in chosen if start in r and end in r]
            if values:
                table[label] = {
                    "p50": round(report.percentile(values, 0.5), 3),
                    "p99": round(report.percentile(values, 0.99), 3),
                }
        out["streaming" if stream else "non_streaming"] = table
    return out


def _spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise BenchError("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


def _profile_under(load: Callable[[Target, float], None], seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ccgate-bench-spy-") as tmp:
        work = Path(tmp)
        env = isolated_env(work)
        out = work / "profile.txt"
        with (
            fake_upstream(env=env, work=work) as upstream,
            ccgate_daemon(upstream_url=upstream.url, env=env, work=work) as daemon,
        ):
            target = Target("ccgate", daemon.url, _headers(env))
            load(target, 1.0)  # warm up before sampling
            spy = subprocess.Popen(
                [
                    _spy(),
                    "record",
                    "--pid",
                    str(daemon.pid),
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--duration",
                    str(int(seconds)),
                    "--output",
                    str(out),
                    "--full-filenames",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            time.sleep(0.5)
            load(target, seconds)
            _, err = spy.communicate(timeout=seconds + 60)
            if spy.returncode != 0 or not out.exists():
                raise BenchError(f"py-spy failed: {err.decode(errors='replace')[-1000:]}")
        return _summarise(out.read_text(encoding="utf-8"))


_FRAME = re.compile(r"^(?P<function>.*) \((?P<path>.*):(?P<line>\d+)\)$")
_WAITING = re.compile(r"\bqueue\.get\(|\.wait\(|\.select\(|\.poll\(")
_UVLOOP_RUN = re.compile(r"^Runner\.run \(.*asyncio[/\\]runners\.py:\d+\)$")


def _is_waiting(frame: str) -> bool:
    """A thread blocked in a wait (an idle event loop, the ledger writer's empty queue).

    py-spy counts a thread waiting in C with the GIL released as active, so these samples are
    set apart: they are time with nothing to do, not cost.
    """
    match = _FRAME.match(frame)
    if match is None:
        return False
    source = linecache.getline(match["path"], int(match["line"]))
    return bool(_WAITING.search(source))


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["path"]
    for marker in ("site-packages/", "/src/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    if path.startswith(".") and "/" in path:
        path = path.split("/", 1)[1]
    return f"{match['function']} ({path}:{match['line']})"


def _summarise(collapsed: str) -> dict[str, Any]:
    leaves: collections.Counter[str] = collections.Counter()
    components: collections.Counter[str] = collections.Counter()
    total = waiting = in_loop = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if _is_waiting(frames[-1]):
            waiting += count
            continue
        if _UVLOOP_RUN.search(frames[-1]):
            # Under uvloop the loop itself is C: its socket I/O and its idle wait both end in
            # Runner.run and cannot be told apart, so they are counted aside, not as busy.
            in_loop += count
            continue
        total += count
        leaves[_short(frames[-1])] += count  # with its line: which statement of the function
        for frame in reversed(frames):
            name = next((n for n, pattern in COMPONENTS if pattern.search(frame)), None)
            if name is not None:
                components[name] += count
                break
        else:
            components["other"] += count
    total = max(total, 1)
    return {
        "samples": total,
        "waiting_samples": waiting,
        "uvloop_samples": in_loop,
        "top_self": [(f, round(c / total * 100, 1)) for f, c in leaves.most_common(15)],
        "components": [(n, round(c / total * 100, 1)) for n, c in components.most_common()],
    }


def _json_load(target: Target, seconds: float) -> None:
    body = request_body(stream=False)
    deadline = time.monotonic() + seconds
    with measure.sync_client() as client:
        while time.monotonic() < deadline:
            measure.json_once(client, target, body)


def _stream_load(target: Target, seconds: float) -> None:
    body = request_body(stream=True)
    deadline = time.monotonic() + seconds

    def worker() -> None:
        with measure.sync_client() as client:
            while time.monotonic() < deadline:
                measure.stream_once(client, target, body)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def render(result: dict[str, Any]) -> str:
    lines = [f"## Steps before the upstream send ({result['steps']['requests']} requests)", ""]
    lines += [
        "| step (ms) | non-streaming p50 | p99 | streaming p50 | p99 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    ns, st = result["steps"]["non_streaming"], result["steps"]["streaming"]
    for label in [s[0] for s in STEPS] + ["arrival to upstream send"]:
        a, b = ns.get(label), st.get(label)
        cells = [f"{x['p50']:.3f} | {x['p99']:.3f}" if x else "n/a | n/a" for x in (a, b)]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    if result["steps"]["missing_hooks"]:
        lines.append(f"\nHooks not found: {result['steps']['missing_hooks']}")
    for name in ("non_streaming", "streaming"):
        spy = result.get("py_spy", {}).get(name)
        if not spy:
            continue
        lines += [
            "",
            f"## py-spy, {name.replace('_', '-')} load ({spy['samples']} busy samples; "
            f"{spy['waiting_samples']} idle-wait samples and {spy.get('uvloop_samples', 0)} "
            "in uvloop's C loop (its I/O and idle wait, not separable) left out)",
            "",
        ]
        lines += ["| component | share of samples |", "| --- | ---: |"]
        lines += [f"| {n} | {p:.1f}% |" for n, p in spy["components"]]
        lines += ["", "| function (self time) | share |", "| --- | ---: |"]
        lines += [f"| `{f}` | {p:.1f}% |" for f, p in spy["top_self"]]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--requests", type=int, default=300, help="per kind, for the steps")
    parser.add_argument("--seconds", type=float, default=15.0, help="py-spy time per load")
    parser.add_argument("--no-spy", action="store_true", help="only the step timings")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    try:
        result: dict[str, Any] = {"steps": steps(args.requests)}
        if not args.no_spy:
            result["py_spy"] = {
                "non_streaming": _profile_under(_json_load, args.seconds),
                "streaming": _profile_under(_stream_load, args.seconds),
            }
    except BenchError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
