"""Fault suite for the daemon (issue #10): a real daemon between a real client and the fake
upstream, with the upstream, the client, the disk or the process itself failing.

Every test ends by reading the ledger: each request the client made has exactly one row
(nothing lost, nothing counted twice), none left pending, billed for what the stream stated.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from ccgate import paths as paths_mod
from ccgate.gateway.proxy import MAX_STORED_ERROR_BYTES
from ccgate.store.ledger import Ledger, LedgerRow
from tests.support.fake_upstream import FakeUpstream, Scenario, Usage
from tests.support.harness import Daemon, ccgate, ccgate_json, free_port, run_daemon

pytestmark = pytest.mark.e2e

SONNET = "claude-sonnet-4-6"
DAEMON = [sys.executable, "-m", "ccgate", "daemon"]
LONG_TEXT = " ".join(f"word{i}" for i in range(400))  # about 500 content_block_delta events


def body(*, stream: bool = True) -> dict[str, Any]:
    return {
        "model": SONNET,
        "max_tokens": 1024,
        "stream": stream,
        "messages": [{"role": "user", "content": "hi"}],
    }


def ledger_rows() -> list[LedgerRow]:
    path = paths_mod.resolve().ledger_file
    with Ledger(path, readonly=True) as ledger:
        return ledger.records(newest_first=False)


def wait_rows(ok: Callable[[list[LedgerRow]], bool], timeout: float = 15.0) -> list[LedgerRow]:
    deadline = time.monotonic() + timeout
    rows: list[LedgerRow] = []
    while time.monotonic() < deadline:
        rows = ledger_rows()
        if ok(rows):
            return rows
        time.sleep(0.05)
    raise AssertionError(f"ledger never reached the expected state: {rows}")


def settled(ids: list[str]) -> list[LedgerRow]:
    """The rows of ``ids`` once all are final; asserts each appears exactly once."""
    rows = wait_rows(
        lambda rs: sum(1 for r in rs if r.id in ids and r.outcome != "pending") == len(ids)
    )
    mine = [r for r in rows if r.id in ids]
    assert sorted(r.id for r in mine) == sorted(ids)
    return mine


def stream_deltas(
    daemon: Daemon, *, stop_after: int | None = None, client: httpx.Client | None = None
) -> tuple[str, int, bool]:
    """Stream one request; return (request id, deltas received, whether it ended cleanly)."""
    own = client is None
    client = client or httpx.Client(timeout=30)
    deltas = 0
    request_id = ""
    try:
        with client.stream(
            "POST", f"{daemon.url}/v1/messages", json=body(), headers={"x-api-key": daemon.key}
        ) as response:
            request_id = response.headers["x-ccgate-request-id"]
            for line in response.iter_lines():
                if line == "event: content_block_delta":
                    deltas += 1
                    if stop_after is not None and deltas >= stop_after:
                        return request_id, deltas, False
        return request_id, deltas, True
    except httpx.HTTPError:
        return request_id, deltas, False
    finally:
        if own:
            client.close()


@pytest.fixture
def daemon(fake_upstream: FakeUpstream) -> Iterator[Daemon]:
    with run_daemon(upstream_url=fake_upstream.url) as d:
        yield d


# --------------------------------------------------------------------------- upstream faults


def test_upstream_drop_mid_stream_bills_every_delta_relayed(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(
        Scenario(text=LONG_TEXT, drop_after=60, usage=Usage(input_tokens=3000, output_tokens=900))
    )
    request_id, seen, clean = stream_deltas(daemon)
    assert not clean and seen == 57  # events 0-2 are start, block start and ping
    (row,) = settled([request_id])
    assert row.outcome == "interrupted"
    assert row.input_tokens == 3000
    assert row.output_tokens >= seen
    assert daemon.process.poll() is None


def test_long_pauses_before_the_first_byte_and_between_events_are_not_cut(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    # A long thinking pause is legitimate: ccgate has no read deadline shorter than an hour.
    fake_upstream.enqueue(
        Scenario(
            text="Thinking done.",
            first_byte_delay_s=3.0,
            delay_s=0.6,
            usage=Usage(input_tokens=12, output_tokens=5),
        )
    )
    request_id, seen, clean = stream_deltas(daemon)
    assert clean and seen == 3
    (row,) = settled([request_id])
    assert (row.outcome, row.input_tokens, row.output_tokens) == ("ok", 12, 5)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(
            b"event: message_start\ndata: {not json\n\n\xff\xfe\x00garbage\n\n", id="garbage"
        ),
        pytest.param(
            b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","model":'
            b'"claude-sonnet-4-6","usage":{"input_tokens":700,"output_tokens":1}}}\n\n'
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
            b'"delta":{"type":"text_delta","text":"a"}}\n\n'
            b'event: content_block_delta\ndata: {"type":"content_blo',
            id="truncated",
        ),
    ],
)
def test_garbage_or_truncated_sse_is_relayed_and_accounted(
    daemon: Daemon, fake_upstream: FakeUpstream, raw: bytes
) -> None:
    fake_upstream.enqueue(Scenario(raw_body=raw))
    with httpx.Client(timeout=10) as client:
        response = client.post(
            f"{daemon.url}/v1/messages", json=body(), headers={"x-api-key": daemon.key}
        )
    assert response.content == raw  # passed through unchanged
    (row,) = settled([response.headers["x-ccgate-request-id"]])
    assert row.outcome == "interrupted"
    if b"700" in raw:
        assert (row.input_tokens, row.output_tokens) == (700, 1)
    assert daemon.process.poll() is None


def test_non_json_error_body_is_relayed_and_recorded(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    page = b"<html><body>502 Bad Gateway</body></html>"
    fake_upstream.enqueue(Scenario(status=502, raw_body=page, raw_content_type="text/html"))
    with httpx.Client(timeout=10) as client:
        response = client.post(
            f"{daemon.url}/v1/messages", json=body(stream=False), headers={"x-api-key": daemon.key}
        )
    assert (response.status_code, response.content) == (502, page)
    (row,) = settled([response.headers["x-ccgate-request-id"]])
    assert (row.outcome, row.status, row.error, row.cost_micros) == (
        "upstream_error",
        502,
        "HTTP 502",
        0,
    )


def test_huge_error_body_reaches_the_client_but_the_ledger_keeps_4_kb(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    message = "overloaded " * 500_000  # 5.5 MB
    fake_upstream.enqueue(Scenario(status=529, error_message=message))
    with httpx.Client(timeout=30) as client:
        response = client.post(
            f"{daemon.url}/v1/messages", json=body(stream=False), headers={"x-api-key": daemon.key}
        )
    assert response.status_code == 529
    assert response.json()["error"]["message"] == message
    (row,) = settled([response.headers["x-ccgate-request-id"]])
    assert row.outcome == "upstream_error"
    assert row.error is not None
    assert len(row.error.encode()) < MAX_STORED_ERROR_BYTES + 100
    assert row.error.endswith(
        f"[cut by ccgate: {len(('overloaded_error: ' + message).strip().encode())} bytes in all]"
    )


# --------------------------------------------------------------------------- client faults


def test_client_hang_up_mid_stream_cancels_the_upstream_and_bills_what_was_seen(
    daemon: Daemon, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(
        Scenario(text=LONG_TEXT, delay_s=0.02, usage=Usage(input_tokens=2000, output_tokens=900))
    )
    request_id, seen, clean = stream_deltas(daemon, stop_after=40)
    assert not clean
    fake_upstream.wait_for_disconnects(1, timeout=10)
    (row,) = settled([request_id])
    assert row.outcome == "interrupted"
    assert row.input_tokens == 2000
    assert row.output_tokens >= seen


# --------------------------------------------------------------------------- process faults


def _kill(daemon: Daemon) -> None:
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(timeout=10)


def test_sigkill_late_in_a_stream_bills_the_deltas_already_relayed(
    fake_upstream: FakeUpstream,
) -> None:
    # ~900 deltas, 45 s of stream: it is still running when the test kills the daemon.
    text = " ".join(f"word{i}" for i in range(800))
    fake_upstream.enqueue(
        Scenario(text=text, delay_s=0.05, usage=Usage(input_tokens=1500, output_tokens=2000))
    )
    with run_daemon(upstream_url=fake_upstream.url) as first:
        with (
            httpx.Client(timeout=30) as client,
            client.stream(
                "POST", f"{first.url}/v1/messages", json=body(), headers={"x-api-key": first.key}
            ) as response,
        ):
            request_id = response.headers["x-ccgate-request-id"]
            seen = 0
            lines = response.iter_lines()
            while seen < 120:
                seen += next(lines) == "event: content_block_delta"
            # Still connected (a hang-up would finish the row itself). The checkpoint is a
            # queue put the writer commits: wait for it, then kill.
            wait_rows(lambda rs: any(r.id == request_id and r.output_tokens >= seen for r in rs))
            _kill(first)
    with run_daemon(upstream_url=fake_upstream.url):
        (row,) = settled([request_id])
    assert row.outcome == "interrupted"
    assert row.input_tokens == 1500
    assert row.output_tokens >= seen >= 120
    assert row.cost_micros > 0


def _stream_until_killed(d: Daemon, flowing: threading.Barrier) -> str:
    """One stream that reports in at its 5th delta, then reads until the daemon dies."""
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST", f"{d.url}/v1/messages", json=body(), headers={"x-api-key": d.key}
        ) as response,
    ):
        count = 0
        with contextlib.suppress(httpx.HTTPError):
            for line in response.iter_lines():
                if line == "event: content_block_delta":
                    count += 1
                    if count == 5:
                        flowing.wait(timeout=30)
        return response.headers["x-ccgate-request-id"]


def test_repeated_sigkill_under_20_concurrent_streams_loses_no_request(
    fake_upstream: FakeUpstream,
) -> None:
    fake_upstream.default = Scenario(
        text=LONG_TEXT, delay_s=0.03, usage=Usage(input_tokens=100, output_tokens=900)
    )
    ids: list[str] = []
    rounds, streams = 3, 20
    for _ in range(rounds):
        with run_daemon(upstream_url=fake_upstream.url) as d, ThreadPoolExecutor(streams) as pool:
            flowing = threading.Barrier(streams + 1)
            futures = [pool.submit(_stream_until_killed, d, flowing) for _ in range(streams)]
            flowing.wait(timeout=30)  # every stream is flowing
            _kill(d)
            ids.extend(f.result(timeout=30) for f in futures)
    with run_daemon(upstream_url=fake_upstream.url):
        rows = settled(ids)
    assert len(set(ids)) == rounds * streams
    assert len(fake_upstream.requests) == rounds * streams  # none sent twice
    assert all(r.outcome == "interrupted" for r in rows)
    assert all(r.input_tokens == 100 for r in rows)  # message_start was checkpointed for each
    assert len(ledger_rows()) == rounds * streams


# --------------------------------------------------------------------------- bad input, real daemon


def test_non_ascii_key_deep_json_and_duplicate_keys_get_4xx_and_a_row(daemon: Daemon) -> None:
    url = f"{daemon.url}/v1/messages"
    with httpx.Client(timeout=10) as client:
        odd_key = client.post(
            url, json=body(), headers={b"x-api-key": "sk-cg-\xff\xfe".encode("latin-1")}
        )
        deep = client.post(url, content=b"[" * 100_000, headers={"x-api-key": daemon.key})
        twice = client.post(
            url,
            content=b'{"model": "claude-haiku-4-5", "model": "claude-opus-4-1", "max_tokens": 1}',
            headers={"x-api-key": daemon.key},
        )
    assert odd_key.status_code == 401
    assert deep.status_code == 400 and "nested too deeply" in deep.json()["error"]["message"]
    assert twice.status_code == 400 and "'model' more than once" in twice.json()["error"]["message"]
    rows = wait_rows(lambda rs: len(rs) >= 3)
    assert sorted((r.outcome, r.status) for r in rows) == [
        ("rejected", 400),
        ("rejected", 400),
        ("rejected", 401),
    ]


# --------------------------------------------------------------------------- disk and state


@contextlib.contextmanager
def small_filesystem(where: Path, size: str = "8m") -> Iterator[Path]:
    where.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (a real full filesystem)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def test_full_disk_refuses_with_503_shows_in_status_and_recovers(
    fake_upstream: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with small_filesystem(tmp_path / "small") as fs:
        home = fs / "ccgate"
        monkeypatch.setenv("CCGATE_HOME", str(home))
        with run_daemon(upstream_url=fake_upstream.url) as d, httpx.Client(timeout=30) as client:
            url, headers = f"{d.url}/v1/messages", {"x-api-key": d.key}
            first = client.post(url, json=body(stream=False), headers=headers)
            assert first.status_code == 200
            wait_rows(lambda rs: len(rs) == 1 and rs[0].outcome == "ok")
            filler = _fill(fs)
            refused = [client.post(url, json=body(stream=False), headers=headers) for _ in range(3)]
            assert [r.status_code for r in refused] == [503, 503, 503]
            message = refused[0].json()["error"]["message"]
            assert str(home / "ledger.db") in message and "full" in message
            assert d.key not in message
            # The pending row's commit overlaps the upstream round trip (proxy.py, Relay._relay):
            # the first request after the disk filled went upstream before the commit failed,
            # and its answer was withheld; from then on the ledger is known to be failing and
            # nothing goes upstream unaccounted.
            assert len(fake_upstream.requests) == 2
            status = ccgate_json("status")
            assert status["ledger"]["ok"] is False and "full" in status["ledger"]["error"]
            shown = ccgate("status")
            assert "cannot write" in shown.stdout and "refused (503)" in shown.stdout
            filler.unlink()
            deadline = time.monotonic() + 20
            after = refused[-1]
            while after.status_code == 503 and time.monotonic() < deadline:
                time.sleep(0.2)
                after = client.post(url, json=body(stream=False), headers=headers)
            assert after.status_code == 200
            assert ccgate_json("status")["ledger"]["ok"] is True
            rows = wait_rows(lambda rs: sum(r.outcome != "pending" for r in rs) >= 5)
            ok = [r for r in rows if r.outcome == "ok"]
            refused_rows = [r for r in rows if r.status == 503]
            assert len(ok) == 2 and all(r.output_tokens == 10 for r in ok)
            assert len(refused_rows) >= 3
            # The withheld one is billed its input estimate (the upstream may bill it); the
            # ones refused before sending cost nothing.
            withheld = [r for r in refused_rows if r.outcome == "upstream_error"]
            assert len(withheld) == 1 and withheld[0].cost_micros > 0
            assert withheld[0].price_estimated
            assert all(r.cost_micros == 0 for r in refused_rows if r.outcome == "rejected")
            assert len(fake_upstream.requests) == 3


def test_corrupted_ledger_is_a_clear_error_and_is_left_untouched(
    fake_upstream: FakeUpstream,
) -> None:
    with run_daemon(upstream_url=fake_upstream.url) as d:
        stream_deltas(d)
        wait_rows(lambda rs: len(rs) == 1 and rs[0].outcome == "ok")
    path = paths_mod.resolve().ledger_file
    with contextlib.closing(sqlite3.connect(path)) as db:  # fold the WAL into the file
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    data[0:100] = os.urandom(100)  # the SQLite header
    path.write_bytes(bytes(data))
    env = dict(os.environ, ANTHROPIC_API_KEY="sk-ant-x")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ccgate",
            "daemon",
            "--port",
            str(free_port()),
            "--upstream",
            fake_upstream.url,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "not a readable ccgate ledger" in result.stderr and "Move it aside" in result.stderr
    assert "Traceback" not in result.stderr
    assert path.read_bytes() == bytes(data)  # nothing overwritten: the rows can still be rescued
    usage = subprocess.run(
        [sys.executable, "-m", "ccgate", "usage"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert usage.returncode != 0 and "not a readable ccgate ledger" in usage.stderr


def test_sigterm_commits_every_row_clears_the_runtime_file_and_exits_0(
    fake_upstream: FakeUpstream,
) -> None:
    """uvicorn re-raises SIGTERM after its graceful shutdown; the daemon's own cleanup (the
    writer's last commit, the runtime file) must still run, and the exit is clean."""
    with run_daemon(upstream_url=fake_upstream.url) as d:
        with httpx.Client(timeout=30) as client:
            for stream in (False, True):
                answer = client.post(
                    f"{d.url}/v1/messages", json=body(stream=stream), headers={"x-api-key": d.key}
                )
                assert answer.status_code == 200
        runtime = paths_mod.resolve().runtime_file
        assert runtime.exists()
        d.process.send_signal(signal.SIGTERM)
        assert d.process.wait(timeout=15) == 0
        assert "ccgate stopped" in d.log.read_text()
        assert not runtime.exists()
    rows = Ledger(paths_mod.resolve().ledger_file).records()
    assert [r.outcome for r in rows] == ["ok", "ok"]
