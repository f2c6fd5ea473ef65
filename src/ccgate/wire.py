"""What the gateway, the server and the CLI must agree on byte for byte, in one place.

The error envelope is Anthropic's (``{"type": "error", "error": {...}}``): the daemon's own
refusals and every server error use it, so one client parses both. The virtual key prefix and
the ledger's restart outcome are read on both sides of a sync. This module is part of the base
layer: it imports no ccgate subpackage, so the server can use it without loading the gateway.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    # starlette costs 15 ms to import, and the CLI reads this module for its constants.
    from starlette.responses import Response

CLIENT_KEY_PREFIX: Final = "sk-cg-"
"""Every virtual key and local client key starts with this."""

HEALTH_PATH: Final = "/_ccgate/health"
"""The daemon's health endpoint, which `ccgate status` and `up` ask."""

INTERRUPTED_BY_RESTART: Final = "daemon stopped before the request finished"
"""The error of a ledger row that was still in flight when its daemon stopped."""


def error_body(err_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": err_type, "message": message}}


def error_response(
    status: int,
    err_type: str,
    message: str,
    *,
    should_retry: bool | None = None,
    retry_after: int | None = None,
) -> Response:
    headers: dict[str, str] = {}
    if should_retry is not None:
        headers["x-should-retry"] = "true" if should_retry else "false"
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    from starlette.responses import JSONResponse

    return JSONResponse(error_body(err_type, message), status_code=status, headers=headers)
