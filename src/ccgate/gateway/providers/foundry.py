"""Microsoft Foundry's Anthropic endpoint: Anthropic's Messages API under another host.

``https://{resource}.services.ai.azure.com/anthropic/v1/messages`` takes Anthropic's request
body and headers and answers in Anthropic's wire format, SSE included, so this kind is the
anthropic one with Foundry's authentication: the key goes in ``api-key`` as well as
``x-api-key``, as the anthropic SDK's Foundry client sends it. The one rewrite is the model: a
Foundry deployment may have a name of its own, which the provider's ``models`` option maps to
(the body is only re-encoded when the option names the request's model).

Microsoft Entra ID tokens are not supported: they expire within the hour, so they cannot be a
sealed key; a machine-side token chain like Bedrock's and Vertex's would need azure-identity.
"""

from __future__ import annotations

import dataclasses
from typing import Final

import httpx

from ccgate.gateway.providers import AnthropicAdapter, Forward, Upstream, _cloud, register


class FoundryAdapter(AnthropicAdapter):
    kind = "foundry"

    def request(self, upstream: Upstream, forward: Forward) -> httpx.Request:
        request = super().request(upstream, _mapped(upstream, forward))
        if upstream.api_key is not None and not upstream.passthrough:
            request.headers["api-key"] = upstream.api_key
        return request


def _mapped(upstream: Upstream, forward: Forward) -> Forward:
    models = upstream.options.get("models") or {}
    if forward.model is None or forward.model not in models:
        return forward
    body = _cloud.json_body(forward.body)
    body["model"] = models[forward.model]
    # The gateway dropped the client's content-length; httpx sets the new body's.
    return dataclasses.replace(forward, body=_cloud.dumps(body))


FOUNDRY: Final = FoundryAdapter()
register(FOUNDRY)
