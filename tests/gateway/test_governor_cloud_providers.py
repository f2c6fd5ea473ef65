"""Server mode with cloud provider kinds: the admin adds a Bedrock or Vertex entry with options
and no key, the signed bundle carries them, and the governor's upstream has the kind and the
options the adapter needs (against the real server app)."""

from __future__ import annotations

from typing import Any

import pytest

from ccgate.policy import bundle as bundle_mod
from tests.gateway.rig import Rig

pytestmark = pytest.mark.anyio


async def _switch_to(rig: Rig, entry: dict[str, Any]) -> dict[str, Any]:
    added: dict[str, Any] = await rig.ok("POST", "/providers", 201, json=entry)
    await rig.ok("DELETE", "/providers/anthropic")
    return added


async def test_a_bedrock_entry_needs_no_key_and_reaches_the_daemon_with_its_options(
    rig: Rig,
) -> None:
    added = await _switch_to(
        rig,
        {
            "name": "aws",
            "kind": "bedrock",
            "options": {
                "region": "eu-west-1",
                "profile_prefix": "eu",
                "models": {"claude-opus-5-5": "anthropic.claude-opus-5-5-custom"},
            },
        },
    )
    assert added["base_url"] == "https://bedrock-runtime.eu-west-1.amazonaws.com"
    assert added["options"]["region"] == "eu-west-1"
    daemon = await rig.enrol(await rig.new_key("ann"))
    upstream = daemon.governor.upstream()
    assert (upstream.provider, upstream.kind, upstream.api_key) == ("aws", "bedrock", None)
    assert upstream.base_url == "https://bedrock-runtime.eu-west-1.amazonaws.com"
    assert dict(upstream.options) == {
        "region": "eu-west-1",
        "profile_prefix": "eu",
        "models": {"claude-opus-5-5": "anthropic.claude-opus-5-5-custom"},
    }
    bundle = daemon.governor.bundle
    assert bundle is not None and bundle.providers[0].sealed_key == {}
    # The payload round-trips through the strict parser (what a restart reads back).
    again = bundle_mod._read_bundle(bundle.to_payload())
    assert again.providers == bundle.providers


async def test_a_vertex_entry_in_the_global_location(rig: Rig) -> None:
    await _switch_to(
        rig,
        {
            "name": "gcp",
            "kind": "vertex",
            "options": {"project": "acme-prod-123", "location": "global"},
        },
    )
    daemon = await rig.enrol(await rig.new_key("ann"))
    upstream = daemon.governor.upstream()
    assert (upstream.kind, upstream.base_url) == ("vertex", "https://aiplatform.googleapis.com")
    assert upstream.options["project"] == "acme-prod-123"


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"name": "aws", "kind": "bedrock"}, "needs the option 'region'"),
        (
            {"name": "aws", "kind": "bedrock", "options": {"region": "us-east-1"}, "api_key": "x"},
            "takes no 'api_key'",
        ),
        (
            {"name": "aws", "kind": "bedrock", "options": {"region": "us-east-1", "colour": "b"}},
            "takes no option 'colour'",
        ),
        ({"name": "gcp", "kind": "vertex", "options": {"project": "p-12345"}}, "'location'"),
        ({"name": "az", "kind": "foundry", "api_key": "k"}, "'resource' or a base URL"),
        ({"name": "x", "kind": "mystery", "base_url": "https://x", "api_key": "k"}, "'kind'"),
        ({"name": "anthropic", "base_url": "https://x"}, "api_key"),
    ],
)
async def test_bad_entries_are_refused_with_the_reason(
    rig: Rig, entry: dict[str, Any], problem: str
) -> None:
    answer = await rig.ok("POST", "/providers", 422, json=entry)
    assert problem in answer["error"]["message"]


async def test_a_foundry_entry_seals_its_key_and_derives_its_url(rig: Rig) -> None:
    await _switch_to(
        rig,
        {
            "name": "azure",
            "kind": "foundry",
            "api_key": "az-secret-key",
            "options": {"resource": "acme-ai"},
        },
    )
    daemon = await rig.enrol(await rig.new_key("ann"))
    upstream = daemon.governor.upstream()
    assert upstream.kind == "foundry" and upstream.api_key == "az-secret-key"
    assert upstream.base_url == "https://acme-ai.services.ai.azure.com/anthropic"


def test_the_bundle_parser_refuses_bad_options_and_a_missing_key_for_keyed_kinds() -> None:
    entry = {
        "name": "aws",
        "kind": "bedrock",
        "base_url": "https://b",
        "priority": 0,
        "weight": 1,
        "sealed_key": {},
        "options": {"region": "Not A Region"},
    }
    with pytest.raises(bundle_mod._FieldError, match=r"providers\[0\]\.options"):
        bundle_mod._read_provider("providers[0]", entry)
    keyed = {**entry, "kind": "anthropic", "options": {}}
    with pytest.raises(bundle_mod._FieldError, match="sealed_key"):
        bundle_mod._read_provider("providers[0]", keyed)
