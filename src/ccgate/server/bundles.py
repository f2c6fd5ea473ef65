"""Building, signing and caching the policy bundle of one (virtual key, device).

A bundle is re-signed only when its content changes or when the stored one is older than half
its lifetime (docs/protocol.md). "Content" is everything in the payload except ``version``,
``issued_at``, ``expires_at`` and the sealed keys themselves: sealing is randomised, so the
content hash names each provider entry by its row id instead (provider rows are immutable: a
changed key is a remove and an add, hence a new id).

A new signature takes the next value of the server-wide counter in the same transaction that
stores the envelope, so versions strictly increase across all keys, devices and replicas, and a
crash between the two cannot hand out a version twice.

A poll is cheap when nothing changed. Every admin write that can change any bundle bumps the
server-wide policy epoch in its own transaction (``db.bump_policy_epoch``), and each stored
envelope carries the epoch its policy was read at and ``built_with`` (a digest of everything
else that shapes it: schema, ccgate version, TTL, poll interval). When one statement finds the
stored envelope at the current epoch, built the way this process builds, and younger than half
its lifetime, it is served as it is: no policy read, no hashing. The caller has already checked
that the key is neither revoked nor expired (``devices.authenticate_key``, every request).
Anything else takes the full path, which still re-signs only when the content hash changed and
otherwise just stamps the stored row with the current epoch.

The full path reads the epoch *before* the policy, so a stored epoch can only understate what
the envelope reflects: a write that lands between the two reads leaves it stale (one more full
path), never current with an older policy. This holds for any number of replicas on one
database, since the epoch lives there.

A ``passthrough`` key uses the developer's own credential, so its bundle carries no provider
keys: a key that never needs a secret never receives one.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

from sqlalchemy import Connection, Engine, bindparam, update
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from ccgate import __version__
from ccgate.accounting.periods import Period
from ccgate.policy import bundle as bundle_mod
from ccgate.server import db
from ccgate.server.admin import PRICE_ROW, key_levels
from ccgate.server.db import (
    BundleCounter,
    Customer,
    Device,
    PolicyEpoch,
    PriceOverride,
    Provider,
    SignedBundle,
    Team,
    VirtualKey,
)
from ccgate.server.errors import ServerStateError
from ccgate.server.state import SecretBox, sha256_hex
from ccgate.server.usage import GroupCommit

DEFAULT_TTL_S: Final = 7 * 86_400
POLL_INTERVAL_S: Final = 60


@dataclass(frozen=True)
class BundleSettings:
    ttl_s: int = DEFAULT_TTL_S
    poll_interval_s: int = POLL_INTERVAL_S
    # Where daemons export request spans (``ccgate server run --otlp-endpoint``), and the
    # collector's headers (credentials: sealed to each device, never in a repr or a log).
    otlp_endpoint: str | None = None
    otlp_headers: Mapping[str, str] = field(default_factory=dict, repr=False)

    def telemetry_digest(self) -> str | None:
        """What of the telemetry settings shapes a bundle, without the header values."""
        if self.otlp_endpoint is None:
            return None
        headers = json.dumps(dict(self.otlp_headers), sort_keys=True).encode()
        return f"{self.otlp_endpoint} {hashlib.sha256(headers).hexdigest()}"


@dataclass(frozen=True)
class Served:
    version: int
    envelope: str  # the JSON text, served byte for byte

    @property
    def etag(self) -> str:
        return f'"v{self.version}"'


@dataclass(frozen=True)
class Bundler:
    engine: Engine
    box: SecretBox
    signing_key: bundle_mod.SigningKey
    settings: BundleSettings = field(default_factory=BundleSettings)
    clock: Callable[[], float] = field(default=time.time)
    # SQLite's group commit (``usage.GroupCommit``): the stamp of an unchanged envelope joins
    # the syncs' transaction instead of taking SQLite's one write lock for a commit of its own
    writer: GroupCommit | None = None

    @functools.cached_property
    def built_with(self) -> str:
        """What besides the policy shapes an envelope; a stored one built otherwise is re-read.

        The ccgate version stands for the code that renders the payload, so after an upgrade (or
        a restart with another TTL) every envelope goes through the full path once.
        """
        shape = {
            "schema": bundle_mod.SCHEMA,
            "ccgate": __version__,
            "ttl_s": self.settings.ttl_s,
            "poll_interval_s": self.settings.poll_interval_s,
        }
        telemetry = self.settings.telemetry_digest()
        if telemetry is not None:
            shape["telemetry"] = telemetry
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()

    def cached(
        self,
        *,
        key_id: str,
        device_id: str,
        device_token: str,
        now: float,
        connection: Connection | None = None,
    ) -> Served | None:
        """The stored envelope of (key, device) if it can be served as it is, else None.

        It can when it was built at the current policy epoch, the way this process builds
        (``built_with``), and is younger than half its lifetime. The caller must already have
        checked that the key is neither revoked nor expired (``devices.authenticate_key``); the
        device must exist and belong to the key, which the same statement checks. None only
        means "take the full path" (``serve``): no device, no stored envelope, or a stale one.
        """
        params = {"device_id": device_id, "key_id": key_id}
        if connection is not None:  # the caller's (a poll checks the key on it first)
            row = connection.execute(_CACHED, params).first()
        else:
            with self.engine.connect() as conn:
                row = conn.execute(_CACHED, params).first()
        if row is None:
            return None
        version, envelope, issued_at, stored_epoch, built_with, epoch, status, token_hash = row
        if status != "approved" or token_hash is None:
            return None  # the full path gives the 401 or 403 answer
        if not hmac.compare_digest(sha256_hex(device_token), token_hash):
            return None
        if stored_epoch != epoch or built_with != self.built_with:
            return None
        if not self.young(issued_at, now=now):
            return None
        return Served(version=int(version), envelope=envelope)

    def serve(self, key: VirtualKey, device: Device) -> Served:
        """The current envelope for (key, device), by the full path: re-read the policy, and
        re-sign only when its content changed or the stored one is past half its lifetime."""
        now = self.clock()
        try:
            return self._serve(key, device, now=now)
        except IntegrityError:
            # Another replica stored this device's first bundle between our read and our insert;
            # serving again finds its row (and re-signs over it if need be).
            return self._serve(key, device, now=now)

    def _serve(self, key: VirtualKey, device: Device, *, now: float) -> Served:
        with db.session(self.engine) as session:
            epoch = _epoch(session)  # before the policy: see the module docstring
            key = session.get(VirtualKey, key.id) or key
            team, customer = key_levels(session, key)
            contents = _Contents(
                key=_key_policy(key),
                team=None if team is None else _level(team),
                customer=None if customer is None else _level(customer),
                providers=tuple(_providers(session)) if key.auth == "provider" else (),
                prices=_prices(session),
            )
            digest = self._content_hash(contents, device)
            stored = session.get(SignedBundle, device.id)
            if stored is not None and self._fresh(stored, digest=digest, now=now):
                self._stamp(session, stored, epoch=epoch)
                return Served(version=stored.version, envelope=stored.envelope)
            return self._sign(
                session, stored, contents, device, digest=digest, epoch=epoch, now=now
            )

    def _fresh(self, stored: SignedBundle, *, digest: str, now: float) -> bool:
        return stored.content_hash == digest and self.young(stored.issued_at, now=now)

    def young(self, issued_at: float, *, now: float) -> bool:
        return now < issued_at + self.settings.ttl_s / 2

    def _stamp(self, session: Session, stored: SignedBundle, *, epoch: int) -> None:
        """Mark an unchanged envelope as current at ``epoch``, so the next polls are cheap.

        Only the version we compared is stamped, and never back to an older epoch: another
        replica may have re-signed or stamped the row since we read it. After an admin change
        every device's next poll stamps its row: on SQLite they share the group commit.
        """
        if stored.policy_epoch == epoch and stored.built_with == self.built_with:
            return
        if self.writer is not None:
            params = (epoch, self.built_with, stored.device_id, stored.version, epoch)

            def stamp(connection: Any) -> int:  # the writer's sqlite3 connection
                connection.cursor().execute(_STAMP, params)
                return 0

            try:
                self.writer.run(stamp)
            except ServerStateError:
                pass  # the server is stopping: unstamped, the next poll takes this path again
            return
        bundles = SignedBundle.__table__  # type: ignore[attr-defined]
        session.execute(
            update(bundles)
            .where(
                bundles.c.device_id == stored.device_id,
                bundles.c.version == stored.version,
                bundles.c.policy_epoch <= epoch,
            )
            .values(policy_epoch=epoch, built_with=self.built_with)
        )
        session.commit()

    def _content_hash(self, contents: _Contents, device: Device) -> str:
        content = {
            "schema": bundle_mod.SCHEMA,
            "poll_interval_s": self.settings.poll_interval_s,
            "ttl_s": self.settings.ttl_s,
            "device_id": device.id,
            "device_public_key": device.public_key,
            "key": contents.key.to_payload(),
            "team": None if contents.team is None else contents.team.to_payload(),
            "customer": None if contents.customer is None else contents.customer.to_payload(),
            "prices": contents.prices,
            "providers": [
                {**_entry(p, sealed={}).to_payload(), "id": p.id} for p in contents.providers
            ],
        }
        telemetry = self.settings.telemetry_digest()
        if telemetry is not None:
            content["telemetry"] = telemetry
        return hashlib.sha256(bundle_mod.encode_payload(content)).hexdigest()

    def _sign(
        self,
        session: Session,
        stored: SignedBundle | None,
        contents: _Contents,
        device: Device,
        *,
        digest: str,
        epoch: int,
        now: float,
    ) -> Served:
        device_public = base64.b64decode(device.public_key)
        entries = tuple(
            _entry(
                p,
                # An entry with no key (bedrock, vertex: the machine's own credentials) has
                # nothing to seal.
                sealed={}
                if not p.api_key_enc
                else bundle_mod.seal(
                    self.box.decrypt(p.api_key_enc, aad=p.id),
                    device_public=device_public,
                    device_id=device.id,
                ),
            )
            for p in contents.providers
        )
        version = _next_version(session)
        signed = bundle_mod.Bundle(
            schema=bundle_mod.SCHEMA,
            version=version,
            issued_at=now,
            expires_at=now + self.settings.ttl_s,
            poll_interval_s=self.settings.poll_interval_s,
            device_id=device.id,
            key=contents.key,
            team=contents.team,
            customer=contents.customer,
            prices=contents.prices,
            providers=entries,
            telemetry=self._telemetry(device_public, device.id),
        )
        envelope = json.dumps(
            self.signing_key.sign_envelope(bundle_mod.encode_payload(signed)), sort_keys=True
        )
        row = stored or SignedBundle(
            device_id=device.id, key_id="", version=0, content_hash="", issued_at=0, envelope=""
        )
        row.key_id, row.version, row.content_hash = contents.key.id, version, digest
        row.issued_at, row.envelope = now, envelope
        row.policy_epoch, row.built_with = epoch, self.built_with
        session.add(row)
        session.commit()
        return Served(version=version, envelope=envelope)

    def _telemetry(self, device_public: bytes, device_id: str) -> bundle_mod.TelemetryEntry | None:
        endpoint = self.settings.otlp_endpoint
        if endpoint is None:
            return None
        headers = self.settings.otlp_headers
        sealed = (
            bundle_mod.seal(
                json.dumps(dict(headers), sort_keys=True),
                device_public=device_public,
                device_id=device_id,
            )
            if headers
            else None
        )
        return bundle_mod.TelemetryEntry(endpoint=endpoint, sealed_headers=sealed)


@dataclass(frozen=True)
class _Contents:
    """What a bundle says about one key, read in one transaction (see ``_content_hash``)."""

    key: bundle_mod.KeyPolicy
    team: bundle_mod.LevelPolicy | None
    customer: bundle_mod.LevelPolicy | None
    providers: tuple[Provider, ...]
    prices: Mapping[str, Any] | None


_STAMP: Final = (
    "UPDATE bundles SET policy_epoch = ?, built_with = ? "
    "WHERE device_id = ? AND version = ? AND policy_epoch <= ?"
)


def _prices(session: Session) -> Mapping[str, Any] | None:
    row = session.get(PriceOverride, PRICE_ROW)
    return None if row is None else cast(Mapping[str, Any], json.loads(row.table_json))


def _cached_query() -> Any:
    bundles = SignedBundle.__table__  # type: ignore[attr-defined]
    devices = Device.__table__  # type: ignore[attr-defined]
    epochs = PolicyEpoch.__table__  # type: ignore[attr-defined]
    # One statement, so the envelope and the epoch come from one snapshot on PostgreSQL too;
    # built once with bind parameters, as a poll should cost no more than the query itself.
    return (
        sa_select(
            bundles.c.version,
            bundles.c.envelope,
            bundles.c.issued_at,
            bundles.c.policy_epoch,
            bundles.c.built_with,
            epochs.c.epoch,
            devices.c.status,
            devices.c.token_hash,
        )
        .select_from(
            bundles.join(devices, devices.c.id == bundles.c.device_id).join(
                epochs, epochs.c.id == db.POLICY_EPOCH_ROW
            )
        )
        .where(
            bundles.c.device_id == bindparam("device_id"),
            devices.c.key_id == bindparam("key_id"),
        )
    )


_CACHED: Final = _cached_query()


def _epoch(session: Session) -> int:
    row = session.get(PolicyEpoch, db.POLICY_EPOCH_ROW)
    if row is None:  # the migration inserts it; a missing row is a damaged database
        raise ServerStateError(
            "The server database has no policy_epoch row; restore it from a backup or run "
            "`ccgate server run` against a database it migrated."
        )
    return row.epoch


def _next_version(session: Session) -> int:
    # One atomic UPDATE ... RETURNING: the row lock (PostgreSQL) or the write lock (SQLite) is
    # held until this transaction stores the envelope, so no two signatures share a version.
    counter = BundleCounter.__table__  # type: ignore[attr-defined]
    return int(
        session.execute(
            update(counter)
            .where(counter.c.id == 1)
            .values(version=counter.c.version + 1)
            .returning(counter.c.version)
        ).scalar_one()
    )


def _providers(session: Session) -> Sequence[Provider]:
    return session.exec(
        select(Provider).order_by(
            col(Provider.priority), col(Provider.name), col(Provider.created_at), col(Provider.id)
        )
    ).all()


def _budget(row: VirtualKey | Team | Customer) -> bundle_mod.Budget | None:
    if row.budget_micros is None or row.budget_period is None:
        return None
    return bundle_mod.Budget(
        limit_micros=row.budget_micros,
        period=cast(Period, row.budget_period),
        rolling=row.budget_rolling,
    )


def _key_policy(key: VirtualKey) -> bundle_mod.KeyPolicy:
    return bundle_mod.KeyPolicy(
        id=key.id,
        name=key.name,
        hash=key.key_hash,
        auth=cast(Any, key.auth),
        models=tuple(json.loads(key.models)),
        budget=_budget(key),
        rpm=key.rpm,
        tpm=key.tpm,
        expires_at=key.expires_at,
        offline_grace_micros=key.offline_grace_micros,
        token_budget=_token_budget(key),
        repo_attribution=key.repo_attribution,
        session_budget_micros=key.session_budget_micros,
        session_rpm=key.session_rpm,
    )


def _token_budget(key: VirtualKey) -> bundle_mod.TokenBudget | None:
    if key.token_budget_tokens is None or key.token_budget_period is None:
        return None
    return bundle_mod.TokenBudget(
        limit_tokens=key.token_budget_tokens,
        period=cast(Period, key.token_budget_period),
        rolling=key.token_budget_rolling,
    )


def _level(row: Team | Customer) -> bundle_mod.LevelPolicy:
    if not isinstance(row, Team):
        return bundle_mod.LevelPolicy(id=row.id, name=row.name, budget=_budget(row))
    return bundle_mod.LevelPolicy(
        id=row.id,
        name=row.name,
        budget=_budget(row),
        repo_attribution=row.repo_attribution,
        session_budget_micros=row.session_budget_micros,
        session_rpm=row.session_rpm,
    )


def _entry(row: Provider, *, sealed: Mapping[str, str]) -> bundle_mod.ProviderEntry:
    return bundle_mod.ProviderEntry(
        name=row.name,
        kind=row.kind,
        base_url=row.base_url,
        priority=row.priority,
        weight=row.weight,
        sealed_key=sealed,
        id=row.id,
        timeouts=json.loads(row.timeouts) if row.timeouts else None,
        options=json.loads(row.options_json) if row.options_json else {},
    )
