"""What the cloud provider kinds share: the model table, body rewriting, Anthropic envelopes."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import AsyncIterator, Mapping
from importlib import resources
from typing import Any, Final

from ccgate.gateway.providers import LocalAnswer, ProviderError, Upstream

_DATED = re.compile(r"(?P<id>.+)-(?P<date>20\d{6})")


@functools.cache
def shipped_models(kind: str) -> Mapping[str, str]:
    """The shipped table for ``kind`` (ccgate/data/cloud_models.json)."""
    text = resources.files("ccgate").joinpath("data/cloud_models.json").read_text("utf-8")
    table: dict[str, str] = json.loads(text)[kind]
    return table


def model_table(kind: str, upstream: Upstream) -> dict[str, str]:
    """The shipped table with the provider's ``models`` option over it."""
    overrides = upstream.options.get("models") or {}
    return {**shipped_models(kind), **overrides}


def dumps(payload: Any) -> bytes:
    """Compact JSON, as Anthropic's API writes it."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def json_body(forward_body: bytes) -> dict[str, Any]:
    try:
        body = json.loads(forward_body) if forward_body else {}
    except ValueError:
        body = None
    if not isinstance(body, dict):
        # The gateway already refused bodies that are not JSON objects; this is a safety net.
        raise ProviderError(400, "invalid_request_error", "The request body must be a JSON object.")
    return body


def beta_header(headers: list[tuple[bytes, bytes]]) -> list[str]:
    """The ``anthropic-beta`` values the client sent, in order (the header may repeat)."""
    betas: list[str] = []
    for name, value in headers:
        if name.lower() == b"anthropic-beta":
            betas.extend(b.strip() for b in value.decode("latin-1").split(",") if b.strip())
    return betas


def header(headers: list[tuple[bytes, bytes]], wanted: bytes) -> str | None:
    for name, value in headers:
        if name.lower() == wanted:
            return value.decode("latin-1")
    return None


def strip_1m(model: str) -> str:
    # Claude Code's "[1m]" selector asks for the long context window through a beta header, and
    # is never part of a provider's model id.
    return model[: -len("[1m]")] if model.lower().endswith("[1m]") else model


def vertex_style(model: str) -> str:
    """``claude-x-20250101`` as Vertex writes it (``claude-x@20250101``)."""
    dated = _DATED.fullmatch(model)
    return f"{dated['id']}@{dated['date']}" if dated else model


def models_answer(path: str, ids: Mapping[str, str], *, provider: str) -> LocalAnswer:
    """``/v1/models`` (or one model) answered from the model table, in Anthropic's shape."""
    entries = [
        {
            "type": "model",
            "id": claude_id,
            "display_name": claude_id,
            "created_at": "1970-01-01T00:00:00Z",
            "ccgate_provider_model_id": provider_id,
        }
        for claude_id, provider_id in sorted(ids.items())
    ]
    if path == "/v1/models":
        return LocalAnswer(
            200,
            {
                "data": entries,
                "has_more": False,
                "first_id": entries[0]["id"] if entries else None,
                "last_id": entries[-1]["id"] if entries else None,
            },
        )
    wanted = path.rsplit("/", 1)[-1]
    for entry in entries:
        if entry["id"] == wanted:
            return LocalAnswer(200, entry)
    raise ProviderError(
        404,
        "not_found_error",
        f"Provider {provider!r} has no model {wanted!r} in ccgate's model table; an admin can "
        "add one with the provider's models option.",
    )


def error_envelope(error_type: str, message: str, request_id: str | None) -> bytes:
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type, "message": message}}
    if request_id:
        body["request_id"] = request_id
    return dumps(body)


async def once(make: Any) -> AsyncIterator[bytes]:
    """An iterator of the one chunk ``await make()`` returns (a body that must be read whole)."""
    yield await make()


ERROR_HEADERS: Final = (b"content-type", b"application/json")
