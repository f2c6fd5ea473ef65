"""Amazon Bedrock: InvokeModel and InvokeModelWithResponseStream, signed with SigV4.

``POST /v1/messages`` goes to ``{base_url}/model/{modelId}/invoke`` (or
``/invoke-with-response-stream`` when the body says ``stream: true``), with the Messages body
minus ``model`` and ``stream``, plus ``anthropic_version: "bedrock-2023-05-31"`` and the
client's ``anthropic-beta`` values as ``anthropic_beta``: the shape the anthropic SDK's Bedrock
client sends. ``count_tokens`` goes to Bedrock's CountTokens (``/model/{modelId}/count-tokens``)
and ``/v1/models`` is answered from the model table, since Bedrock's runtime has no model list.

The model id comes from the model table (ccgate/data/cloud_models.json, extended by the
provider's ``models`` option) with the ``profile_prefix`` option in front (``us.`` ...
``global.``): an inference profile. The answer names that id as its ``model``, so the ledger
shows which deployment served and prices it (regional ids carry the +10% of 4.5-and-later
models; ``global.`` ones do not).

Requests are signed by botocore's SigV4 signer with credentials from the standard AWS chain
(environment, shared config and credentials files, the ``aws_profile`` option, SSO, container
and instance roles), resolved and refreshed in a worker thread by ``prepare``. botocore is
imported only here, the first time a Bedrock provider is used. A Bedrock API key in
``AWS_BEARER_TOKEN_BEDROCK`` (as the AWS SDKs and Claude Code read it) is sent as a bearer token
instead of a signature.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import threading
import urllib.parse
from collections.abc import AsyncIterator
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
from ccgate.gateway.providers.eventstream import StreamTranslator, aws_error

ANTHROPIC_VERSION: Final = "bedrock-2023-05-31"
SIGNING_NAME: Final = "bedrock"
BEARER_TOKEN_ENV: Final = "AWS_BEARER_TOKEN_BEDROCK"
_MISSING_BOTOCORE: Final = (
    "ccgate needs botocore to sign requests to Amazon Bedrock; install it with "
    "`pip install 'ccgate[bedrock]'` (or `pip install botocore`) and restart the daemon."
)
# Response headers that describe Bedrock's framing, not the answer the client gets.
_REFRAMED: Final = frozenset({b"content-type", b"content-length", b"content-encoding"})


def model_id(model: str, upstream: Upstream) -> str:
    """The Bedrock model (or inference profile) id ``model`` is sent as."""
    model = _cloud.strip_1m(model)
    if model.startswith("arn:") or "anthropic." in model:
        return model  # already a Bedrock id or ARN: the client chose the deployment itself
    table = _cloud.model_table("bedrock", upstream)
    mapped = table.get(model, f"anthropic.{model}")
    prefix = upstream.options.get("profile_prefix")
    if prefix and mapped.startswith("anthropic."):
        mapped = f"{prefix}.{mapped}"
    return mapped


class _Credentials:
    """The AWS chain's credentials for one profile, resolved off the event loop and cached."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._resolved: dict[str | None, Any] = {}  # profile -> botocore Credentials
        self._frozen: dict[str | None, Any] = {}  # profile -> ReadOnlyCredentials

    def current(self, profile: str | None) -> Any | None:
        creds = self._resolved.get(profile)
        if creds is None:
            return None
        refresh_needed = getattr(creds, "refresh_needed", None)
        if refresh_needed is not None and refresh_needed():
            return None
        return self._frozen.get(profile)

    def resolve(self, profile: str | None, *, provider: str) -> Any:
        """Blocking (the chain may read files or ask a metadata endpoint): call in a thread."""
        try:
            import botocore.exceptions
            import botocore.session
        except ImportError:
            raise ProviderError(502, "api_error", _MISSING_BOTOCORE) from None
        with self._lock:
            try:
                creds = self._resolved.get(profile)
                if creds is None:
                    creds = botocore.session.Session(profile=profile).get_credentials()
                frozen = creds.get_frozen_credentials() if creds is not None else None
            except botocore.exceptions.BotoCoreError as exc:
                raise ProviderError(
                    502,
                    "api_error",
                    f"ccgate cannot load AWS credentials for provider {provider!r} "
                    f"({type(exc).__name__}: {exc}).",
                ) from None
            if creds is None or frozen is None:
                raise ProviderError(
                    502,
                    "api_error",
                    f"ccgate found no AWS credentials for provider {provider!r}: set "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or configure "
                    "a profile with `aws configure` on the machine that runs the daemon.",
                )
            self._resolved[profile], self._frozen[profile] = creds, frozen
            return frozen

    def forget(self) -> None:
        with self._lock:
            self._resolved.clear()
            self._frozen.clear()


class BedrockAdapter:
    kind = "bedrock"

    def __init__(self) -> None:
        self.credentials = _Credentials()

    async def prepare(self, upstream: Upstream) -> None:
        if importlib.util.find_spec("botocore") is None:
            # Needed to read the event stream even when a bearer token replaces the signature.
            raise ProviderError(502, "api_error", _MISSING_BOTOCORE)
        profile = upstream.options.get("aws_profile")
        if _bearer_token() is None and self.credentials.current(profile) is None:
            await anyio.to_thread.run_sync(
                lambda: self.credentials.resolve(profile, provider=upstream.provider)
            )

    def request(self, upstream: Upstream, forward: Forward) -> httpx.Request:
        path = forward.path
        if path.startswith("/v1/models"):
            ids = {m: model_id(m, upstream) for m in _cloud.model_table("bedrock", upstream)}
            raise _cloud.models_answer(path, ids, provider=upstream.provider)
        if path not in ("/v1/messages", "/v1/messages/count_tokens") or forward.method != "POST":
            raise ProviderError(
                404, "not_found_error", f"Amazon Bedrock has no equivalent of {path}."
            )
        body = _cloud.json_body(forward.body)
        model = body.pop("model", None) or forward.model
        if not isinstance(model, str) or not model:
            raise ProviderError(400, "invalid_request_error", "model: field required")
        target = urllib.parse.quote(model_id(model, upstream), safe=":")
        body.pop("stream", None)
        body.setdefault("anthropic_version", ANTHROPIC_VERSION)
        betas = _cloud.beta_header(forward.headers)
        if betas:
            body.setdefault("anthropic_beta", betas)
        if path == "/v1/messages/count_tokens":
            # CountTokens takes an InvokeModel body (max_tokens included, which count_tokens
            # requests do not carry), base64-encoded as the API's blobs are.
            body.setdefault("max_tokens", 1)
            content = _cloud.dumps(
                {"input": {"invokeModel": {"body": base64.b64encode(_cloud.dumps(body)).decode()}}}
            )
            action, accept = "count-tokens", "application/json"
        elif forward.streamed:
            content = _cloud.dumps(body)
            action, accept = "invoke-with-response-stream", "application/vnd.amazon.eventstream"
        else:
            content = _cloud.dumps(body)
            action, accept = "invoke", "application/json"
        url = f"{upstream.base_url.rstrip('/')}/model/{target}/{action}"
        headers = self._sign(upstream, url, content, accept=accept)
        agent = _cloud.header(forward.headers, b"user-agent")
        if agent:
            headers.append(("user-agent", agent))  # never signed (SigV4 leaves it out)
        return httpx.Request("POST", url, headers=headers, content=content)

    def _sign(self, upstream: Upstream, url: str, content: bytes, *, accept: str) -> list[Any]:
        # Asked for plainly: the event stream is read frame by frame, never decompressed.
        headers = {
            "content-type": "application/json",
            "accept": accept,
            "accept-encoding": "identity",
        }
        token = _bearer_token()
        if token is not None:
            # A Bedrock API key (what AWS_BEARER_TOKEN_BEDROCK holds for the AWS SDKs and Claude
            # Code): a bearer token instead of a signature.
            return [*headers.items(), ("authorization", f"Bearer {token}")]
        try:
            from botocore.auth import SigV4Auth
            from botocore.awsrequest import AWSRequest
        except ImportError:
            raise ProviderError(502, "api_error", _MISSING_BOTOCORE) from None
        profile = upstream.options.get("aws_profile")
        creds = self.credentials.current(profile) or self.credentials.resolve(
            profile, provider=upstream.provider
        )
        aws = AWSRequest(method="POST", url=url, data=content, headers=headers)
        SigV4Auth(creds, SIGNING_NAME, upstream.options["region"]).add_auth(aws)
        return list(aws.headers.items())

    def reply(self, response: httpx.Response, *, streamed: bool) -> Reply:
        request_id = response.headers.get("x-amzn-requestid")
        headers = [h for h in forwarded_headers(response) if h[0] not in _REFRAMED]
        if request_id:
            headers.append((b"request-id", request_id.encode("latin-1")))
        invoked = _invoked_model(response.request.url)
        if response.status_code >= 400:
            return self._error(response, headers, request_id)
        if response.request.url.path.endswith("/count-tokens"):
            headers.append((b"content-type", b"application/json"))
            return Reply(200, headers, _cloud.once(lambda: _count_tokens(response)))
        if streamed:
            headers.append((b"content-type", b"text/event-stream; charset=utf-8"))
            return Reply(200, headers, _stream(response, invoked))
        headers.append((b"content-type", b"application/json"))
        return Reply(200, headers, _cloud.once(lambda: _message(response, invoked)))

    def _error(
        self, response: httpx.Response, headers: list[tuple[bytes, bytes]], request_id: str | None
    ) -> Reply:
        status, error_type = aws_error(
            response.headers.get("x-amzn-errortype"), response.status_code
        )

        async def body() -> bytes:
            raw = await response.aread()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
            message = None
            if isinstance(parsed, dict):
                message = parsed.get("message") or parsed.get("Message")
            if not isinstance(message, str) or not message:
                message = f"Amazon Bedrock answered HTTP {response.status_code}."
            return _cloud.error_envelope(error_type, message, request_id)

        return Reply(status, [*headers, _cloud.ERROR_HEADERS], _cloud.once(body))


def _bearer_token() -> str | None:
    return os.environ.get(BEARER_TOKEN_ENV) or None


def _invoked_model(url: httpx.URL) -> str:
    # /model/<id>/<action>: the id is the path segment before the action, still quoted.
    return urllib.parse.unquote(url.raw_path.decode("ascii").split("?")[0].split("/")[-2])


def _named(invoked: str) -> Any:
    def rewrite(kind: str, data: bytes) -> bytes:
        if kind != "message_start":
            return data
        try:
            event = json.loads(data)
        except ValueError:
            return data  # passed on as it came: the meter, not the relay, copes with it
        message = event.get("message") if isinstance(event, dict) else None
        if isinstance(message, dict):
            message["model"] = invoked
        return _cloud.dumps(event)

    return rewrite


async def _stream(response: httpx.Response, invoked: str) -> AsyncIterator[bytes]:
    translator = StreamTranslator(rewrite=_named(invoked))
    async for data in response.aiter_bytes():
        frames = translator.feed(data)
        if frames:
            yield frames
        if translator.done:
            return
    tail = translator.finish()
    if tail:
        yield tail


async def _message(response: httpx.Response, invoked: str) -> bytes:
    raw = await response.aread()
    try:
        message = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(message, dict) and message.get("type") == "message":
        message["model"] = invoked
        return _cloud.dumps(message)
    return raw


async def _count_tokens(response: httpx.Response) -> bytes:
    raw = await response.aread()
    try:
        tokens = json.loads(raw)["inputTokens"]
    except (ValueError, KeyError, TypeError):
        return _cloud.error_envelope(
            "api_error", "Amazon Bedrock's CountTokens answer had no inputTokens.", None
        )
    return _cloud.dumps({"input_tokens": tokens})


BEDROCK: Final = BedrockAdapter()
register(BEDROCK)
