"""The gateway's guards and its own errors, in-process: none of these requests may go upstream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from ccgate.accounting.pricing import PriceTable
from ccgate.gateway.policy import LocalPolicy
from ccgate.gateway.proxy import MAX_BODY_BYTES, GatewaySettings
from ccgate.store.ledger import Ledger
from tests.support.gateways import standalone

pytestmark = pytest.mark.anyio

PORT = 7411
KEY = "sk-cg-" + "k" * 43
UPSTREAM_SECRET = "sk-ant-never-shown"


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.start_writer()
    yield ledger
    ledger.close()


@pytest.fixture
async def client(ledger: Ledger) -> AsyncIterator[httpx.AsyncClient]:
    # The upstream is a port nothing listens on: a request that got past the guards would fail
    # with 502, so every status asserted below proves the request was stopped locally.
    gateway = standalone(
        port=PORT,
        ledger=ledger,
        upstream_url="http://127.0.0.1:9",
        upstream_key=UPSTREAM_SECRET,
        client_keys={KEY: "local"},
    )
    transport = httpx.ASGITransport(app=gateway.app())
    async with (
        gateway.lifespan(),
        httpx.AsyncClient(transport=transport, base_url=f"http://127.0.0.1:{PORT}") as c,
    ):
        yield c


BODY = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": []}


def assert_envelope(response: httpx.Response, status: int, err_type: str) -> str:
    assert response.status_code == status
    data = response.json()
    assert data["type"] == "error"
    assert data["error"]["type"] == err_type
    message: str = data["error"]["message"]
    assert UPSTREAM_SECRET not in response.text
    return message


def rejected_rows(ledger: Ledger) -> list[tuple[str, int | None]]:
    assert ledger.flush()
    return [(r.outcome, r.status) for r in ledger.records()]


async def test_missing_key_is_401_without_retry(client: httpx.AsyncClient, ledger: Ledger) -> None:
    response = await client.post("/v1/messages", json=BODY)
    message = assert_envelope(response, 401, "authentication_error")
    assert "No ccgate key" in message
    assert response.headers["x-should-retry"] == "false"
    assert rejected_rows(ledger) == [("rejected", 401)]


@pytest.mark.parametrize(
    "headers",
    [
        {"x-api-key": "sk-cg-wrong"},
        {"authorization": "Bearer sk-cg-wrong"},
        {"authorization": KEY},
    ],  # a key without the Bearer scheme is not accepted either
)
async def test_wrong_key_is_401(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    response = await client.post("/v1/messages", json=BODY, headers=headers)
    message = assert_envelope(response, 401, "authentication_error")
    assert "not valid" in message
    assert "sk-cg-wrong" not in message


@pytest.mark.parametrize("header", ["x-api-key", "authorization"])
async def test_valid_key_in_either_header_passes_the_guards(
    client: httpx.AsyncClient, header: str
) -> None:
    value = KEY if header == "x-api-key" else f"Bearer {KEY}"
    response = await client.post("/v1/messages", json=BODY, headers={header: value})
    # Past auth, the request went for the (dead) upstream: ccgate's own 502 envelope.
    message = assert_envelope(response, 502, "api_error")
    assert "cannot reach" in message


@pytest.mark.parametrize(
    "host", ["evil.example:7411", "127.0.0.1:7412", "localhost", "attacker.test", "[::2]:7411"]
)
async def test_foreign_host_is_refused(client: httpx.AsyncClient, host: str) -> None:
    response = await client.post(
        "/v1/messages", json=BODY, headers={"host": host, "x-api-key": KEY}
    )
    assert_envelope(response, 403, "permission_error")
    assert response.headers["x-should-retry"] == "false"


@pytest.mark.parametrize(
    "host", ["127.0.0.1:7411", "localhost:7411", "LOCALHOST:7411", "[::1]:7411"]
)
async def test_loopback_hosts_are_accepted(client: httpx.AsyncClient, host: str) -> None:
    response = await client.get("/", headers={"host": host})
    assert response.status_code == 200


async def test_origin_header_is_refused_even_with_a_valid_key(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/messages", json=BODY, headers={"origin": "http://localhost:3000", "x-api-key": KEY}
    )
    message = assert_envelope(response, 403, "permission_error")
    assert "web pages" in message


async def test_malformed_json_is_400(client: httpx.AsyncClient, ledger: Ledger) -> None:
    response = await client.post(
        "/v1/messages",
        content=b'{"model": ',
        headers={"x-api-key": KEY, "content-type": "application/json"},
    )
    message = assert_envelope(response, 400, "invalid_request_error")
    assert "not JSON" in message
    assert rejected_rows(ledger) == [("rejected", 400)]


async def test_non_object_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/messages", content=b"[1, 2]", headers={"x-api-key": KEY})
    assert_envelope(response, 400, "invalid_request_error")


async def test_declared_oversize_body_is_413(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/messages",
        content=b"{}",
        headers={"x-api-key": KEY, "content-length": str(MAX_BODY_BYTES + 1)},
    )
    assert_envelope(response, 413, "request_too_large")


async def test_streamed_oversize_body_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        block = b" " * (1024 * 1024)
        for _ in range(33):
            yield block

    response = await client.post("/v1/messages", content=chunks(), headers={"x-api-key": KEY})
    assert_envelope(response, 413, "request_too_large")


async def test_unknown_route_is_404_envelope(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/complete", json=BODY, headers={"x-api-key": KEY})
    assert_envelope(response, 404, "not_found_error")


async def test_health_is_open_and_holds_no_secret(client: httpx.AsyncClient) -> None:
    response = await client.get("/_ccgate/health")
    assert response.status_code == 200
    data = response.json()
    assert data["service"] == "ccgate"
    assert data["upstream_key"] is True
    assert KEY not in response.text
    assert UPSTREAM_SECRET not in response.text


def test_policy_and_settings_repr_hide_keys() -> None:
    policy = LocalPolicy(
        client_keys={KEY: "local"},
        upstream_url="http://x",
        upstream_key=UPSTREAM_SECRET,
        passthrough=False,
        table=PriceTable.default(),
    )
    for shown in (repr(policy), json.dumps(str(policy)), repr(GatewaySettings(port=1))):
        assert UPSTREAM_SECRET not in shown
        assert KEY not in shown
    assert "http://x" in repr(policy)
