"""A metrics-role token cannot sign in to the dashboard: a clear 403 page, no session."""

from __future__ import annotations

import pytest

from tests.server.conftest import Server
from tests.server.test_server_ui import _csrf

pytestmark = pytest.mark.anyio


async def test_a_metrics_token_cannot_sign_in_to_the_dashboard(server: Server) -> None:
    created = await server.admin("POST", "/tokens", json={"name": "prom", "role": "metrics"})
    assert created.status_code == 201
    token = created.json()["token"]
    assert (
        await server.client.get("/metrics", headers={"authorization": f"Bearer {token}"})
    ).status_code == 200
    form = await server.client.get("/ui/login")
    answer = await server.client.post("/ui/login", data={"token": token, "csrf": _csrf(form.text)})
    assert answer.status_code == 403
    assert "metrics role" in answer.text
    assert token not in answer.text
    assert "ccgate_session" not in answer.headers.get("set-cookie", "")
