"""Shared budgets across machines, outages and kills: real server, real daemons, real SIGKILL.

Each "machine" is its own HOME and CCGATE_HOME with its own daemon; they share one server and
one team budget.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_upstream import FakeUpstream, Scenario, Usage
from tests.support.harness import (
    Server,
    ccgate,
    free_port,
    kill_pidfile_daemon,
    run_server,
)

pytestmark = pytest.mark.e2e

BODY = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 256,
    "messages": [{"role": "user", "content": "hi"}],
}
# What the fake upstream reports for each answer below, and what Sonnet charges for it.
USAGE = Usage(input_tokens=1000, output_tokens=100)
COST = 1000 * 3 + 100 * 15


@dataclass
class Machine:
    home: Path
    env: dict[str, str]
    key: str = ""
    port: int = 0

    def ccgate(self, *args: str) -> Any:
        return ccgate(*args, env=self.env)

    def json(self, *args: str) -> Any:
        result = ccgate(*args, "--json", env=self.env)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def post(self, body: dict[str, Any] = BODY, timeout: float = 20) -> httpx.Response:
        return httpx.post(
            f"http://127.0.0.1:{self.port}/v1/messages",
            json=body,
            headers={"x-api-key": self.key},
            timeout=timeout,
        )

    def login_and_up(self, server: Server) -> None:
        result = self.ccgate(
            "login", "--server", server.url, "--key", self.key, "--fingerprint", server.fingerprint
        )
        assert result.returncode == 0, result.stderr
        self.up()

    def up(self) -> None:
        self.port = self.port or free_port()
        result = self.ccgate("up", "--port", str(self.port))
        assert result.returncode == 0, result.stderr


def machine(tmp_path: Path, name: str) -> Machine:
    home = tmp_path / name
    (home / "home").mkdir(parents=True)
    env = dict(os.environ, HOME=str(home / "home"), CCGATE_HOME=str(home / "ccgate"))
    return Machine(home=home, env=env)


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[list[Machine]]:
    made = [machine(tmp_path, "laptop-a"), machine(tmp_path, "laptop-b")]
    yield made
    for m in made:
        m.ccgate("down")
        kill_pidfile_daemon(Path(m.env["CCGATE_HOME"]))


def test_two_daemons_share_a_team_budget_within_one_request_each(
    tmp_path: Path, machines: list[Machine], fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Scenario(usage=USAGE)
    with run_server(tmp_path / "server") as server:
        server.add_provider(fake_upstream.url)
        server.admin_json("teams", "create", "platform", "--budget", "0.05", "--period", "1d")
        for m, name in zip(machines, ("ann", "ben"), strict=True):
            m.key = server.admin_json("keys", "create", name, "--team", "platform")["key"]
            m.login_and_up(server)
        served = refused = 0
        for turn in range(60):
            response = machines[turn % 2].post()
            if response.status_code == 200:
                served += 1
            else:
                assert response.status_code == 402, response.text
                assert response.json()["error"]["type"] == "billing_error"
                refused += 1
            if refused >= 6:
                break
        assert served >= 5 and refused >= 6
        for m in machines:
            assert "pushed" in m.json("sync")["usage"]
        totals = server.admin_json("usage", "--by", "team")["totals"]
        assert totals["cost_micros"] == served * COST
        # Within the budget plus at most one request in flight per daemon.
        assert totals["cost_micros"] <= 50_000 + 2 * COST
        assert len(fake_upstream.requests) == served
        status = machines[0].json("status")
        (team,) = [b for b in status["server"]["budgets"] if b["kind"] == "team"]
        assert team["limit_micros"] == 50_000
        assert team["spent_micros"] == totals["cost_micros"]
        assert status["server"]["unsynced"] == 0
        assert status["server"]["last_sync"] is not None
        table = machines[0].ccgate("status")
        assert "budget team" in table.stdout
        from ccgate.cli.render import usd

        spent_text = usd(totals["cost_micros"] / 1_000_000)
        assert f"platform: {spent_text} spent of $0.05" in table.stdout


def test_a_killed_daemon_loses_nothing_and_counts_nothing_twice(
    tmp_path: Path, machines: list[Machine], fake_upstream: FakeUpstream
) -> None:
    laptop = machines[0]
    fake_upstream.default = Scenario(usage=USAGE)
    server_port = free_port()
    with run_server(tmp_path / "server", port=server_port) as server:
        server.add_provider(fake_upstream.url)
        server.admin_json("teams", "create", "platform", "--budget", "10", "--period", "1M")
        laptop.key = server.admin_json("keys", "create", "cat", "--team", "platform")["key"]
        laptop.login_and_up(server)
        assert laptop.post().status_code == 200  # takes a lease while the server is up
    first = server

    # The server is away: the daemon keeps serving from its lease.
    for _ in range(3):
        assert laptop.post().status_code == 200
    # A slow stream, and the daemon is killed in the middle of it.
    fake_upstream.enqueue(
        Scenario(usage=Usage(input_tokens=7777, output_tokens=5), delay_s=0.3, text="x" * 120)
    )
    pid = laptop.json("status")["pid"]
    assert isinstance(pid, int)
    with (
        httpx.Client(timeout=20) as client,
        client.stream(
            "POST",
            f"http://127.0.0.1:{laptop.port}/v1/messages",
            json={**BODY, "stream": True},
            headers={"x-api-key": laptop.key},
        ) as stream,
    ):
        for _chunk in stream.iter_raw():
            break  # message_start has arrived
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    laptop.up()  # restarts it; the killed request is finalised as interrupted
    logs = laptop.json("logs", "--limit", "50")
    killed = [r for r in logs if r["outcome"] == "interrupted"]
    assert len(killed) == 1
    assert killed[0]["input_tokens"] == 7777  # billed for what was seen before the kill
    assert laptop.post().status_code == 200  # still offline, still serving
    local = [r for r in laptop.json("logs", "--limit", "50") if r["path"] == "/v1/messages"]

    with run_server(tmp_path / "server", port=server_port, reuse=first) as server:
        assert "pushed" in laptop.json("sync")["usage"]
        totals = server.admin_json("usage", "--by", "key")["totals"]
        assert totals["requests"] == len(local)
        assert totals["input_tokens"] == sum(r["input_tokens"] for r in local)
        assert totals["cost_micros"] == sum(r["cost_micros"] for r in local)
        again = laptop.json("sync")
        assert "pushed 0" in again["usage"]
        assert server.admin_json("usage", "--by", "key")["totals"] == totals
        assert laptop.json("status")["server"]["unsynced"] == 0


def test_a_big_request_can_use_the_money_this_machine_holds_idle(
    tmp_path: Path, machines: list[Machine], fake_upstream: FakeUpstream
) -> None:
    laptop = machines[0]
    fake_upstream.default = Scenario(usage=USAGE)
    with run_server(tmp_path / "server") as server:
        server.add_provider(fake_upstream.url)
        laptop.key = server.admin_json("keys", "create", "dan", "--budget", "1", "--period", "1d")[
            "key"
        ]
        laptop.login_and_up(server)
        assert laptop.post().status_code == 200  # takes a $0.10 lease
        # 64,000 output tokens of Sonnet may cost $0.96: more than the $1 left minus the lease
        # this machine holds, unless the daemon hands that idle lease back first.
        big = laptop.post({**BODY, "max_tokens": 64_000})
        assert big.status_code == 200, big.text
        assert "pushed" in laptop.json("sync")["usage"]
        assert server.admin_json("usage", "--by", "key")["totals"]["cost_micros"] == 2 * COST
