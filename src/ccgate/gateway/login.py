"""``ccgate login`` and ``ccgate sync`` as plain functions the CLI renders.

Login pins the server's public key (checked against ``--fingerprint`` when the admin gave one out
of band), makes this machine's X25519 device key, enrols its public half with the device token
derived from it (``remote.device_token``), stores the virtual key and the device key in the
secret store, and fetches and verifies the first bundle, so the daemon can enforce policy from
its very first start, online or not. A device the admin must approve first gets no bundle: the
profile is saved and ``DevicePending`` says who to ask.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from typing import Any

import anyio

from ccgate.client import profiles
from ccgate.client.remote import ServerClient
from ccgate.errors import CcgateError
from ccgate.paths import Paths
from ccgate.policy.bundle import BundleStore, DeviceKey
from ccgate.store.ledger import Ledger
from ccgate.wire import CLIENT_KEY_PREFIX


class FingerprintMismatch(CcgateError):
    """The server's key is not the one the admin announced."""


class DevicePending(CcgateError):
    """The device is enrolled (the profile is saved) but waits for the admin's approval."""


@dataclass(frozen=True)
class LoginResult:
    profile: profiles.Profile
    bundle_version: int
    fingerprint_checked: bool


def login(
    *,
    paths: Paths,
    server_url: str,
    key: str,
    fingerprint: str | None,
    profile: str,
    code: str | None = None,
) -> LoginResult:
    """Log in; raises ``DevicePending`` (after saving the profile) when the admin must approve
    this device first: `ccgate up` or `ccgate sync` then fetch the bundle once approved."""
    profiles.check_name(profile)
    if not key.startswith(CLIENT_KEY_PREFIX):
        raise CcgateError(
            f"That is not a ccgate virtual key (they start with '{CLIENT_KEY_PREFIX}')."
        )
    return anyio.run(_login, paths, server_url.rstrip("/"), key, fingerprint, profile, code)


async def _login(
    paths: Paths, server_url: str, key: str, expected: str | None, name: str, code: str | None
) -> LoginResult:
    async with ServerClient(server_url) as anonymous:
        public_key, fingerprint = await anonymous.server_key()
    if expected is not None and expected.strip() != fingerprint:
        raise FingerprintMismatch(
            f"The server at {server_url} presents key {fingerprint}, not {expected.strip()}. "
            f"Do not log in: check the URL and ask your ccgate admin."
        )
    device = DeviceKey.generate()
    async with ServerClient(server_url, key=key) as client:
        device_id, key_id, status = await client.register_device(
            device=device, name=platform.node() or "unknown", code=code
        )
    envelope = None
    if status == "approved":
        async with ServerClient(server_url, key=key, device_id=device_id, device=device) as client:
            envelope, _etag = await client.fetch_bundle(etag=None)
        assert envelope is not None
    paths.ensure()
    # Start from a clean trust state: a new login may pin a new server key.
    profiles.remove(paths, name)
    store = BundleStore(
        state_dir=profiles.bundle_dir(paths, name), public_key=public_key, device_id=device_id
    )
    bundle = store.accept(envelope, now=time.time()) if envelope is not None else None
    import base64

    record = profiles.Profile(
        name=name,
        server_url=server_url,
        public_key_b64=base64.b64encode(public_key).decode(),
        fingerprint=fingerprint,
        device_id=device_id,
        key_id=key_id,
        key_prefix=key[:12],
    )
    profiles.save(paths, record, key=key, device_private=device.private_bytes)
    if bundle is None:
        raise DevicePending(
            f"This machine is enrolled as device {device_id}, which waits for approval: ask "
            f"your ccgate admin to run `ccgate admin devices approve {device_id}` (or to give "
            "you an enrolment code for `ccgate login --code`). Once approved, `ccgate up` "
            "fetches the policy and starts."
        )
    return LoginResult(
        profile=record, bundle_version=bundle.version, fingerprint_checked=expected is not None
    )


def sync_offline(*, paths: Paths, profile: str) -> dict[str, Any]:
    """`ccgate sync` when no daemon runs: poll the bundle and push the ledger from here."""
    from ccgate.gateway.governor import Governor

    record = profiles.load(paths, profile)
    if record is None:
        raise CcgateError(f"No profile {profile!r}: run `ccgate login` first.")
    ledger = Ledger(paths.ledger_file)
    try:
        governor = Governor.from_profile(paths=paths, profile=record, ledger=ledger)
        governor.load(now=time.time())
        result: dict[str, Any] = anyio.run(governor.sync_now)
        result["state"] = governor.snapshot(now=time.time())
        return result
    finally:
        ledger.close()
