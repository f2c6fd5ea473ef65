"""Google Vertex AI: rawPredict and streamRawPredict, with a Google OAuth access token.

``POST /v1/messages`` goes to ``{base_url}/v1/projects/{project}/locations/{location}/publishers/
anthropic/models/{model}:rawPredict`` (``:streamRawPredict`` when the body says ``stream: true``)
with the Messages body minus ``model``, plus ``anthropic_version: "vertex-2023-10-16"``: the shape
the anthropic SDK's Vertex client sends. ``anthropic-beta`` stays a header, as it does there.
``count_tokens`` goes to the ``count-tokens:rawPredict`` model; ``/v1/models`` is answered from
the model table. The base URL is ``https://{location}-aiplatform.googleapis.com``, or
``https://aiplatform.googleapis.com`` for the ``global`` location.

Model ids come from the model table (Vertex writes dated ids ``claude-x@20250101``; newer models
have none), extended by the provider's ``models`` option. Answers are Anthropic's wire format
already: streams pass through untouched. Vertex's own errors (Google's ``{"error": {"code",
"status", "message"}}``) are turned into Anthropic's envelope.

Credentials come from google-auth's application-default chain (``GOOGLE_APPLICATION_CREDENTIALS``
service-account JSON, ``gcloud auth application-default login``, the metadata server). The token
is fetched and refreshed in a worker thread by ``prepare`` and reused until five minutes before it
expires; google-auth is imported only here, the first time a Vertex provider is used.
"""

from __future__ import annotations

import datetime
import json
import threading
import urllib.parse
from typing import Any, Final

import anyio
import httpx

from ccgate.gateway.providers import (
    Forward,
    ProviderError,
    Reply,
    Upstream,
    _cloud,
    forwarded_headers,
    register,
)

ANTHROPIC_VERSION: Final = "vertex-2023-10-16"
SCOPE: Final = "https://www.googleapis.com/auth/cloud-platform"
REFRESH_BEFORE_S: Final = 300.0
_MISSING_GOOGLE_AUTH: Final = (
    "ccgate needs google-auth to authenticate to Google Vertex AI; install it with "
    "`pip install 'ccgate[vertex]'` and restart the daemon."
)
_GOOGLE_ERRORS: Final[dict[int, tuple[int, str]]] = {
    400: (400, "invalid_request_error"),
    401: (401, "authentication_error"),
    403: (403, "permission_error"),
    404: (404, "not_found_error"),
    413: (413, "request_too_large"),
    429: (429, "rate_limit_error"),
    503: (529, "overloaded_error"),
    504: (504, "timeout_error"),
    529: (529, "overloaded_error"),
}


def model_id(model: str, upstream: Upstream) -> str:
    model = _cloud.strip_1m(model)
    if "@" in model:
        return model
    table = _cloud.model_table("vertex", upstream)
    return table.get(model) or _cloud.vertex_style(model)


class _Token:
    """One access token from the application-default credentials, refreshed off the loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._credentials: Any = None
        self._token: str | None = None
        self._expires_at: datetime.datetime | None = None
        self.quota_project: str | None = None

    def current(self, *, now: datetime.datetime | None = None) -> str | None:
        token, expires_at = self._token, self._expires_at
        if token is None:
            return None
        now = now or _utcnow()
        if expires_at is not None and (expires_at - now).total_seconds() < REFRESH_BEFORE_S:
            return None
        return token

    def refresh(self, *, provider: str) -> str:
        """Blocking (an HTTPS round trip to Google's token endpoint): call in a thread."""
        try:
            import google.auth
            import google.auth.exceptions
            import google.auth.transport.requests
        except ImportError:
            raise ProviderError(502, "api_error", _MISSING_GOOGLE_AUTH) from None
        with self._lock:
            token = self.current()
            if token is not None:
                return token  # another request refreshed it while this one waited
            try:
                if self._credentials is None:
                    self._credentials, _ = google.auth.default(scopes=[SCOPE])
                credentials = self._credentials
                credentials.refresh(google.auth.transport.requests.Request())
            except google.auth.exceptions.GoogleAuthError as exc:
                raise ProviderError(
                    502,
                    "api_error",
                    f"ccgate cannot get a Google access token for provider {provider!r} "
                    f"({type(exc).__name__}: {exc}). Set GOOGLE_APPLICATION_CREDENTIALS to a "
                    "service-account key file, or run `gcloud auth application-default login`.",
                ) from None
            if not credentials.token:
                raise ProviderError(502, "api_error", "Google's token endpoint gave no token.")
            self._token = str(credentials.token)
            expiry = credentials.expiry
            self._expires_at = expiry.replace(tzinfo=datetime.UTC) if expiry else None
            self.quota_project = getattr(credentials, "quota_project_id", None)
            return self._token


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class VertexAdapter:
    kind = "vertex"

    def __init__(self) -> None:
        self.token = _Token()

    async def prepare(self, upstream: Upstream) -> None:
        if self.token.current() is None:
            await anyio.to_thread.run_sync(lambda: self.token.refresh(provider=upstream.provider))

    def request(self, upstream: Upstream, forward: Forward) -> httpx.Request:
        path = forward.path
        if path.startswith("/v1/models"):
            ids = {m: model_id(m, upstream) for m in _cloud.model_table("vertex", upstream)}
            raise _cloud.models_answer(path, ids, provider=upstream.provider)
        if path not in ("/v1/messages", "/v1/messages/count_tokens") or forward.method != "POST":
            raise ProviderError(
                404, "not_found_error", f"Google Vertex AI has no equivalent of {path}."
            )
        body = _cloud.json_body(forward.body)
        project = upstream.options["project"]
        location = upstream.options["location"]
        base = (
            f"{upstream.base_url.rstrip('/')}/v1/projects/{_seg(project)}"
            f"/locations/{_seg(location)}/publishers/anthropic/models"
        )
        if path == "/v1/messages/count_tokens":
            model = body.get("model")
            if isinstance(model, str):
                body["model"] = model_id(model, upstream)
            url, accept = f"{base}/count-tokens:rawPredict", "application/json"
        else:
            model = body.pop("model", None) or forward.model
            if not isinstance(model, str) or not model:
                raise ProviderError(400, "invalid_request_error", "model: field required")
            specifier = "streamRawPredict" if forward.streamed else "rawPredict"
            url = f"{base}/{_seg(model_id(model, upstream))}:{specifier}"
            accept = "text/event-stream" if forward.streamed else "application/json"
        body.setdefault("anthropic_version", ANTHROPIC_VERSION)
        token = self.token.current() or self.token.refresh(provider=upstream.provider)
        headers = [
            ("content-type", "application/json"),
            ("accept", accept),
            ("authorization", f"Bearer {token}"),
        ]
        if self.token.quota_project:
            headers.append(("x-goog-user-project", self.token.quota_project))
        for name in (b"anthropic-beta", b"user-agent", b"accept-encoding"):
            value = _cloud.header(forward.headers, name)
            if value:
                headers.append((name.decode(), value))
        return httpx.Request("POST", url, headers=headers, content=_cloud.dumps(body))

    def reply(self, response: httpx.Response, *, streamed: bool) -> Reply:
        if response.status_code < 400:
            # Anthropic's wire format already: passed through still compressed, as the
            # anthropic kind does.
            return Reply(response.status_code, forwarded_headers(response), response.aiter_raw())
        request_id = response.headers.get("request-id") or response.headers.get("x-request-id")
        status, error_type = _GOOGLE_ERRORS.get(response.status_code, (502, "api_error"))
        if response.status_code == 500:
            status = 500
        headers = [
            h
            for h in forwarded_headers(response)
            if h[0] not in (b"content-type", b"content-length", b"content-encoding")
        ]

        async def body() -> bytes:
            raw = await response.aread()
            try:
                parsed: Any = json.loads(raw)
            except ValueError:
                parsed = None
            if isinstance(parsed, list) and parsed:
                parsed = parsed[0]  # Vertex sometimes wraps the error in a one-item list
            if isinstance(parsed, dict) and parsed.get("type") == "error":
                return _cloud.dumps(parsed)  # Anthropic's own envelope, from the model
            error = parsed.get("error") if isinstance(parsed, dict) else None
            message = error.get("message") if isinstance(error, dict) else None
            if not isinstance(message, str) or not message:
                message = f"Google Vertex AI answered HTTP {response.status_code}."
            return _cloud.error_envelope(error_type, message, request_id)

        return Reply(status, [*headers, _cloud.ERROR_HEADERS], _cloud.once(body))


def _seg(value: str) -> str:
    return urllib.parse.quote(value, safe="@.-_")


VERTEX: Final = VertexAdapter()
register(VERTEX)
