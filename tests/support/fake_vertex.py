"""A fake Google Vertex AI (Anthropic publisher) with the OAuth token endpoint in front of it.

``service_account(path)`` writes a real service-account key file (a fresh RSA key) whose
``token_uri`` points at this fake, so google-auth runs for real: it signs a JWT assertion, the
fake's ``POST /token`` checks that signature with the key's public half and the claims (issuer,
audience, the cloud-platform scope), and issues an access token. The API then accepts only a
``Bearer`` token it issued.

``POST /v1/projects/{project}/locations/{location}/publishers/anthropic/models/{model}:rawPredict``
(``:streamRawPredict``) must carry a Vertex body (``anthropic_version: "vertex-2023-10-16"``, no
``model``; ``stream`` matching the method) and answers as Anthropic does, through the same
scenarios and wire format as fake_upstream.py (Vertex streams are Anthropic SSE).
``count-tokens:rawPredict`` counts. Google's own errors (a bad token, an unknown project, a 429)
are Google-shaped: ``{"error": {"code", "message", "status"}}``.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.support.fake_upstream import (
    FakeUpstream,
    ReceivedRequest,
    _App,
    _count_tokens,
    _Exchange,
    _messages,
    new_id,
)
from tests.support.fake_upstream import (
    _answer as _anthropic_answer,
)

PROJECT = "ccgate-test-project"
LOCATION = "us-east5"
ANTHROPIC_VERSION = "vertex-2023-10-16"
# The newest anthropic SDK sends Anthropic's dated API version in the body on Vertex too.
ACCEPTED_VERSIONS = (ANTHROPIC_VERSION, "2026-10-21")
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
CLIENT_EMAIL = "ccgate-tests@ccgate-test-project.iam.gserviceaccount.com"
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"

_ROUTE = re.compile(
    r"/v1/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/publishers/anthropic/"
    r"models/(?P<model>[^/:]+):(?P<method>rawPredict|streamRawPredict)"
)
_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
}


def _b64url(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


class _VertexApp(_App):
    def __init__(self, owner: FakeVertex) -> None:
        super().__init__(owner)
        self._vertex = owner

    async def _route(self, request: ReceivedRequest, exchange: _Exchange) -> None:
        fake = self._vertex
        if request.method == "POST" and request.path == "/token":
            await self._token(request, exchange)
            return
        route = _ROUTE.fullmatch(request.path)
        if request.method != "POST" or route is None:
            await _google_error(exchange, 404, "The requested URL was not found.")
            return
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in fake.issued:
            await _google_error(
                exchange,
                401,
                "Request had invalid authentication credentials. Expected OAuth 2 "
                "access token, login cookie or other valid authentication credential.",
            )
            return
        if (route["project"], route["location"]) != (fake.project, fake.location):
            await _google_error(
                exchange,
                403,
                f"Permission denied on resource project {route['project']} (or it may not exist).",
            )
            return
        body = request.json
        if not isinstance(body, dict):
            await _google_error(exchange, 400, "Invalid JSON payload received.")
            return
        if route["model"] == "count-tokens":
            await _count_tokens(request, fake._next_scenario(), exchange, new_id("req_vrtx_"))
            return
        problem = _validation_problem(body, streamed=route["method"] == "streamRawPredict")
        if problem is not None:
            await _anthropic_400(exchange, problem)
            return
        scenario = fake._next_scenario()
        if scenario.status == 429:
            await _google_error(
                exchange,
                429,
                "Quota exceeded for aiplatform.googleapis.com/"
                "online_prediction_requests_per_base_model.",
            )
            return
        # The fake Anthropic answers with the model of the body; Vertex's is in the URL.
        shaped = ReceivedRequest(
            method=request.method,
            path="/v1/messages",
            query="",
            headers=request.headers,
            body=request.body,
            json={**body, "model": route["model"].split("@")[0]},
        )
        await _anthropic_answer(shaped, scenario, exchange, _messages)

    async def _token(self, request: ReceivedRequest, exchange: _Exchange) -> None:
        form = {k: v[0] for k, v in parse_qs(request.body.decode()).items()}
        problem = self._vertex.assertion_problem(form)
        if problem is not None:
            data = json.dumps({"error": "invalid_grant", "error_description": problem}).encode()
            await exchange.start(400, [("content-type", "application/json")])
            await exchange.body(data, more=False)
            return
        token = "ya29.fake-" + secrets.token_urlsafe(24)
        self._vertex.issued.append(token)
        data = json.dumps(
            {
                "access_token": token,
                "expires_in": self._vertex.token_lifetime_s,
                "token_type": "Bearer",
            }
        ).encode()
        await exchange.start(200, [("content-type", "application/json")])
        await exchange.body(data, more=False)


def _validation_problem(body: dict[str, Any], *, streamed: bool) -> str | None:
    if "model" in body:
        return "model: Extra inputs are not permitted"
    if body.get("anthropic_version") not in ACCEPTED_VERSIONS:
        return f"anthropic_version: Input should be '{ANTHROPIC_VERSION}'"
    if (body.get("stream") is True) != streamed:
        return "stream: must match the method (streamRawPredict streams, rawPredict does not)"
    return None


async def _google_error(exchange: _Exchange, code: int, message: str) -> None:
    payload = {"error": {"code": code, "message": message, "status": _STATUS.get(code, "UNKNOWN")}}
    data = json.dumps(payload).encode()
    await exchange.start(code, [("content-type", "application/json; charset=UTF-8")])
    await exchange.body(data, more=False)


async def _anthropic_400(exchange: _Exchange, message: str) -> None:
    payload = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    data = json.dumps(payload).encode()
    await exchange.start(400, [("content-type", "application/json")])
    await exchange.body(data, more=False)


class FakeVertex(FakeUpstream):
    """The fake Vertex AI and its token endpoint, served like FakeUpstream."""

    def __init__(self, *, project: str = PROJECT, location: str = LOCATION) -> None:
        super().__init__(require_key=False)
        self.project = project
        self.location = location
        self.issued: list[str] = []
        self.token_lifetime_s = 3600
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def service_account(self, path: Path, *, token_uri: str | None = None) -> Path:
        """Write a service-account key file for this fake to ``path`` (0600) and return it."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        info = {
            "type": "service_account",
            "project_id": self.project,
            "private_key_id": "fakekeyid0001",
            "private_key": pem,
            "client_email": CLIENT_EMAIL,
            "client_id": "100000000000000000001",
            "token_uri": token_uri or self.token_uri,
        }
        path.write_text(json.dumps(info))
        path.chmod(0o600)
        return path

    def assertion_problem(self, form: dict[str, str]) -> str | None:
        """None if ``form`` is a JWT-bearer grant signed by this fake's service account."""
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return "unsupported grant_type"
        try:
            head, claims_part, signature = form["assertion"].split(".")
            claims = json.loads(_b64url(claims_part))
            self._key.public_key().verify(
                _b64url(signature),
                f"{head}.{claims_part}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except Exception as exc:
            return f"Invalid JWT Signature ({type(exc).__name__})."
        # google-auth always names Google's token endpoint as the audience, whatever token_uri.
        if claims.get("iss") != CLIENT_EMAIL or claims.get("aud") != GOOGLE_TOKEN_AUDIENCE:
            return "Invalid JWT: iss or aud"
        if SCOPE not in str(claims.get("scope", "")).split():
            return "Invalid JWT: scope"
        if not claims.get("iat", 0) <= time.time() + 60 < claims.get("exp", 0) + 60:
            return "Invalid JWT: Token must be a short-lived token"
        return None

    def _make_app(self) -> _App:
        return _VertexApp(self)

    def reset(self) -> None:
        super().reset()
        self.issued.clear()
