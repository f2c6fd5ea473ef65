"""The gateway's metrics from ledger rows: fallbacks and key rotations from the attempt log,
refusal reasons from the governor's own refusals, and the server-mode gauges (unsynced rows, the
lease balance) read at scrape time from a governor enrolled against the real server."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ccgate.accounting.pricing import PriceTable
from ccgate.gateway.metrics import MAX_MODELS, GatewayMetrics, rejection_reason
from ccgate.gateway.policy import LocalPolicy
from ccgate.store.ledger import Ledger, RequestRecord
from tests.gateway.rig import Rig

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples_of(metrics: GatewayMetrics) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def local_metrics(tmp_path: Path) -> GatewayMetrics:
    policy = LocalPolicy(
        client_keys={}, upstream_url="http://upstream.test", upstream_key=None,
        passthrough=False, table=PriceTable.default(),
    )  # fmt: skip
    return GatewayMetrics(ledger=Ledger(tmp_path / "ledger.db"), policy=policy, started_at=1.0)


def attempt(provider: str, key: str, status: int | None, reason: str | None) -> dict[str, Any]:
    kind = provider if provider in ("bedrock", "vertex") else "anthropic"
    return {"provider": provider, "kind": kind, "key": key, "status": status, "reason": reason,
            "ms": 12.5}  # fmt: skip


def served(*log: dict[str, Any], model: str = "claude-sonnet-4-6") -> RequestRecord:
    return RequestRecord(
        id=secrets.token_hex(8), started_at=1.0, key_id="local", method="POST",
        path="/v1/messages", model=model, status=200, outcome="ok",
        provider=str(log[-1]["provider"]) if log else "anthropic",
        attempts=max(len(log), 1), attempt_log=list(log),
    )  # fmt: skip


def test_fallbacks_and_rotations_come_from_the_attempt_log(tmp_path: Path) -> None:
    metrics = local_metrics(tmp_path)
    # 429 on key a, then a 529 on key b of the same provider, then Bedrock serves.
    metrics.observe(
        served(
            attempt("anthropic", "a", 429, "rate_limited"),
            attempt("anthropic", "b", 529, "overloaded"),
            attempt("bedrock", "br", 200, None),
        )
    )
    metrics.observe(
        served(attempt("anthropic", "a", None, "connect_error"), attempt("vertex", "v", 200, None))
    )
    # An unknown reason is counted, under "other" (the label set stays fixed).
    metrics.observe(
        served(attempt("anthropic", "a", 418, "teapot"), attempt("anthropic", "c", 200, None))
    )
    metrics.observe(served(attempt("anthropic", "a", 200, None)))  # served first time
    metrics.observe(served())  # no attempt log at all (a relay that does not fill it)

    s = samples_of(metrics)
    rotations = {k: v for k, v in s.items() if k[0] == "ccgate_key_rotations_total"}
    fallbacks = {k: v for k, v in s.items() if k[0] == "ccgate_fallbacks_total"}
    assert rotations == {
        ("ccgate_key_rotations_total", frozenset({("provider", "anthropic"),
                                                  ("reason", "rate_limited")})): 1,
        ("ccgate_key_rotations_total", frozenset({("provider", "anthropic"),
                                                  ("reason", "other")})): 1,
    }  # fmt: skip
    assert fallbacks == {
        ("ccgate_fallbacks_total", frozenset({("from_provider", "anthropic"),
            ("to_provider", "bedrock"), ("reason", "overloaded")})): 1,
        ("ccgate_fallbacks_total", frozenset({("from_provider", "anthropic"),
            ("to_provider", "vertex"), ("reason", "connect_error")})): 1,
    }  # fmt: skip
    # Requests are labelled with the provider that served them.
    ok = {"status": "200", "model": "claude-sonnet-4-6", "outcome": "ok"}
    assert value(s, "ccgate_requests_total", provider="bedrock", **ok) == 1
    assert value(s, "ccgate_requests_total", provider="vertex", **ok) == 1
    assert value(s, "ccgate_requests_total", provider="anthropic", **ok) == 3


def test_a_retry_on_the_same_key_is_neither_a_rotation_nor_a_fallback(tmp_path: Path) -> None:
    metrics = local_metrics(tmp_path)
    metrics.observe(
        served(attempt("anthropic", "a", 529, "overloaded"), attempt("anthropic", "a", 200, None))
    )
    names = {name for name, _ in samples_of(metrics)}
    assert "ccgate_key_rotations_total" not in names
    assert "ccgate_fallbacks_total" not in names


def test_model_names_are_capped_so_a_client_cannot_explode_the_series(tmp_path: Path) -> None:
    metrics = local_metrics(tmp_path)
    for i in range(MAX_MODELS + 10):
        metrics.observe(served(model=f"model-{i}"))
    models = {dict(labels)["model"] for name, labels in samples_of(metrics)
              if name == "ccgate_requests_total"}  # fmt: skip
    assert len(models) == MAX_MODELS + 1
    assert "other" in models
    assert value(samples_of(metrics), "ccgate_requests_total", status="200", model="other",
                 provider="anthropic", outcome="ok") == 10  # fmt: skip


def test_each_gateway_counts_in_its_own_registry(tmp_path: Path) -> None:
    one, two = local_metrics(tmp_path / "1"), local_metrics(tmp_path / "2")
    one.observe(served())
    labels = {"status": "200", "model": "claude-sonnet-4-6", "provider": "anthropic"}
    assert value(samples_of(one), "ccgate_requests_total", outcome="ok", **labels) == 1
    assert value(samples_of(two), "ccgate_requests_total", outcome="ok", **labels) == 0


@pytest.mark.parametrize(
    ("status", "message", "reason"),
    [
        (401, "The ccgate key sent with this request is not valid.", "auth"),
        (400, "The request body is not JSON: x.", "invalid_request"),
        (413, "The request body is larger than 32 MB.", "too_large"),
        (408, "The request body did not arrive within 60 s.", "body_timeout"),
        (503, "ccgate cannot record this request in its ledger at /x (disk full).",
         "ledger_unavailable"),
        (503, "ccgate's policy bundle has expired and the ccgate server cannot be reached.",
         "policy_unavailable"),
        (502, "unknown provider kind 'x'", "provider_unusable"),
        (418, None, "other"),
    ],
)  # fmt: skip
def test_rejection_reasons_are_a_fixed_short_set(
    status: int, message: str | None, reason: str
) -> None:
    assert rejection_reason(status, message) == reason


# -- server mode, against the real server --------------------------------------------------------


def _budget(usd: float) -> dict[str, Any]:
    return {"limit_micros": int(usd * 1_000_000), "period": "1d", "rolling": False}


@pytest.mark.anyio
async def test_server_mode_refusals_and_gauges(rig: Rig) -> None:
    budgeted = await rig.enrol(await rig.new_key("ann", budget=_budget(0.005)))
    metrics = GatewayMetrics(
        ledger=budgeted.ledger, policy=budgeted.governor, started_at=rig.clock(), clock=rig.clock
    )
    first, reject = await budgeted.request()
    assert reject is None
    metrics.observe(first)
    refused, reject = await budgeted.request()
    assert reject is not None and reject.status == 402
    metrics.observe(refused)

    limited = await rig.enrol(await rig.new_key("bob", rpm=1, models=["claude-haiku-*"]),
                              machine="desk")  # fmt: skip
    limited_metrics = GatewayMetrics(
        ledger=limited.ledger, policy=limited.governor, started_at=rig.clock(), clock=rig.clock
    )
    wrong_model, reject = await limited.request()
    assert reject is not None and reject.status == 403
    limited_metrics.observe(wrong_model)
    _allowed, reject = await limited.request(model="claude-haiku-4-5")
    assert reject is None
    too_soon, reject = await limited.request(model="claude-haiku-4-5")
    assert reject is not None and reject.status == 429
    limited_metrics.observe(too_soon)

    s = samples_of(metrics)
    assert value(s, "ccgate_policy_rejections_total", reason="budget") == 1
    assert value(s, "ccgate_unsynced_records") == budgeted.unsynced() > 0
    available = budgeted.governor.wallet.available(rig.clock())
    assert value(s, "ccgate_lease_balance_usd") == available / 1_000_000
    mode = {dict(labels).get("mode") for name, labels in s if name == "ccgate_build_info"}
    assert mode == {"server"}
    await budgeted.governor.sync()
    assert value(samples_of(metrics), "ccgate_unsynced_records") == 0

    t = samples_of(limited_metrics)
    assert value(t, "ccgate_policy_rejections_total", reason="model_not_allowed") == 1
    assert value(t, "ccgate_policy_rejections_total", reason="rate_limit") == 1
