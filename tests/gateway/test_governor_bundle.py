"""Bundle polls and the policy they bring, governor against the real server app: unchanged is a
304, an admin's change arrives at the next poll and is obeyed, the provider key unsealed."""

from __future__ import annotations

import pytest

from tests.gateway.rig import Rig

pytestmark = pytest.mark.anyio


async def test_an_unchanged_bundle_is_a_304_and_changes_nothing(rig: Rig) -> None:
    daemon = await rig.enrol(await rig.new_key("ann"))
    version = daemon.governor.bundle.version if daemon.governor.bundle else None
    assert await daemon.governor.refresh() == "bundle unchanged"
    assert await daemon.governor.refresh() == "bundle unchanged"
    assert rig.network.calls("GET", "/v1/bundle") == [200, 304, 304]
    assert daemon.governor.bundle is not None and daemon.governor.bundle.version == version


async def test_an_admins_change_arrives_with_the_next_poll_and_is_obeyed(rig: Rig) -> None:
    daemon = await rig.enrol(await rig.new_key("ann"))
    assert (await daemon.request(model="claude-haiku-4-5"))[1] is None
    await rig.ok("PATCH", "/keys/ann", json={"models": ["claude-sonnet-*"]})
    polled = await daemon.governor.refresh()
    assert polled.startswith("bundle version")
    assert rig.network.calls("GET", "/v1/bundle")[-1] == 200
    _record, reject = await daemon.request(model="claude-haiku-4-5")
    assert reject is not None and reject.status == 403
    assert (await daemon.request())[1] is None  # Sonnet is still allowed
    assert await daemon.governor.refresh() == "bundle unchanged"  # and the new ETag is kept


async def test_the_bundle_names_the_upstream_with_the_provider_key_unsealed(rig: Rig) -> None:
    daemon = await rig.enrol(await rig.new_key("ann"))
    upstream = daemon.governor.upstream()
    assert (upstream.base_url, upstream.provider) == ("https://api.anthropic.com", "anthropic")
    assert upstream.api_key == "sk-ant-test-provider-key"
    assert not upstream.passthrough
