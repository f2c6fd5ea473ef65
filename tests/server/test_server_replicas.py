"""Two real ``ccgate server run`` replicas on one PostgreSQL, hammered at once.

Daemons (threads) take leases from one replica and report usage to the other, push every batch to
both replicas at the same time, and poll bundles while an admin changes policy. Throughout, a
watcher reads the database: the team's ``spent + outstanding`` never passes its limit. At the end
every record counts once and bundle versions never repeat or go back.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from ccgate import paths
from ccgate.client.remote import device_token
from ccgate.policy.bundle import DeviceKey
from ccgate.server import db
from ccgate.server.state import init_server
from tests.support.harness import free_port, stop_process

pytestmark = pytest.mark.e2e

LIMIT = 20_000_000  # the team's $20 a month
DAEMONS = 12
ROUNDS = 10


@contextlib.contextmanager
def _replica(home: Path, url: str) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "CCGATE_HOME": str(home)}
    log = home / f"replica-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "ccgate", "server", "run", "--db", url, "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz", timeout=0.5).status_code == 200:
                    break
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield base
    finally:
        stop_process(process)


def _team_invariant(engine: Any, team_id: str) -> tuple[int, int]:
    """(spent, outstanding) of the team, read in one statement as the grant does."""
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT (SELECT COALESCE(SUM(cost_micros), 0) FROM usage WHERE team_id = :t), "
                "(SELECT COALESCE(SUM(CASE WHEN granted_micros > used_micros THEN "
                "granted_micros - used_micros ELSE 0 END), 0) FROM leases "
                "WHERE team_id = :t AND returned_at IS NULL)"
            ),
            {"t": team_id},
        ).one()
    return int(row[0]), int(row[1])


class _Daemon:
    def __init__(self, key: str, device_id: str, token: str, replicas: list[str]) -> None:
        self.headers = {
            "authorization": f"Bearer {key}",
            "x-ccgate-device": device_id,
            "x-ccgate-device-token": token,
        }
        self.replicas = replicas
        self.accepted = 0
        self.records = 0
        self.versions: list[int] = []
        self.envelopes: dict[int, str] = {}

    def run(self, pool: ThreadPoolExecutor) -> None:
        held: list[str] = []
        with httpx.Client(timeout=60) as http:
            for round_no in range(ROUNDS):
                grant_at, usage_at = self.replicas[round_no % 2], self.replicas[1 - round_no % 2]
                answer = self._post(
                    http,
                    f"{grant_at}/v1/leases",
                    {"want_micros": 20_000, "rate_micros_per_s": 5_000, "return": held},
                )
                held = []
                if answer["lease"] is not None:
                    lease = answer["lease"]
                    held = [lease["id"]]
                    self._report(pool, lease, round_no)
                self._poll(http, usage_at)

    def _post(self, http: httpx.Client, url: str, body: Any) -> Any:
        response = http.post(url, headers=self.headers, json=body)
        assert response.status_code == 200, response.text
        return response.json()

    def _report(self, pool: ThreadPoolExecutor, lease: dict[str, Any], round_no: int) -> None:
        cost = lease["granted_micros"] // 4
        batch = [
            {
                "id": secrets.token_hex(16),
                "started_at": time.time(),
                "cost_micros": cost,
                "output_tokens": round_no,
                "lease_id": lease["id"],
            }
            for _ in range(3)
        ]
        # the same batch to both replicas at once: each record must count once in all
        futures = [
            pool.submit(_post_usage, f"{replica}/v1/usage", self.headers, batch)
            for replica in self.replicas
        ]
        self.accepted += sum(f.result() for f in futures)
        self.records += len(batch)

    def _poll(self, http: httpx.Client, replica: str) -> None:
        response = http.get(f"{replica}/v1/bundle", headers=self.headers)
        assert response.status_code == 200, response.text
        version = int(response.headers["etag"].strip('"v'))
        self.versions.append(version)
        self.envelopes[version] = response.text


def _post_usage(url: str, headers: dict[str, str], batch: list[Any]) -> int:
    response = httpx.post(url, headers=headers, json={"records": batch}, timeout=60)
    assert response.status_code == 200, response.text
    accepted: int = response.json()["accepted"]
    return accepted


def _setup(admin: httpx.Client, replicas: list[str]) -> list[_Daemon]:
    budget = {"limit_micros": LIMIT, "period": "1M", "rolling": False}
    admin.post("/teams", json={"name": "platform", "budget": budget}).raise_for_status()
    daemons = []
    for i in range(DAEMONS):
        created = admin.post("/keys", json={"name": f"dev{i}", "team": "platform"})
        created.raise_for_status()
        key = created.json()["key"]
        device = DeviceKey.generate()
        registered = httpx.post(
            f"{replicas[i % 2]}/v1/devices",
            headers={"authorization": f"Bearer {key}"},
            json={
                "public_key": base64.b64encode(device.public_bytes).decode(),
                "name": "m",
                "device_token": device_token(device),
            },
        )
        registered.raise_for_status()
        daemons.append(_Daemon(key, registered.json()["device_id"], device_token(device), replicas))
    return daemons


def test_two_replicas_share_one_postgres(postgres_url: str, tmp_path: Path) -> None:
    home = tmp_path / "server"
    resolved = paths.Paths(config_dir=home, data_dir=home, state_dir=home)
    token = init_server(paths=resolved, environ={}, db_url=postgres_url).admin_token
    engine = db.create_engine(postgres_url)
    with _replica(home, postgres_url) as first, _replica(home, postgres_url) as second:
        replicas = [first, second]
        admin = httpx.Client(
            base_url=f"{first}/admin/v1", headers={"authorization": f"Bearer {token}"}, timeout=60
        )
        daemons = _setup(admin, replicas)
        team_id = admin.get("/teams").json()["teams"][0]["id"]
        worst = [0]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                spent, outstanding = _team_invariant(engine, team_id)
                worst[0] = max(worst[0], spent + outstanding)

        def change_policy() -> None:
            for rpm in range(1, 6):
                admin.patch(f"/keys/dev{rpm}", json={"rpm": rpm * 10}).raise_for_status()
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            with ThreadPoolExecutor(max_workers=2 * DAEMONS + 2) as pool:
                helpers = ThreadPoolExecutor(max_workers=2 * DAEMONS)
                runs = [pool.submit(d.run, helpers) for d in daemons]
                runs.append(pool.submit(change_policy))
                for run in runs:
                    run.result()
                helpers.shutdown()
        finally:
            stop.set()
            watcher.join()
        admin.close()
        # every policy change went through the first replica; both now serve it, at a version
        # past any the daemon was given before
        for rpm in range(1, 6):
            daemon = daemons[rpm]
            for replica in replicas:
                final = httpx.get(f"{replica}/v1/bundle", headers=daemon.headers, timeout=60)
                assert final.status_code == 200, final.text
                payload = json.loads(base64.b64decode(final.json()["payload"]))
                assert (payload["key"]["name"], payload["key"]["rpm"]) == (f"dev{rpm}", rpm * 10)
                assert payload["version"] >= max(daemon.versions)
    spent, outstanding = _team_invariant(engine, team_id)
    with engine.connect() as conn:
        usage_rows = conn.execute(text("SELECT COUNT(*) FROM usage")).scalar()
        counter = conn.execute(text("SELECT version FROM bundle_counter")).scalar()
        leases = conn.execute(text("SELECT COUNT(*) FROM leases")).scalar()
    engine.dispose()

    assert worst[0] <= LIMIT
    assert spent + outstanding <= LIMIT
    assert int(leases or 0) > DAEMONS  # the daemons really competed for slices
    # duplicate ids count once, however the replicas raced
    assert sum(d.accepted for d in daemons) == sum(d.records for d in daemons) == usage_rows
    # bundle versions: never backwards for a device, never one version for two envelopes
    owners: dict[int, str] = {}
    for daemon in daemons:
        assert daemon.versions == sorted(daemon.versions)
        for version, envelope in daemon.envelopes.items():
            assert owners.setdefault(version, envelope) == envelope
            assert json.loads(envelope)["payloadType"] == "application/vnd.ccgate.bundle+json"
    assert max(owners) <= int(counter or 0)
