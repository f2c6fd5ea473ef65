"""Roles, chargeback and alerts end to end: a real server, a real daemon, real webhook receivers.

Requests go through ``ccgate up``'s daemon to the fake upstream; ``ccgate sync`` pushes their
usage, which is what crosses a team's alert thresholds on the server.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_upstream import FakeUpstream, Scenario, Usage
from tests.support.harness import Isolated, Server, ccgate, free_port, run_server
from tests.support.receiver import Receiver
from tests.test_server_mode_e2e import ask, create_key, login, sync, up

pytestmark = pytest.mark.e2e

FAST_ALERTS = ("--alert-interval", "0.3", "--alert-retry", "0.2")
SECRET_PATH = "/T0000/B0000/webhook-secret-part"  # like a Slack incoming-webhook URL
BIG = Usage(input_tokens=100_000, output_tokens=10_000)  # $0.45 on claude-sonnet-4-6


@pytest.fixture
def server(tmp_path: Path, fake_upstream: FakeUpstream) -> Iterator[Server]:
    with run_server(tmp_path / "server", extra_args=FAST_ALERTS) as s:
        s.add_provider(fake_upstream.url)
        yield s


@pytest.fixture
def hooks() -> Iterator[tuple[Receiver, Receiver]]:
    with Receiver() as plain, Receiver() as slack:
        yield plain, slack


def _team_with_alerts(server: Server, plain: Receiver, slack: Receiver) -> str:
    server.admin_json("teams", "create", "platform", "--budget", "1", "--period", "1M")
    for receiver, fmt in ((plain, "json"), (slack, "slack")):
        added = server.admin_json(
            "alerts", "add", "--scope", "team:platform", "--at", "50,80",
            "--webhook", receiver.url + SECRET_PATH, "--format", fmt,
        )  # fmt: skip
        assert added["at"] == [50, 80] and SECRET_PATH not in json.dumps(added)
    return create_key(server, "alice", "--team", "platform")


def _spend(server: Server, port: int, key: str, fake_upstream: FakeUpstream, total: int) -> None:
    """One $0.45 request, synced (the daemon may have pushed it already) until the server has it."""
    fake_upstream.enqueue(Scenario(usage=BIG))
    ask(port, key)
    deadline = time.monotonic() + 20
    while server.admin_json("usage", "--by", "team")["totals"]["cost_micros"] != total:
        assert time.monotonic() < deadline, "the usage never reached the server"
        sync()
        time.sleep(0.1)


def test_thresholds_fire_once_each_through_a_real_daemon(
    server: Server,
    developer: Isolated,
    fake_upstream: FakeUpstream,
    hooks: tuple[Receiver, Receiver],
) -> None:
    plain, slack = hooks
    key = _team_with_alerts(server, plain, slack)
    login(server, key)
    port = up()
    _spend(server, port, key, fake_upstream, 450_000)  # 45%: nothing
    time.sleep(1)
    assert plain.received == [] and slack.received == []
    _spend(server, port, key, fake_upstream, 900_000)  # 90%: 50 and 80 at once
    (fifty, eighty) = plain.wait_for(2)
    assert [fifty.body["threshold_percent"], eighty.body["threshold_percent"]] == [50, 80]
    assert eighty.body["spent_micros"] == 900_000 and eighty.body["budget_micros"] == 1_000_000
    assert eighty.body["dashboard_url"] == f"{server.url}/ui/"
    assert eighty.headers["idempotency-key"] == eighty.body["idempotency_key"]
    (slack_50, slack_80) = slack.wait_for(2)
    assert "50%" in slack_50.body["text"] and "passed 50%" in slack_50.body["text"]
    assert set(slack_80.body) == {"text", "blocks"} and "passed 80%" in slack_80.body["text"]
    _spend(server, port, key, fake_upstream, 1_350_000)  # 135%: 50 and 80 already sent
    time.sleep(1.5)
    assert len(plain.received) == 2 and len(slack.received) == 2
    listed = server.admin_json("alerts", "list")["alerts"]
    assert [(a["sent"], a["pending"], a["failed"]) for a in listed] == [(2, 0, 0), (2, 0, 0)]
    assert eighty.path == "/hook" + SECRET_PATH
    assert "webhook-secret-part" not in server.log.read_text()  # httpx logs URLs at INFO

    # The month's chargeback agrees with `admin usage` to the micro-dollar.
    month = datetime.now(UTC).strftime("%Y-%m")
    start = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    for by in ("team", "key", "customer"):
        report = server.admin_json("report", "--period", month, "--by", by)
        usage = server.admin_json("usage", "--by", by, "--since", start.isoformat())
        assert report["totals"]["cost_micros"] == usage["totals"]["cost_micros"] == 1_350_000
        assert [r["cost_micros"] for r in report["rows"]] == [
            r["cost_micros"] for r in usage["rows"]
        ]
    as_json = server.admin("report", "--period", month, "--format", "json")
    assert json.loads(as_json.stdout)["totals"]["cost_usd_exact"] == "1.350000"
    csv_out = server.admin("report", "--period", month, "--format", "csv")
    assert csv_out.returncode == 0, csv_out.stderr
    header, row, total = csv_out.stdout.strip().splitlines()
    assert header.startswith("period,team,customer,requests,")
    assert row.startswith(f"{month},platform,,3,300000,30000,")
    assert ",1350000,1.350000," in total
    table = server.admin("report", "--period", month, "--by", "team")
    assert table.returncode == 0 and "platform" in table.stdout and "1.350000" in table.stdout
    assert "Price tables: shipped" in table.stderr
    alerts_table = server.admin("alerts", "list")
    assert alerts_table.returncode == 0 and "2/0/0" in alerts_table.stdout
    assert "webhook-secret-part" not in alerts_table.stdout


def test_a_restart_between_crossing_and_sending_delivers_exactly_once(
    tmp_path: Path,
    developer: Isolated,
    fake_upstream: FakeUpstream,
    hooks: tuple[Receiver, Receiver],
) -> None:
    plain, slack = hooks
    plain.fail_next = slack.fail_next = 10_000  # both receivers are down
    port_s = free_port()
    with run_server(tmp_path / "server", extra_args=FAST_ALERTS, port=port_s) as first:
        first.add_provider(fake_upstream.url)
        key = _team_with_alerts(first, plain, slack)
        login(first, key)
        port = up()
        _spend(first, port, key, fake_upstream, 450_000)
        _spend(first, port, key, fake_upstream, 900_000)  # 90%: in the outbox, not delivered
        deadline = time.monotonic() + 20
        while len(plain.received) < 2 or len(slack.received) < 2:
            assert time.monotonic() < deadline, "no delivery attempt"
            time.sleep(0.05)
        pending = first.admin_json("alerts", "list")["alerts"]
        assert [a["pending"] for a in pending] == [2, 2]
    plain.fail_next = slack.fail_next = 0  # the receivers recover while the server is down
    with run_server(tmp_path / "server", extra_args=FAST_ALERTS, port=port_s, reuse=first) as s:
        got_plain, got_slack = plain.wait_for(2), slack.wait_for(2)
        time.sleep(1.5)  # time for a wrong second delivery to show up
        assert len(plain.delivered()) == 2 and len(slack.delivered()) == 2
        assert sorted(r.body["threshold_percent"] for r in got_plain) == [50, 80]
        assert sorted("passed 80%" in r.body["text"] for r in got_slack) == [False, True]
        # every try of one alert carried the same idempotency key
        tried = {r.headers["idempotency-key"] for r in plain.received}
        assert tried == {r.headers["idempotency-key"] for r in got_plain}
        listed = s.admin_json("alerts", "list")["alerts"]
        assert [(a["sent"], a["pending"]) for a in listed] == [(2, 0), (2, 0)]


def test_viewer_token_reads_but_cannot_change(server: Server) -> None:
    created = server.admin_json("tokens", "create", "auditor", "--role", "viewer")
    viewer = created["token"]
    listed = server.admin_json("tokens", "list")["tokens"]
    assert [(t["name"], t["role"]) for t in listed] == [("init", "admin"), ("auditor", "viewer")]
    assert viewer not in json.dumps(listed)
    table = server.admin("tokens", "list")
    assert "auditor" in table.stdout and "viewer" in table.stdout and viewer not in table.stdout
    env = {**server.env(), "CCGATE_ADMIN_TOKEN": viewer}
    read = ccgate("admin", "keys", "list", "--json", env=env)
    assert read.returncode == 0, read.stderr
    refused = ccgate("admin", "keys", "create", "bob", env=env)
    assert refused.returncode != 0
    assert "403" in refused.stderr and "viewer role" in refused.stderr
    assert "bob" not in json.dumps(server.admin_json("keys", "list"))
    revoked = server.admin_json("tokens", "revoke", "auditor")
    assert revoked["revoked_at"] is not None
    gone = ccgate("admin", "keys", "list", env=env)
    assert gone.returncode != 0 and "revoked" in gone.stderr
    audit: Any = server.admin_json("audit")
    actions = [e["action"] for e in audit["entries"]]
    assert actions[-2:] == ["token.create", "token.revoke"]
    assert viewer not in json.dumps(audit)
