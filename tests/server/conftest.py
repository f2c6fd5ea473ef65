"""A server in-process: its own state under the isolated CCGATE_HOME, a settable clock, and an
``httpx.AsyncClient`` on ``httpx.ASGITransport`` (no socket)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from ccgate import paths
from ccgate.bundle import DeviceKey
from ccgate.server.app import ServerContext, create_app
from ccgate.server.runner import build_context
from ccgate.server.state import InitResult, init_server

START = 1_764_000_000.0  # 2025-11-24 16:00 UTC, a Monday


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

    async def register(self, key: str, device: DeviceKey | None = None) -> tuple[str, DeviceKey]:
        device = device or DeviceKey.generate()
        response = await self.client.post(
            "/v1/devices",
            headers={"authorization": f"Bearer {key}"},
            json={"public_key": base64.b64encode(device.public_bytes).decode(), "name": "laptop"},
        )
        assert response.status_code == 201, response.text
        return str(response.json()["device_id"]), device


def device_headers(key: str, device_id: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", "x-ccgate-device": device_id}


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    resolved = paths.resolve()
    result = init_server(paths=resolved, environ={})
    clock = Clock()
    ctx = build_context(
        paths=resolved, environ={}, db_url=None, bundle_ttl_s=7 * 86_400, clock=clock
    )
    transport = httpx.ASGITransport(app=create_app(ctx))
    async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
        yield Server(client=client, ctx=ctx, init=result, clock=clock)
    ctx.engine.dispose()
