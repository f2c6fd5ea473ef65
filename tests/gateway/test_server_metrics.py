"""The server's ``/metrics`` after real syncs: governors push usage to the real server app, and
the scrape (with a metrics-role token) shows ingest, active daemons, spend by team and budget
use. Scrape access: a metrics token reads nothing else, any admin token may scrape, a revoked
one may not."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.rig import SERVER_URL, Rig, sonnet_cost

pytestmark = pytest.mark.anyio

COST = sonnet_cost(1000, 100)  # 4,500 micro-dollars a request
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _budget(usd: float) -> dict[str, Any]:
    return {"limit_micros": int(usd * 1_000_000), "period": "1d", "rolling": False}


async def get(rig: Rig, path: str, token: str | None) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=rig.network.app), base_url=SERVER_URL, headers=headers
    ) as client:
        return await client.get(path)


async def scrape(rig: Rig, token: str) -> Samples:
    response = await get(rig, "/metrics", token)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    found: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


def value(samples: Samples, metric: str, /, **labels: str) -> float | None:
    return samples.get((metric, frozenset(labels.items())))


async def token(rig: Rig, name: str, role: str) -> str:
    created = await rig.ok("POST", "/tokens", 201, json={"name": name, "role": role})
    return str(created["token"])


async def test_server_metrics_after_real_syncs(rig: Rig) -> None:
    await rig.ok("POST", "/customers", 201, json={"name": "acme", "budget": _budget(2)})
    await rig.ok("POST", "/teams", 201,
                 json={"name": "platform", "customer": "acme", "budget": _budget(1)})  # fmt: skip
    await rig.ok("POST", "/teams", 201, json={"name": "idle"})
    ann = await rig.enrol(
        await rig.new_key("ann", team="platform", budget=_budget(0.5)), machine="ann"
    )
    bob = await rig.enrol(await rig.new_key("bob", team="platform"), machine="bob")
    prom = await token(rig, "prom", "metrics")

    before = await scrape(rig, prom)
    assert value(before, "ccgate_server_active_daemons") == 0  # enrolled, never synced
    assert value(before, "ccgate_server_usage_records_total", result="accepted") == 0

    for _ in range(3):
        await ann.request()
    await bob.request()
    # Bob's first push lands but its answer is lost: the daemon sends the rows again.
    rig.network.lose_answers.add("/v1/usage")
    await bob.governor.sync()
    rig.network.lose_answers.clear()
    await bob.governor.sync()
    await ann.governor.sync()
    assert ann.unsynced() == bob.unsynced() == 0

    s = await scrape(rig, prom)
    pushes = rig.network.calls("POST", "/v1/usage")
    assert value(s, "ccgate_server_syncs_total") == len([c for c in pushes if c == 200]) >= 3
    assert value(s, "ccgate_server_usage_records_total", result="accepted") == 4
    assert value(s, "ccgate_server_usage_records_total", result="duplicate") == 1
    assert value(s, "ccgate_server_active_daemons") == 2
    assert value(s, "ccgate_server_devices", status="approved") == 2
    # Spend by team in its budget period; a team without spend is there at zero.
    assert value(s, "ccgate_server_team_spend_usd", team="platform") == 4 * COST / 1e6
    assert value(s, "ccgate_server_team_spend_usd", team="idle") == 0
    # Budget use per budget; bob has none, so no series.
    assert value(s, "ccgate_server_budget_used_ratio", level="key", name="ann") == (
        3 * COST / 500_000
    )
    assert value(s, "ccgate_server_budget_used_ratio", level="key", name="bob") is None
    assert value(s, "ccgate_server_budget_used_ratio", level="team", name="platform") == (
        4 * COST / 1_000_000
    )
    assert value(s, "ccgate_server_budget_used_ratio", level="customer", name="acme") == (
        4 * COST / 2_000_000
    )
    assert value(s, "ccgate_server_budget_limit_usd", level="team", name="platform") == 1.0

    rig.clock.advance(16 * 60)  # nobody synced for longer than the active window
    assert value(await scrape(rig, prom), "ccgate_server_active_daemons") == 0


async def test_scrape_access_by_token(rig: Rig) -> None:
    prom = await token(rig, "prom", "metrics")
    viewer = await token(rig, "grafana-viewer", "viewer")

    missing = await get(rig, "/metrics", None)
    assert missing.status_code == 401
    assert "ccgate_server" not in missing.text
    assert (await get(rig, "/metrics", "cg-adm-not-a-token")).status_code == 401
    await scrape(rig, viewer)  # any live admin token may scrape
    await scrape(rig, rig.admin_token)

    # A metrics token reads nothing of the API.
    refused = await get(rig, "/admin/v1/keys", prom)
    assert refused.status_code == 403
    assert "metrics role" in refused.json()["error"]["message"]

    await rig.ok("POST", "/tokens/prom/revoke")
    revoked = await get(rig, "/metrics", prom)
    assert revoked.status_code == 401
    assert "revoked" in revoked.json()["error"]["message"]
