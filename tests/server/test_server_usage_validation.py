"""Every rule of a usage record (``usage.parse_batch``), one by one: the value refused, the
message naming it, and the values next to it that pass. The body reaches it from
``json.loads``, so the inputs here are what JSON can carry."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ccgate.server import usage
from ccgate.server.errors import InvalidRequestError

GOOD: dict[str, Any] = {"id": "a" * 32, "started_at": 1_764_000_000.5}
COUNTS = [
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_creation_1h_input_tokens",
    "web_search_requests",
    "cost_micros",
    "web_fetch_requests",
    "code_execution_requests",
]
TEXTS = {
    "speed": 16,
    "inference_geo": 32,
    "service_tier": 16,
    "stop_reason": 32,
    "price_version": 64,
    "iterations": 65_536,
    "repo": 512,
    "branch": 256,
    "quota_status": 16,
    "quota_claim": 32,
}
QUOTA_NUMBERS = [
    "quota_5h_utilization",
    "quota_5h_reset",
    "quota_7d_utilization",
    "quota_7d_reset",
]


def _one(**fields: Any) -> dict[str, Any]:
    # through JSON, as a body arrives
    body = json.loads(json.dumps({"records": [{**GOOD, **fields}]}))
    records, _ = usage.parse_batch(body)
    return records[0]


REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"id": None}, "records[0].id must be 32 lowercase hex characters."),
    ({"id": "A" * 32}, "records[0].id must be 32 lowercase hex characters."),
    ({"id": "a" * 31}, "records[0].id must be 32 lowercase hex characters."),
    ({"id": 7}, "records[0].id must be 32 lowercase hex characters."),
    ({"started_at": None}, "records[0].started_at must be epoch seconds."),
    ({"started_at": "1"}, "records[0].started_at must be epoch seconds."),
    ({"started_at": True}, "records[0].started_at must be epoch seconds."),
    ({"started_at": 10**400}, "records[0].started_at must be epoch seconds."),
    ({"outcome": "pending"}, "records[0].outcome must be one of"),
    ({"outcome": {"ok": 1}}, "records[0].outcome must be one of"),
    ({"outcome": None}, "records[0].outcome must be one of"),
    *(
        ({name: bad}, f"records[0].{name} must be a whole number >= 0.")
        for name in COUNTS
        for bad in (-1, 1.5, 1.0, True, "1", None, 2**62 + 1)
    ),
    ({"web_search_requests": 2**31}, "records[0].web_search_requests must be a whole number"),
    ({"status": 200.0}, "records[0].status has the wrong type."),
    ({"status": True}, "records[0].status has the wrong type."),
    ({"status": 1000}, "records[0].status must be an HTTP status."),
    ({"status": -1}, "records[0].status must be an HTTP status."),
    ({"latency_ms": "3"}, "records[0].latency_ms has the wrong type."),
    ({"latency_ms": False}, "records[0].latency_ms has the wrong type."),
    *(
        ({name: bad}, f"records[0].{name} has the wrong type.")
        for name in ("model", "session_id", "provider", "billing", *TEXTS)
        for bad in (1, True, ["x"])
    ),
    *(
        ({name: "x" * (longest + 1)}, f"records[0].{name} is longer than {longest} characters.")
        for name, longest in TEXTS.items()
    ),
    ({"lease_id": "lse_" + "a" * 15}, "records[0].lease_id must be a lease id"),
    ({"lease_id": 5}, "records[0].lease_id must be a lease id"),
    *(({name: "1"}, f"records[0].{name} has the wrong type.") for name in QUOTA_NUMBERS),
    *(({name: True}, f"records[0].{name} has the wrong type.") for name in QUOTA_NUMBERS),
    *(
        ({name: bad}, f"records[0].{name} must be a finite number >= 0.")
        for name in QUOTA_NUMBERS
        for bad in (-0.5, 1e12, 1e400, 10**400)
    ),
    ({"attempts": 0}, "records[0].attempts must be a whole number from 1 to 1000."),
    ({"attempts": 1001}, "records[0].attempts must be a whole number from 1 to 1000."),
    ({"attempts": 2.0}, "records[0].attempts must be a whole number from 1 to 1000."),
    ({"attempts": True}, "records[0].attempts must be a whole number from 1 to 1000."),
]


@pytest.mark.parametrize(("fields", "message"), REFUSED)
def test_each_rule_refuses_with_its_message(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        _one(**fields)
    assert str(refused.value).startswith(message)


def test_the_first_broken_rule_is_the_one_named() -> None:
    with pytest.raises(InvalidRequestError, match=r"records\[0\]\.outcome"):
        _one(outcome="nope", input_tokens=-1, attempts=0)
    with pytest.raises(InvalidRequestError, match=r"records\[1\]\.id"):
        usage.parse_batch({"records": [GOOD, {**GOOD, "id": "x"}]})
    with pytest.raises(InvalidRequestError, match=r"records\[0\] must be a JSON object"):
        usage.parse_batch({"records": ["x"]})


def test_the_values_at_each_limit_pass_and_defaults_fill_in() -> None:
    record = _one()
    assert record["started_at"] == 1_764_000_000.5 and record["outcome"] == "ok"
    assert all(record[name] == 0 for name in COUNTS)
    assert record["attempts"] == 1 and record["streamed"] is False
    assert record["price_estimated"] is False and record["status"] is None
    assert _one(started_at=1_764_000_000)["started_at"] == 1_764_000_000.0
    assert isinstance(_one(started_at=5)["started_at"], float)
    top = _one(**{name: 2**62 for name in COUNTS if name != "web_search_requests"})
    assert top["cost_micros"] == 2**62
    assert _one(web_search_requests=2**31 - 1)["web_search_requests"] == 2**31 - 1
    assert _one(status=0)["status"] == 0 and _one(status=999)["status"] == 999
    assert _one(latency_ms=3)["latency_ms"] == 3 and _one(latency_ms=2.5)["latency_ms"] == 2.5
    assert all(_one(**{n: "x" * cap})[n] == "x" * cap for n, cap in TEXTS.items())
    assert _one(lease_id="lse_" + "0" * 16)["lease_id"] == "lse_" + "0" * 16
    quota = _one(quota_5h_utilization=0, quota_7d_reset=1e12 - 1)
    assert quota["quota_5h_utilization"] == 0.0 and isinstance(quota["quota_5h_utilization"], float)
    assert _one(attempts=1000)["attempts"] == 1000
    assert _one(streamed=1)["streamed"] is True  # any truthy value, as before
    assert _one(price_estimated=1)["price_estimated"] is False  # only true itself
    assert _one(outcome="rejected")["outcome"] == "rejected"


def test_batch_rules() -> None:
    with pytest.raises(InvalidRequestError, match="'records' must be a list"):
        usage.parse_batch({"records": {}})
    with pytest.raises(InvalidRequestError, match="at most 1000 records; got 1001"):
        usage.parse_batch({"records": [GOOD] * 1001})
    assert usage.parse_batch({}) == ([], [])
    _, failures = usage.parse_batch(
        {"key_failures": [{"provider_id": "prov_1", "status": 401, "at": 5}]}
    )
    assert failures == [("prov_1", 401, 5.0)]
    for bad, message in (
        ({"provider_id": "", "status": 401, "at": 5}, "provider_id must be"),
        ({"provider_id": "p", "status": 500, "at": 5}, "status must be 401 or 403"),
        ({"provider_id": "p", "status": 401, "at": 10**400}, "at must be epoch seconds"),
        ({"provider_id": "p", "status": 401, "at": True}, "at must be epoch seconds"),
    ):
        with pytest.raises(InvalidRequestError, match=message):
            usage.parse_batch({"key_failures": [bad]})
