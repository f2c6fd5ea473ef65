"""The provider kinds ccgate can send to, and the options each one takes.

The server (``ccgate admin providers add``), the bundle parser and the standalone CLI all check a
provider's options here, so an option the gateway would not understand is refused when it is
written, not when the first request fails. Pure: no network, no SDK imports.

- ``anthropic``: any Anthropic-compatible endpoint; no options; needs an API key.
- ``bedrock``: Amazon Bedrock; ``region`` (required), ``profile_prefix`` (an inference-profile
  geography: ``global``, ``us``, ``eu``, ``apac``, ``jp``, ``au``, ``us-gov``), ``aws_profile``
  (a named profile of the shared AWS config); credentials come from the machine's AWS chain.
- ``vertex``: Google Vertex AI; ``project`` and ``location`` (required; ``global`` is one);
  credentials come from the machine's Google application-default credentials.
- ``foundry``: Microsoft Foundry's Anthropic endpoint; ``resource`` (the Foundry resource name)
  unless a base URL is given; needs an API key.

Every kind but ``anthropic`` also takes ``models``: ``{"claude-id": "provider-id"}`` entries that
extend or override the shipped model table (ccgate/data/cloud_models.json).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

KINDS: Final = ("anthropic", "bedrock", "vertex", "foundry")
KEYLESS: Final = frozenset({"bedrock", "vertex"})
"""Kinds whose credentials come from the machine (AWS chain, Google ADC), not a sealed key."""

PROFILE_PREFIXES: Final = ("global", "us", "eu", "apac", "jp", "au", "us-gov")

_TEXT_OPTIONS: Final[dict[str, tuple[str, ...]]] = {
    "anthropic": (),
    "bedrock": ("region", "profile_prefix", "aws_profile"),
    "vertex": ("project", "location"),
    "foundry": ("resource",),
}
_REQUIRED: Final[dict[str, tuple[str, ...]]] = {
    "bedrock": ("region",),
    "vertex": ("project", "location"),
}
# Region, location and resource names go into a host name: keep them to DNS label characters.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_HOST_OPTIONS: Final = frozenset({"region", "location", "resource"})
_PROJECT = re.compile(r"[a-z][a-z0-9-]{4,61}[a-z0-9]|[a-z0-9.:-]{1,100}")
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,255}")


class ProviderOptionsError(ValueError):
    """Options a kind does not take, or values it cannot use; the message is for people."""


def needs_key(kind: str) -> bool:
    return kind not in KEYLESS


def check_options(kind: str, options: Mapping[str, Any], *, has_base_url: bool) -> dict[str, Any]:
    """The options, checked for ``kind``; raises ProviderOptionsError saying what is wrong."""
    if kind not in KINDS:
        raise ProviderOptionsError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    allowed = _TEXT_OPTIONS[kind]
    checked: dict[str, Any] = {}
    for name, value in options.items():
        if name == "models" and kind != "anthropic":
            checked[name] = _check_models(value)
            continue
        if name not in allowed:
            takes = ", ".join((*allowed, "models") if kind != "anthropic" else allowed) or "none"
            raise ProviderOptionsError(
                f"a {kind} provider takes no option {name!r} (it takes: {takes})"
            )
        checked[name] = _check_text(name, value)
    for name in _REQUIRED.get(kind, ()):
        if name not in checked:
            raise ProviderOptionsError(f"a {kind} provider needs the option {name!r}")
    if kind == "foundry" and "resource" not in checked and not has_base_url:
        raise ProviderOptionsError("a foundry provider needs the option 'resource' or a base URL")
    prefix = checked.get("profile_prefix")
    if prefix is not None and prefix not in PROFILE_PREFIXES:
        raise ProviderOptionsError(
            f"profile_prefix must be one of {', '.join(PROFILE_PREFIXES)}; got {prefix!r}"
        )
    return checked


def default_base_url(kind: str, options: Mapping[str, Any]) -> str | None:
    """The endpoint a kind uses when no base URL is configured (None: the kind needs one)."""
    if kind == "bedrock":
        return f"https://bedrock-runtime.{options['region']}.amazonaws.com"
    if kind == "vertex":
        location = options["location"]
        if location == "global":
            return "https://aiplatform.googleapis.com"
        return f"https://{location}-aiplatform.googleapis.com"
    if kind == "foundry" and "resource" in options:
        return f"https://{options['resource']}.services.ai.azure.com/anthropic"
    return None


def _check_text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ProviderOptionsError(f"option {name!r} must be a non-empty string")
    if name in _HOST_OPTIONS and not _LABEL.fullmatch(value):
        raise ProviderOptionsError(
            f"option {name!r} must be lowercase letters, digits and hyphens; got {value!r}"
        )
    if name == "project" and not _PROJECT.fullmatch(value):
        raise ProviderOptionsError(f"option 'project' is not a Google Cloud project id: {value!r}")
    if len(value) > 256:
        raise ProviderOptionsError(f"option {name!r} is longer than 256 characters")
    return value


def _check_models(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ProviderOptionsError("option 'models' must map Claude model ids to provider ids")
    models: dict[str, str] = {}
    for claude_id, provider_id in value.items():
        for what, text in (("Claude model id", claude_id), ("provider model id", provider_id)):
            if not isinstance(text, str) or not _MODEL_ID.fullmatch(text):
                raise ProviderOptionsError(f"option 'models': {text!r} is not a {what}")
        models[claude_id] = provider_id
    return models
