"""A server in-process: its own state under the isolated CCGATE_HOME, a settable clock, and an
``httpx.AsyncClient`` on ``httpx.ASGITransport`` (no socket).

Every test that takes ``db_url`` (and so every test on the ``server`` fixture) runs twice: on a
SQLite file and on PostgreSQL. The PostgreSQL run needs ``CCGATE_TEST_POSTGRES_URL`` (``.ci/run``
sets it; without it those runs skip) and gets a database of its own, created for the test and
dropped after it. When the variable is set but the server cannot be reached the tests FAIL: CI
must never pass by silently skipping PostgreSQL.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import make_url

from ccgate import paths
from ccgate.client.remote import device_token
from ccgate.policy.bundle import DeviceKey
from ccgate.server import db
from ccgate.server.app import ServerContext, create_app
from ccgate.server.runner import build_context
from ccgate.server.state import InitResult, init_server
from tests.support.devices import TOKENS

START = 1_764_000_000.0  # 2025-11-24 16:00 UTC, a Monday

# Read at import, before the autouse `isolated` fixture scrubs every CCGATE_* variable.
POSTGRES_URL = os.environ.get("CCGATE_TEST_POSTGRES_URL")
POSTGRES_ENV = "CCGATE_TEST_POSTGRES_URL"


def _conninfo(url: str) -> str:
    """A libpq URI for psycopg from a SQLAlchemy URL (``postgresql+psycopg://`` or plain)."""
    parsed = make_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


def _admin_connect(url: str) -> Any:
    import psycopg

    try:
        return psycopg.connect(_conninfo(url), autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"{POSTGRES_ENV} is set to {db.redact_url(url)} but PostgreSQL cannot be reached: "
            f"{exc}".strip(),
            pytrace=False,
        )


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test (dropped after), or a skip."""
    if not POSTGRES_URL:
        pytest.skip(f"PostgreSQL tests need {POSTGRES_ENV} (.ci/run sets it)")
    name = f"ccgate_t_{secrets.token_hex(6)}"
    with _admin_connect(POSTGRES_URL) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with _admin_connect(POSTGRES_URL) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str | None:
    """None (the default SQLite file under CCGATE_HOME) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_url"))


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Server:
    client: httpx.AsyncClient
    ctx: ServerContext
    init: InitResult
    clock: Clock

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.init.admin_token}"}

    async def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self.client.request(
            method, "/admin/v1" + path, headers=self.admin_headers, **kwargs
        )

    async def ok(self, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
        response = await self.admin(method, path, **kwargs)
        assert response.status_code == status, response.text
        return response.json()

    async def new_key(self, name: str = "alice", **fields: Any) -> str:
        created = await self.ok("POST", "/keys", 201, json={"name": name, **fields})
        return str(created["key"])

    async def enrol(
        self, key: str, device: DeviceKey | None = None, **extra: Any
    ) -> httpx.Response:
        """``POST /v1/devices`` as ``ccgate login`` sends it; the answer as it came."""
        device = device or DeviceKey.generate()
        response = await self.client.post(
            "/v1/devices",
            headers={"authorization": f"Bearer {key}"},
            json={
                "public_key": base64.b64encode(device.public_bytes).decode(),
                "name": "laptop",
                "device_token": device_token(device),
                **extra,
            },
        )
        if response.status_code in (201, 202):
            _TOKENS[str(response.json()["device_id"])] = device_token(device)
        return response

    async def register(self, key: str, device: DeviceKey | None = None) -> tuple[str, DeviceKey]:
        """Enrol an approved device: the key's first, or a later one the admin approves."""
        device = device or DeviceKey.generate()
        response = await self.enrol(key, device)
        assert response.status_code in (201, 202), response.text
        device_id = str(response.json()["device_id"])
        if response.status_code == 202:
            await self.ok("POST", f"/devices/{device_id}/approve")
        return device_id, device


_TOKENS = TOKENS  # device id -> the device token its enrolment sent (ids are random)


def device_headers(key: str, device_id: str) -> dict[str, str]:
    """What a daemon sends: the virtual key, the device id and that device's token."""
    headers = {"authorization": f"Bearer {key}", "x-ccgate-device": device_id}
    if device_id in _TOKENS:
        headers["x-ccgate-device-token"] = _TOKENS[device_id]
    return headers


def token_of(device_id: str) -> str:
    return _TOKENS[device_id]


@pytest.fixture
async def server(db_url: str | None) -> AsyncIterator[Server]:
    resolved = paths.resolve()
    result = init_server(paths=resolved, environ={}, db_url=db_url)
    clock = Clock()
    ctx = build_context(
        paths=resolved, environ={}, db_url=db_url, bundle_ttl_s=7 * 86_400, clock=clock
    )
    transport = httpx.ASGITransport(app=create_app(ctx))
    async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
        yield Server(client=client, ctx=ctx, init=result, clock=clock)
    if ctx.usage_writer is not None:  # the lifespan stops it when served; this app is not
        ctx.usage_writer.stop()
    ctx.engine.dispose()
