"""The OpenAPI 3.1 description of every route, built by hand from docs/protocol.md.

Hand-built rather than generated because the handlers are plain Starlette functions; a test checks
that every route of the app appears here with its methods, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

_STR = {"type": "string"}
_INT = {"type": "integer"}
_NUM = {"type": "number"}
_BOOL = {"type": "boolean"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: dict[str, Any], *, required: tuple[str, ...] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        schema["required"] = list(required)
    return schema


_COUNTS = {
    "requests": _INT,
    "input_tokens": _INT,
    "output_tokens": _INT,
    "cache_creation_input_tokens": _INT,
    "cache_read_input_tokens": _INT,
    "cost_micros": _INT,
    "cost_usd": _NUM,
    "estimated_requests": _INT,
    "repriced": _INT,
    "repriced_delta_micros": _INT,
}

_TIMEOUTS = _obj(
    {"connect_s": _NUM, "stream_first_byte_s": _NUM, "first_byte_s": _NUM, "idle_s": _NUM}
)

SCHEMAS: dict[str, Any] = {
    "KeyFailure": _obj(
        {"provider_id": _STR, "status": {"enum": [401, 403]}, "at": _NUM},
        required=("provider_id", "status", "at"),
    ),
    "Error": _obj(
        {
            "type": {"const": "error"},
            "error": _obj({"type": _STR, "message": _STR}, required=("type", "message")),
        },
        required=("type", "error"),
    ),
    "Budget": _obj(
        {
            "limit_micros": _INT,
            "period": {"enum": ["1d", "1w", "1M"]},
            "rolling": _BOOL,
        },
        required=("limit_micros", "period"),
    ),
    "TokenBudget": _obj(
        {
            "limit_tokens": _INT,
            "period": {"enum": ["1d", "1w", "1M"]},
            "rolling": _BOOL,
        },
        required=("limit_tokens", "period"),
    ),
    "Provider": _obj(
        {
            "id": _STR,
            "name": _STR,
            "kind": _STR,
            "base_url": _STR,
            "priority": _INT,
            "weight": _INT,
            "options": {"type": "object"},
            "anthropic_key_id": _nullable(_STR),
            "created_at": _NUM,
            "timeouts": _TIMEOUTS,
            "key_status": {"enum": ["ok", "failing"]},
            "key_failed_at": _nullable(_NUM),
            "key_failed_status": _nullable(_INT),
        }
    ),
    # base_url and api_key are required for the anthropic kind; a bedrock or vertex entry takes
    # no key and derives its URL from its options (docs/admin.md#provider-kinds).
    "ProviderCreate": _obj(
        {
            "name": _STR,
            "kind": {"enum": ["anthropic", "bedrock", "vertex", "foundry"]},
            "base_url": _STR,
            "api_key": {"type": "string", "writeOnly": True},
            "priority": _INT,
            "weight": _INT,
            "options": {"type": "object"},
            "anthropic_key_id": _nullable(_STR),
            "timeouts": _TIMEOUTS,
        },
        required=("name",),
    ),
    "DailyUsageRow": _obj(
        {
            "day": {"type": "string", "format": "date"},
            "model": _nullable(_STR),
            "provider": _nullable(_STR),
            "requests": _INT,
            "input_tokens": _INT,
            "output_tokens": _INT,
            "cache_creation_input_tokens": _INT,
            "cache_creation_1h_input_tokens": _INT,
            "cache_read_input_tokens": _INT,
            "web_search_requests": _INT,
            "cost_micros": _INT,
        }
    ),
    "Customer": _obj(
        {"id": _STR, "name": _STR, "budget": _nullable(_ref("Budget")), "created_at": _NUM}
    ),
    "Team": _obj(
        {
            "id": _STR,
            "name": _STR,
            "customer": _nullable(_STR),
            "budget": _nullable(_ref("Budget")),
            "repo_attribution": _BOOL,
            "session_budget_micros": _nullable(_INT),
            "session_rpm": _nullable(_INT),
            "created_at": _NUM,
        }
    ),
    "LevelCreate": _obj(
        {
            "name": _STR,
            "customer": _nullable(_STR),
            "budget": _nullable(_ref("Budget")),
            "repo_attribution": _BOOL,
            "session_budget_micros": _nullable(_INT),
            "session_rpm": _nullable(_INT),
        },
        required=("name",),
    ),
    "SeatWindow": _obj(
        {
            "utilization": _nullable(_NUM),
            "percent": _nullable(_INT),
            "resets_at": _nullable(_NUM),
            "window_reset": _BOOL,
        }
    ),
    "Seat": _obj(
        {
            "key": _STR,
            "team": _nullable(_STR),
            "device": _STR,
            "device_id": _STR,
            "observed_at": _NUM,
            "status": _STR,
            "representative_claim": _nullable(_STR),
            "five_hour": _ref("SeatWindow"),
            "seven_day": _ref("SeatWindow"),
            "requests_7d": _INT,
            "cost_micros_7d": _INT,
        }
    ),
    "TeamUpdate": _obj(
        {
            "budget": _nullable(_ref("Budget")),
            "repo_attribution": _BOOL,
            "session_budget_micros": _nullable(_INT),
            "session_rpm": _nullable(_INT),
        }
    ),
    "KeyFields": _obj(
        {
            "team": _nullable(_STR),
            "customer": _nullable(_STR),
            "budget": _nullable(_ref("Budget")),
            "models": {"type": "array", "items": _STR},
            "rpm": _nullable(_INT),
            "tpm": _nullable(_INT),
            "expires_at": _nullable(_NUM),
            "auth": {"enum": ["provider", "passthrough"]},
            "offline_grace_micros": _INT,
            "token_budget": _nullable(_ref("TokenBudget")),
            "max_devices": {"type": "integer", "minimum": 1, "maximum": 10_000},
            "ci": _BOOL,
            "repo_attribution": _BOOL,
            "session_budget_micros": _nullable(_INT),
            "session_rpm": _nullable(_INT),
            "enrolment_code": {
                "type": "boolean",
                "description": "true: issue a new one-time enrolment code (returned once).",
            },
        }
    ),
    "KeyCreate": {
        "allOf": [_ref("KeyFields"), _obj({"name": _STR}, required=("name",))],
    },
    "KeyInfo": _obj(
        {
            "id": _STR,
            "name": _STR,
            "prefix": _STR,
            "team": _nullable(_STR),
            "customer": _nullable(_STR),
            "budget": _nullable(_ref("Budget")),
            "models": {"type": "array", "items": _STR},
            "rpm": _nullable(_INT),
            "tpm": _nullable(_INT),
            "expires_at": _nullable(_NUM),
            "revoked_at": _nullable(_NUM),
            "auth": _STR,
            "offline_grace_micros": _INT,
            "token_budget": _nullable(_ref("TokenBudget")),
            "max_devices": _INT,
            "ci": _BOOL,
            "repo_attribution": _BOOL,
            "session_budget_micros": _nullable(_INT),
            "session_rpm": _nullable(_INT),
            "enrolment_code_expires_at": _nullable(_NUM),
            "enrolment_code": {"type": "string", "description": "Only when just issued."},
            "created_at": _NUM,
        }
    ),
    "CreatedKey": {
        "allOf": [_ref("KeyInfo"), _obj({"key": _STR}, required=("key",))],
        "description": "The only response that ever carries the virtual key.",
    },
    "DeviceEnrol": _obj(
        {
            "public_key": _STR,
            "name": _STR,
            "device_token": {"type": "string", "minLength": 32, "maxLength": 256},
            "enrolment_code": _STR,
        },
        required=("public_key", "name", "device_token"),
    ),
    "Enrolled": _obj(
        {
            "device_id": _STR,
            "key_id": _STR,
            "status": {"enum": ["approved", "pending"]},
            "message": _STR,
        },
        required=("device_id", "key_id", "status"),
    ),
    "Device": _obj(
        {
            "id": _STR,
            "key": _STR,
            "name": _STR,
            "status": {"enum": ["pending", "approved", "revoked"]},
            "public_key": _STR,
            "created_at": _NUM,
            "decided_at": _nullable(_NUM),
            "decided_by": _nullable(_STR),
        }
    ),
    "UsageRecord": _obj(
        {
            "id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
            "started_at": _NUM,
            "model": _nullable(_STR),
            "status": _nullable(_INT),
            "outcome": {"enum": ["ok", "upstream_error", "interrupted", "rejected"]},
            "streamed": _BOOL,
            "input_tokens": _INT,
            "output_tokens": _INT,
            "cache_creation_input_tokens": _INT,
            "cache_creation_1h_input_tokens": _INT,
            "cache_read_input_tokens": _INT,
            "web_search_requests": _INT,
            "cost_micros": _INT,
            "latency_ms": _nullable(_NUM),
            "session_id": _nullable(_STR),
            "provider": _nullable(_STR),
            "billing": _nullable(_STR),
            "lease_id": _nullable({"type": "string", "pattern": "^lse_[0-9a-f]{16}$"}),
            "price_estimated": _BOOL,
            "web_fetch_requests": _INT,
            "code_execution_requests": _INT,
            "speed": _nullable(_STR),
            "inference_geo": _nullable(_STR),
            "service_tier": _nullable(_STR),
            "iterations": _nullable(_STR),
            "stop_reason": _nullable(_STR),
            "price_version": _nullable(_STR),
            "attempts": {"type": "integer", "minimum": 1, "maximum": 1000},
            "repo": _nullable({"type": "string", "maxLength": 512}),
            "branch": _nullable({"type": "string", "maxLength": 256}),
            "quota_status": _nullable({"type": "string", "maxLength": 16}),
            "quota_claim": _nullable({"type": "string", "maxLength": 32}),
            "quota_5h_utilization": _nullable(_NUM),
            "quota_5h_reset": _nullable(_NUM),
            "quota_7d_utilization": _nullable(_NUM),
            "quota_7d_reset": _nullable(_NUM),
        },
        required=("id", "started_at"),
    ),
    "LevelSpent": _obj({"period_start": _nullable(_NUM), "spent_micros": _INT}),
    "KeySpent": {
        "allOf": [
            _ref("LevelSpent"),
            _obj(
                {"tokens": _INT},
                required=("tokens",),
            ),
        ],
        "description": "tokens: input + output + cache writes in the token budget's window.",
    },
    "LeaseRequest": _obj(
        {
            "want_micros": _INT,
            "rate_micros_per_s": _NUM,
            "return": {"type": "array", "items": _STR, "maxItems": 100},
        },
        required=("want_micros",),
    ),
    "Lease": _obj(
        {"id": _STR, "granted_micros": _INT, "expires_at": _NUM, "issued_at": _NUM},
        required=("id", "granted_micros", "expires_at", "issued_at"),
    ),
    "Limited": _obj(
        {
            "level": {"enum": ["key", "team", "customer"]},
            "name": _STR,
            "limit_micros": _INT,
            "spent_micros": _INT,
            "outstanding_micros": _INT,
            "window_start": _NUM,
            "resets": _STR,
        }
    ),
    "LeaseGrant": _obj(
        {
            "lease": _nullable(_ref("Lease")),
            "unlimited": _BOOL,
            "limited_by": _nullable(_ref("Limited")),
            "spent": _ref("Spent"),
        },
        required=("lease", "unlimited", "limited_by", "spent"),
    ),
    "Spent": _obj(
        {
            "key": _ref("KeySpent"),
            "team": _nullable(_ref("LevelSpent")),
            "customer": _nullable(_ref("LevelSpent")),
        }
    ),
    "Envelope": _obj(
        {
            "payloadType": {"const": "application/vnd.ccgate.bundle+json"},
            "payload": {"type": "string", "contentEncoding": "base64"},
            "signatures": {
                "type": "array",
                "items": _obj({"keyid": _STR, "sig": _STR}, required=("keyid", "sig")),
            },
        },
        required=("payloadType", "payload", "signatures"),
    ),
    "UsageReport": _obj(
        {
            "by": {"enum": ["key", "team", "customer", "repo"]},
            "since": _NUM,
            "rows": {
                "type": "array",
                "items": _obj(
                    {
                        "key": _nullable(_STR),
                        "team": _nullable(_STR),
                        "customer": _nullable(_STR),
                        "repo": _nullable(_STR),
                    }
                    | _COUNTS
                ),
            },
            "totals": _obj(_COUNTS),
        }
    ),
    "Prices": _obj(
        {
            "prices": _nullable({"type": "object"}),
            "updated_at": _nullable(_NUM),
            "repriced": _obj({"rows": _INT, "before_micros": _INT, "after_micros": _INT}),
        },
        required=("prices", "updated_at"),
    ),
    "AuditEntry": _obj(
        {"at": _NUM, "actor": _STR, "action": _STR, "target": _STR, "detail": {"type": "object"}}
    ),
    "AlertCreate": _obj(
        {
            "kind": {"enum": ["budget", "stale", "provider"]},
            "scope": _STR,
            "at": {"type": "array", "items": _INT},
            "stale_hours": _NUM,
            "webhook": _STR,
            "format": {"enum": ["json", "slack"]},
        },
        required=("scope", "webhook"),
    ),
    "Alert": _obj(
        {
            "id": _STR,
            "kind": _STR,
            "scope": _STR,
            "at": {"type": "array", "items": _INT},
            "stale_hours": _nullable(_NUM),
            "format": _STR,
            "webhook": _STR,
            "created_at": _NUM,
            "sent": _INT,
            "pending": _INT,
            "failed": _INT,
            "last": _nullable({"type": "object"}),
        }
    ),
    "Chargeback": _obj(
        {
            "period": _STR,
            "by": {"enum": ["customer", "team", "key", "model"]},
            "start": _NUM,
            "end": _NUM,
            "rows": {"type": "array", "items": {"type": "object"}},
            "totals": {"type": "object"},
            "price_tables": {
                "type": "array",
                "items": _obj(
                    {
                        "source": {"enum": ["override", "shipped"]},
                        "version": _STR,
                        "from": _NUM,
                        "until": _NUM,
                    }
                ),
            },
        }
    ),
    "AdminTokenInfo": _obj(
        {
            "id": _STR,
            "name": _STR,
            "role": {"enum": ["admin", "viewer", "metrics"]},
            "prefix": _STR,
            "created_at": _NUM,
            "revoked_at": _nullable(_NUM),
        }
    ),
}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _op(
    summary: str,
    *,
    ok: dict[str, Any],
    status: str = "200",
    body: dict[str, Any] | None = None,
    security: str | None = None,
    params: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    responses: dict[str, Any] = {status: {"description": "Success", **_json_content(ok)}}
    error = {"description": "Error envelope", **_json_content(_ref("Error"))}
    responses["default"] = error
    responses.update(extra or {})
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": True, **_json_content(body)}
    if security:
        op["security"] = [{security: []}]
    if params:
        op["parameters"] = params
    return op


def _param(name: str, where: str, schema: dict[str, Any], *, required: bool) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "schema": schema}


_DEVICE = _param("x-ccgate-device", "header", _STR, required=True)
_DEVICE_TOKEN = _param("x-ccgate-device-token", "header", _STR, required=True)
_NAME = _param("name", "path", _STR, required=True)
_DEVICE_ID = _param("device_id", "path", _STR, required=True)


def _list(key: str, item: str) -> dict[str, Any]:
    return _obj({key: {"type": "array", "items": _ref(item)}})


def _collection(
    listing: tuple[str, str], listed: str, created: str, *, body: str, returns: str | None = None
) -> dict[str, Any]:
    """An admin collection: GET lists it as ``{key: [item...]}``, POST creates one (201)."""
    key, item = listing
    return {
        "get": _op(listed, ok=_list(key, item), security="adminToken"),
        "post": _op(
            created, ok=_ref(returns or item), status="201", body=_ref(body), security="adminToken"
        ),
    }


def _public_paths() -> dict[str, Any]:
    key = "virtualKey"
    return {
        "/healthz": {
            "get": _op("Liveness", ok=_obj({"status": _STR, "version": _STR})),
        },
        "/openapi.json": {"get": _op("This document", ok={"type": "object"})},
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text format); any admin token, or one with the "
                "metrics role, which can read nothing else",
                "security": [{"adminToken": []}],
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format",
                        "content": {"text/plain": {"schema": _STR}},
                    },
                    "default": {"description": "Error envelope", **_json_content(_ref("Error"))},
                },
            }
        },
        "/v1/server-key": {
            "get": _op(
                "The server's Ed25519 public key and fingerprint",
                ok=_obj(
                    {"public_key": _STR, "fingerprint": _STR, "algorithm": {"const": "ed25519"}}
                ),
            )
        },
        "/v1/devices": {
            "post": _op(
                "Enrol a device's X25519 public key and device token for the virtual key: 201 "
                "approved (first device, enrolment code, CI key), 202 pending approval, 403 at "
                "the key's device limit",
                ok=_ref("Enrolled"),
                status="201",
                body=_ref("DeviceEnrol"),
                security=key,
                extra={
                    "202": {
                        "description": "Enrolled, waiting for `ccgate admin devices approve`",
                        **_json_content(_ref("Enrolled")),
                    }
                },
            )
        },
        "/v1/bundle": {
            "get": _op(
                'The signed policy bundle for this key and device (ETag "v<version>")',
                ok=_ref("Envelope"),
                security=key,
                params=[
                    _DEVICE,
                    _DEVICE_TOKEN,
                    _param("if-none-match", "header", _STR, required=False),
                ],
                extra={"304": {"description": "Unchanged since the ETag given"}},
            )
        },
        "/v1/usage": {
            "post": _op(
                "Push usage records (at most 1,000; each id is kept once) and read spend",
                ok=_obj({"accepted": _INT, "duplicates": _INT, "spent": _ref("Spent")}),
                body=_obj(
                    {
                        "records": {"type": "array", "items": _ref("UsageRecord")},
                        "key_failures": {"type": "array", "items": _ref("KeyFailure")},
                    }
                ),
                security=key,
                params=[_DEVICE, _DEVICE_TOKEN],
            )
        },
        "/v1/leases": {
            "post": _op(
                "Return the leases listed, then grant a slice of every budget level's remainder",
                ok=_ref("LeaseGrant"),
                body=_ref("LeaseRequest"),
                security=key,
                params=[_DEVICE, _DEVICE_TOKEN],
            )
        },
        "/v1/leases/{lease_id}/return": {
            "post": _op(
                "Return a lease (idempotent): what it did not use goes back to the budget",
                ok=_obj({"returned": {"const": True}, "used_micros": _INT}),
                body={"type": "object"},
                security=key,
                params=[_DEVICE, _DEVICE_TOKEN, _param("lease_id", "path", _STR, required=True)],
            )
        },
    }


def _admin_paths() -> dict[str, Any]:
    adm = "adminToken"
    p = "/admin/v1"
    return {
        f"{p}/providers": _collection(
            ("providers", "Provider"),
            "List providers (never a key)",
            "Add a provider entry; several under one name form a pool",
            body="ProviderCreate",
        ),
        f"{p}/providers/{{name}}": {
            "delete": _op(
                "Remove a provider pool, or one entry of it with ?id=",
                ok=_obj({"removed": _INT}),
                security=adm,
                params=[_NAME, _param("id", "query", _STR, required=False)],
            ),
            "patch": _op(
                "Record (or clear with null) the Anthropic API key id of a provider entry; "
                "?id= names the entry when the pool has several",
                ok=_ref("Provider"),
                body=_obj({"anthropic_key_id": _nullable(_STR)}, required=("anthropic_key_id",)),
                security=adm,
                params=[_NAME, _param("id", "query", _STR, required=False)],
            ),
        },
        f"{p}/customers": _collection(
            ("customers", "Customer"),
            "List customers",
            "Create a customer",
            returns="Customer",
            body="LevelCreate",
        ),
        f"{p}/teams": _collection(
            ("teams", "Team"), "List teams", "Create a team", returns="Team", body="LevelCreate"
        ),
        f"{p}/teams/{{name}}": {
            "patch": _op(
                "Update a team: only the fields given change",
                ok=_ref("Team"),
                body=_ref("TeamUpdate"),
                security=adm,
                params=[_NAME],
            ),
        },
        f"{p}/keys": _collection(
            ("keys", "KeyInfo"),
            "List virtual keys",
            "Create a virtual key (returned once)",
            returns="CreatedKey",
            body="KeyCreate",
        ),
        f"{p}/keys/{{name}}": {
            "get": _op("Show a key", ok=_ref("KeyInfo"), security=adm, params=[_NAME]),
            "patch": _op(
                "Update a key",
                ok=_ref("KeyInfo"),
                body=_ref("KeyFields"),
                security=adm,
                params=[_NAME],
            ),
        },
        f"{p}/keys/{{name}}/revoke": {
            "post": _op("Revoke a key", ok=_ref("KeyInfo"), security=adm, params=[_NAME]),
        },
        f"{p}/prices": {
            "get": _op("The price table override (null: none)", ok=_ref("Prices"), security=adm),
            "put": _op(
                "Set the price table override that bundles carry",
                ok=_ref("Prices"),
                body=_obj({"prices": {"type": "object"}}, required=("prices",)),
                security=adm,
            ),
            "delete": _op("Remove the price table override", ok=_ref("Prices"), security=adm),
        },
        f"{p}/seats": {
            "get": _op(
                "Per key and device: the seat plan's latest 5-hour and 7-day quota "
                "(passthrough logins), fullest first",
                ok=_obj({"now": _NUM, "seats": {"type": "array", "items": _ref("Seat")}}),
                security=adm,
            )
        },
        f"{p}/usage/daily": {
            "get": _op(
                "Totals per UTC day, model and provider pool for since <= started_at < until, "
                "provider-billed requests only (for reconciliation)",
                ok=_obj(
                    {
                        "since": _NUM,
                        "until": _NUM,
                        "rows": {"type": "array", "items": _ref("DailyUsageRow")},
                    }
                ),
                security=adm,
                params=[
                    _param("since", "query", _NUM, required=True),
                    _param("until", "query", _NUM, required=True),
                ],
            )
        },
        f"{p}/usage": {
            "get": _op(
                "Usage rollup by key, team or customer",
                ok=_ref("UsageReport"),
                security=adm,
                params=[
                    _param(
                        "by", "query", {"enum": ["key", "team", "customer", "repo"]}, required=False
                    ),
                    _param("since", "query", _NUM, required=False),
                ],
            )
        },
        f"{p}/alerts": _collection(
            ("alerts", "Alert"),
            "Alert rules with their deliveries (sent, pending, failed, the last one)",
            "Add a webhook alert: budget thresholds, a stale device or a failing provider",
            body="AlertCreate",
        ),
        f"{p}/alerts/{{alert_id}}": {
            "delete": _op(
                "Remove an alert rule and its outbox",
                ok=_obj({"removed": _INT}),
                security=adm,
                params=[_param("alert_id", "path", _STR, required=True)],
            ),
        },
        f"{p}/report": {
            "get": _op(
                "Chargeback for a calendar month (UTC); format=csv answers text/csv",
                ok=_ref("Chargeback"),
                security=adm,
                params=[
                    _param("period", "query", _STR, required=False),
                    _param(
                        "by",
                        "query",
                        {"enum": ["customer", "team", "key", "model"]},
                        required=False,
                    ),
                    _param("format", "query", {"enum": ["json", "csv"]}, required=False),
                ],
            )
        },
        f"{p}/tokens": {
            "get": _op(
                "List admin tokens and their roles (never a token)",
                ok=_list("tokens", "AdminTokenInfo"),
                security=adm,
            ),
            "post": _op(
                "Create an admin or viewer token (returned once, in 'token')",
                ok=_ref("AdminTokenInfo"),
                status="201",
                body=_obj(
                    {"name": _STR, "role": {"enum": ["admin", "viewer", "metrics"]}},
                    required=("name",),
                ),
                security=adm,
            ),
        },
        f"{p}/tokens/{{name}}/revoke": {
            "post": _op(
                "Revoke an admin token (never the last admin)",
                ok=_ref("AdminTokenInfo"),
                security=adm,
                params=[_NAME],
            ),
        },
        f"{p}/audit": {
            "get": _op(
                "Recent audit entries, oldest first",
                ok=_obj({"entries": {"type": "array", "items": _ref("AuditEntry")}}),
                security=adm,
                params=[_param("limit", "query", _INT, required=False)],
            )
        },
        f"{p}/devices": {
            "get": _op(
                "Enrolled devices, oldest first; ?key= and ?status= filter",
                ok=_list("devices", "Device"),
                security=adm,
                params=[
                    _param("key", "query", _STR, required=False),
                    _param(
                        "status",
                        "query",
                        {"enum": ["pending", "approved", "revoked"]},
                        required=False,
                    ),
                ],
            )
        },
        f"{p}/devices/{{device_id}}/approve": {
            "post": _op(
                "Approve a pending device (409 at the key's limit or when revoked)",
                ok=_ref("Device"),
                security=adm,
                params=[_DEVICE_ID],
            )
        },
        f"{p}/devices/{{device_id}}/revoke": {
            "post": _op(
                "Revoke a device: it gets no bundle, usage or lease from now on",
                ok=_ref("Device"),
                security=adm,
                params=[_DEVICE_ID],
            )
        },
    }


def document(*, version: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ccgate server",
            "version": version,
            "description": "Virtual keys, signed policy bundles and usage for ccgate daemons.",
        },
        "paths": _public_paths() | _admin_paths(),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "virtualKey": {"type": "http", "scheme": "bearer", "description": "sk-cg-..."},
                "adminToken": {"type": "http", "scheme": "bearer", "description": "cga-..."},
            },
        },
    }
