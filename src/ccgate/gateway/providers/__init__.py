"""Provider kinds: how a request is sent to one kind of upstream and how its answer comes back.

The gateway speaks Anthropic's Messages API to Claude Code whatever serves the request. An
``Adapter`` is the seam for each provider kind:

- ``request`` turns what the client sent (a ``Forward``: method, path, query, the headers
  ccgate keeps, the body bytes exactly as they came in) into the ``httpx.Request`` that kind
  expects, for one ``Upstream`` (a provider and one of its keys): its URL, its authentication
  (an API key, SigV4, an OAuth token) and, where the kind needs it, a rewritten body;
- ``reply`` turns the upstream's ``httpx.Response`` into a ``Reply``: the status, the headers
  and the body chunks the client gets, in Anthropic's wire format (for Bedrock the AWS event
  stream turned back into SSE). The relay copies ``Reply.chunks`` to the client as they come
  and meters the same bytes, so an adapter must never buffer a stream.

``anthropic`` (any Anthropic-compatible endpoint) is the identity: the body and the answer pass
through untouched, still compressed. ``bedrock``, ``vertex`` and ``foundry`` live in modules of
their own, imported the first time a provider of that kind is used (``adapter_for``), so the
cloud SDKs they need (botocore, google-auth) load only on machines that use them.

``prepare`` runs on the event loop before ``request``: an adapter whose credentials must be
fetched or refreshed (an AWS role, a Google OAuth token) does that there, in a worker thread, so
``request`` itself never blocks. ``ProviderError`` is an answer ccgate gives instead of sending
(no credentials, an endpoint the kind does not have); ``LocalAnswer`` is one it gives from its
own tables (``/v1/models`` of a cloud provider, which has no such endpoint).
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import httpx

# RFC 9110 section 7.6.1: connection-specific headers are not forwarded by intermediaries.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


@dataclass(frozen=True)
class Upstream:
    """Where one attempt goes: a provider (by name and kind) and the credential it uses.

    ``options`` holds what a kind needs beyond a URL and a key (a region, a project, a model
    map); the anthropic kind needs none.
    """

    base_url: str
    api_key: str | None = field(repr=False)
    provider: str
    passthrough: bool
    kind: str = "anthropic"
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Forward:
    """What the client sent, as ccgate forwards it: credentials and hop-by-hop headers gone."""

    method: str
    path: str  # an allowed upstream path, e.g. /v1/messages
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    model: str | None
    streamed: bool


@dataclass
class Reply:
    """The answer as the client gets it: Anthropic's wire format, whatever the provider."""

    status: int
    headers: list[tuple[bytes, bytes]]  # hop-by-hop headers already removed
    chunks: AsyncIterator[bytes]

    def header(self, name: bytes) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None


class Adapter(Protocol):
    kind: str

    async def prepare(self, upstream: Upstream) -> None: ...
    def request(self, upstream: Upstream, forward: Forward) -> httpx.Request: ...
    def reply(self, response: httpx.Response, *, streamed: bool) -> Reply: ...


def forwarded_headers(response: httpx.Response) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers minus hop-by-hop ones, names lower-cased."""
    return [
        (name.lower(), value)
        for name, value in response.headers.raw
        if name.lower().decode("latin-1") not in HOP_BY_HOP
    ]


class AnthropicAdapter:
    """Any Anthropic-compatible endpoint: the body and the answer pass through untouched."""

    kind = "anthropic"

    async def prepare(self, upstream: Upstream) -> None:
        return None

    def request(self, upstream: Upstream, forward: Forward) -> httpx.Request:
        url = upstream.base_url.rstrip("/") + forward.path
        if forward.query:
            url += "?" + forward.query.decode("ascii")
        headers = list(forward.headers)
        if upstream.api_key is not None and not upstream.passthrough:
            headers.append((b"x-api-key", upstream.api_key.encode()))
        return httpx.Request(forward.method, url, headers=headers, content=forward.body)

    def reply(self, response: httpx.Response, *, streamed: bool) -> Reply:
        # aiter_raw: still compressed, so nothing is decoded or re-encoded in the path.
        return Reply(response.status_code, forwarded_headers(response), response.aiter_raw())


ANTHROPIC: Final = AnthropicAdapter()
_ADAPTERS: dict[str, Adapter] = {ANTHROPIC.kind: ANTHROPIC}
# Kinds whose adapter module registers itself when first imported.
_LAZY: Final = ("bedrock", "vertex", "foundry")


class ProviderError(Exception):
    """The gateway answers this instead of sending: the message is for the person at the client."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type


class UnknownProviderKind(ProviderError, LookupError):
    def __init__(self, message: str) -> None:
        super().__init__(502, "api_error", message)


class LocalAnswer(Exception):
    """A complete JSON answer from ccgate's own tables, given without asking the upstream."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def register(adapter: Adapter) -> None:
    _ADAPTERS[adapter.kind] = adapter


def adapter_for(kind: str) -> Adapter:
    if kind not in _ADAPTERS and kind in _LAZY:
        importlib.import_module(f"{__name__}.{kind}")
    try:
        return _ADAPTERS[kind]
    except KeyError:
        known = ", ".join(sorted({*_ADAPTERS, *_LAZY}))
        raise UnknownProviderKind(
            f"ccgate cannot send to a provider of kind {kind!r}; it knows {known}."
        ) from None
