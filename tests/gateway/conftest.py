"""The ``rig`` fixture: the real server app on a SQLite file under this test's CCGATE_HOME, with
an Anthropic provider configured, and the machines a test enrols against it (see ``rig.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ccgate import paths
from ccgate.server.app import create_app
from ccgate.server.runner import build_context
from ccgate.server.state import init_server
from tests.gateway.rig import Clock, Network, Rig

BUNDLE_TTL_S = 7 * 86_400
PROVIDER = {
    "name": "anthropic",
    "base_url": "https://api.anthropic.com",
    "api_key": "sk-ant-test-provider-key",
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    resolved = paths.resolve()
    init = init_server(paths=resolved, environ={}, db_url=None)
    clock = Clock()
    ctx = build_context(
        paths=resolved, environ={}, db_url=None, bundle_ttl_s=BUNDLE_TTL_S, clock=clock
    )
    made = Rig(
        ctx=ctx,
        network=Network(create_app(ctx)),
        admin_token=init.admin_token,
        clock=clock,
        root=tmp_path / "machines",
    )
    try:
        await made.ok("POST", "/providers", 201, json=PROVIDER)
        yield made
    finally:
        made.close()
