"""The admin core: providers, customers, teams, virtual keys and the audit trail.

Every function takes the engine and plain data and returns JSON-ready dicts in the shapes of
docs/protocol.md; the HTTP layer only authenticates and translates. Every change writes its audit
entry in the same transaction, with details that never include a secret (a provider's API key,
a virtual key), and bumps the policy epoch there too (``db.bump_policy_epoch``), which is what
lets a bundle poll trust its stored envelope (``bundles``). Provider keys are encrypted before
they reach the session; virtual keys exist in plaintext only in the return value of
``create_key``.
"""

from __future__ import annotations

import base64
import hmac
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from ccgate.policy import provider_kinds
from ccgate.server import db, reconcile, validate
from ccgate.server import devices as devices_mod
from ccgate.server.db import (
    AdminToken,
    AuditEntry,
    Customer,
    Device,
    PriceOverride,
    Provider,
    Team,
    VirtualKey,
    new_id,
)
from ccgate.server.errors import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
)
from ccgate.server.state import SecretBox, sha256_hex
from ccgate.wire import CLIENT_KEY_PREFIX

KNOWN_KINDS: Final = provider_kinds.KINDS
AUTH_MODES: Final = ("provider", "passthrough")
KEY_PREFIX_CHARS: Final = 12
MAX_AUDIT_LIMIT: Final = 1000
PRICE_ROW: Final = 1
DEVICE_STATES: Final = ("pending", "approved", "revoked")
DEFAULT_CI_DEVICES: Final = 20  # enrolments per day: each CI run may be a fresh runner
MAX_DEVICES: Final = 10_000
ENROL_CODE_TTL_S: Final = 7 * 86_400


@dataclass(frozen=True)
class Admin:
    """The admin core bound to one database and server secret."""

    engine: Engine
    box: SecretBox
    clock: Callable[[], float] = field(default=time.time)  # injected in tests

    # ---------------------------------------------------------------- auth and audit

    def authenticate(self, token: str | None) -> str:
        """The admin id for ``token``, or AuthenticationError."""
        if not token:
            raise AuthenticationError(
                "Missing admin token: send `Authorization: Bearer <admin token>` (the token "
                "`ccgate server init` printed; CCGATE_ADMIN_TOKEN for the CLI)."
            )
        # Every stored hash is compared in constant time, and all of them are: neither the
        # comparison nor the number of rows read depends on how much of the token is right.
        presented = sha256_hex(token)
        with db.session(self.engine) as session:
            rows = session.exec(select(AdminToken)).all()
        row = None
        for candidate in rows:
            if hmac.compare_digest(presented, candidate.token_hash):
                row = candidate
        if row is None:
            raise AuthenticationError(
                "The admin token is not valid for this server; use the token `ccgate server "
                "init` printed for it."
            )
        return row.id

    def audit(self, *, limit: int = 50) -> dict[str, Any]:
        limit = max(1, min(limit, MAX_AUDIT_LIMIT))
        with db.session(self.engine) as session:
            rows = session.exec(
                select(AuditEntry).order_by(col(AuditEntry.id).desc()).limit(limit)
            ).all()
        entries = [
            {
                "at": r.at,
                "actor": r.actor,
                "action": r.action,
                "target": r.target,
                # NaN/Infinity written by servers before they were refused: shown as null
                "detail": json.loads(r.detail, parse_constant=lambda _name: None),
            }
            for r in reversed(rows)
        ]
        return {"entries": entries}

    def _record(
        self, session: Session, *, actor: str, action: str, target: str, detail: Mapping[str, Any]
    ) -> None:
        """Audit a change and bump the policy epoch, both in the change's own transaction.

        Every admin change records itself here, so every one of them bumps the epoch: a poll
        then never answers from an envelope built before a change it may not reflect. Creates
        (which change no existing bundle) bump it too; the cost is one full re-read per device.
        """
        with session.no_autoflush:  # a duplicate name must fail at commit, as a ConflictError
            db.bump_policy_epoch(session)
        session.add(
            db.audit(at=self.clock(), actor=actor, action=action, target=target, detail=detail)
        )

    def _commit(self, session: Session, *, kind: str, name: str) -> None:
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            raise ConflictError(f"A {kind} named {name!r} already exists.") from None

    # ---------------------------------------------------------------- providers

    def list_providers(self) -> dict[str, Any]:
        with db.session(self.engine) as session:
            rows = session.exec(
                select(Provider).order_by(
                    col(Provider.name), col(Provider.priority), col(Provider.created_at)
                )
            ).all()
        return {"providers": [provider_info(r) for r in rows]}

    def add_provider(self, body: Mapping[str, Any], *, actor: str) -> dict[str, Any]:
        name = validate.name(body)
        kind = body.get("kind") or (name if name in KNOWN_KINDS else None)
        if kind not in KNOWN_KINDS:
            raise InvalidRequestError(
                f"'kind' must be one of {', '.join(KNOWN_KINDS)} (it defaults to the name when "
                f"the name is a known kind); got {kind!r}."
            )
        options = _provider_options(str(kind), body)
        default_url = provider_kinds.default_base_url(str(kind), options)
        if body.get("base_url") is None and default_url is not None:
            base_url = default_url
        else:
            base_url = validate.string(body, "base_url").rstrip("/")
        if not base_url.startswith(("https://", "http://")):
            raise InvalidRequestError(f"'base_url' must be an http(s) URL; got {base_url!r}.")
        if provider_kinds.needs_key(str(kind)):
            api_key: str | None = validate.string(body, "api_key", max_len=4096)
        elif body.get("api_key") is not None:
            raise InvalidRequestError(
                f"A {kind} provider takes no 'api_key': the daemon signs with its machine's "
                f"{'AWS' if kind == 'bedrock' else 'Google'} credentials."
            )
        else:
            api_key = None
        timeouts = provider_timeouts(body.get("timeouts"))
        row = Provider(
            id=new_id("prov"),
            name=name,
            kind=str(kind),
            base_url=base_url,
            priority=validate.integer(body, "priority", default=0) or 0,
            weight=validate.integer(body, "weight", default=1, minimum=1) or 1,
            api_key_enc=b"",
            created_at=self.clock(),
            timeouts=json.dumps(timeouts, sort_keys=True) if timeouts else None,
            options_json=json.dumps(options, sort_keys=True) if options else None,
        )
        if api_key is not None:
            row.api_key_enc = self.box.encrypt(api_key, aad=row.id)
        with db.session(self.engine) as session:
            row.anthropic_key_id = reconcile.key_id(body, session, pool=name)
            info = provider_info(row)
            session.add(row)
            self._record(session, actor=actor, action="provider.add", target=name, detail=info)
            session.commit()
        return info

    def remove_providers(self, name: str, *, provider_id: str | None, actor: str) -> dict[str, Any]:
        with db.session(self.engine) as session:
            rows = find_providers(session, name, provider_id=provider_id)
            for row in rows:
                session.delete(row)
            detail = {"ids": [r.id for r in rows]}
            self._record(session, actor=actor, action="provider.remove", target=name, detail=detail)
            session.commit()
        return {"removed": len(rows)}

    # ---------------------------------------------------------------- price override

    def prices(self) -> dict[str, Any]:
        with db.session(self.engine) as session:
            row = session.get(PriceOverride, PRICE_ROW)
        if row is None:
            return {"prices": None, "updated_at": None}
        return {"prices": json.loads(row.table_json), "updated_at": row.updated_at}

    def set_prices(self, body: Mapping[str, Any], *, actor: str) -> dict[str, Any]:
        from ccgate.accounting.pricing import PriceTable, PriceTableError

        table = body.get("prices")
        try:
            parsed = PriceTable.from_dict(validate.mapping(table, what="'prices'"))
        except PriceTableError as exc:
            raise InvalidRequestError(f"The price table is not valid: {exc}") from None
        with db.session(self.engine) as session:
            row = session.get(PriceOverride, PRICE_ROW) or PriceOverride(
                id=PRICE_ROW, table_json="", updated_at=0
            )
            row.table_json, row.updated_at = json.dumps(table, sort_keys=True), self.clock()
            session.add(row)
            detail = {"version": validate.mapping(table).get("version")}
            self._record(session, actor=actor, action="prices.set", target="prices", detail=detail)
            session.commit()
        return {**self.prices(), "repriced": self._reprice(parsed)}

    def _reprice(self, table: Any) -> dict[str, int]:
        """Records once priced as estimates that ``table`` now prices exactly get its price."""
        from ccgate.server import usage

        return usage.reprice(self.engine, table, now=self.clock())

    def clear_prices(self, *, actor: str) -> dict[str, Any]:
        with db.session(self.engine) as session:
            row = session.get(PriceOverride, PRICE_ROW)
            if row is not None:
                session.delete(row)
                self._record(
                    session, actor=actor, action="prices.clear", target="prices", detail={}
                )
                session.commit()
        from ccgate.accounting.pricing import PriceTable

        self._reprice(PriceTable.default())  # daemons go back to it; so do the records
        return self.prices()

    # ---------------------------------------------------------------- customers and teams

    def list_customers(self) -> dict[str, Any]:
        with db.session(self.engine) as session:
            rows = session.exec(select(Customer).order_by(col(Customer.name))).all()
        return {"customers": [customer_info(r) for r in rows]}

    def create_customer(self, body: Mapping[str, Any], *, actor: str) -> dict[str, Any]:
        name = validate.name(body)
        row = Customer(id=new_id("cust"), name=name, created_at=self.clock())
        _set_budget(row, validate.budget(body.get("budget")))
        info = customer_info(row)
        with db.session(self.engine) as session:
            session.add(row)
            self._record(session, actor=actor, action="customer.create", target=name, detail=info)
            self._commit(session, kind="customer", name=name)
        return info

    def list_teams(self) -> dict[str, Any]:
        with db.session(self.engine) as session:
            rows = session.exec(select(Team).order_by(col(Team.name))).all()
            names = _customer_names(session)
        return {"teams": [team_info(r, names) for r in rows]}

    def create_team(self, body: Mapping[str, Any], *, actor: str) -> dict[str, Any]:
        name = validate.name(body)
        customer_name = validate.optional_name(body, "customer")
        with db.session(self.engine) as session:
            customer = _find_customer(session, customer_name) if customer_name else None
            row = Team(
                id=new_id("team"),
                name=name,
                customer_id=customer.id if customer else None,
                created_at=self.clock(),
                repo_attribution=_repo_attribution(body),
            )
            _set_budget(row, validate.budget(body.get("budget")))
            _apply_session_caps(row, body, partial=False)
            info = team_info(row, {customer.id: customer.name} if customer else {})
            session.add(row)
            self._record(session, actor=actor, action="team.create", target=name, detail=info)
            self._commit(session, kind="team", name=name)
        return info

    def update_team(self, name: str, body: Mapping[str, Any], *, actor: str) -> dict[str, Any]:
        """Change a team: only the fields given (budget, repo attribution, session caps)."""
        unknown = sorted(set(body) - TEAM_UPDATE_FIELDS)
        if unknown:
            raise InvalidRequestError(
                f"A team update takes {', '.join(sorted(TEAM_UPDATE_FIELDS))}; got {unknown[0]!r}."
            )
        if not body:
            raise InvalidRequestError("Nothing to change: give at least one field.")
        with db.session(self.engine) as session:
            row = _find_team(session, name)
            if "budget" in body:
                _set_budget(row, validate.budget(body.get("budget")))
            if "repo_attribution" in body:
                row.repo_attribution = _repo_attribution(body)
            _apply_session_caps(row, body, partial=True)
            info = team_info(row, _customer_names(session))
            session.add(row)
            changed = {k: info[k] for k in body if k in info}
            self._record(session, actor=actor, action="team.update", target=name, detail=changed)
            session.commit()
        return info

    # ---------------------------------------------------------------- virtual keys

    def list_keys(self) -> dict[str, Any]:
        with db.session(self.engine) as session:
            rows = session.exec(select(VirtualKey).order_by(col(VirtualKey.name))).all()
            return {"keys": [key_info(session, r) for r in rows]}

    def get_key(self, name: str) -> dict[str, Any]:
        with db.session(self.engine) as session:
            return key_info(session, _find_key(session, name))

    def create_key(self, body: Mapping[str, Any], *, actor: str) -> dict[str, Any]:
        name = validate.name(body)
        plaintext = CLIENT_KEY_PREFIX + secrets.token_urlsafe(32)
        row = VirtualKey(
            id=new_id("key"),
            name=name,
            key_hash=sha256_hex(plaintext),
            prefix=plaintext[:KEY_PREFIX_CHARS],
            created_at=self.clock(),
        )
        with db.session(self.engine) as session:
            _apply_key_fields(session, row, body, partial=False)
            code = self._issue_code(row, body)
            info = key_info(session, row)
            session.add(row)
            self._record(session, actor=actor, action="key.create", target=name, detail=info)
            self._commit(session, kind="key", name=name)
        return {**info, "key": plaintext, **({"enrolment_code": code} if code else {})}

    def _issue_code(self, row: VirtualKey, body: Mapping[str, Any]) -> str | None:
        """A new one-time enrolment code when ``body`` asks for one; only its hash is kept."""
        wanted = body.get("enrolment_code", False)
        if not isinstance(wanted, bool):
            raise InvalidRequestError("'enrolment_code' must be true or false.")
        if not wanted:
            return None
        raw = base64.b32encode(secrets.token_bytes(10)).decode("ascii")  # 16 characters
        code = "-".join(raw[i : i + 4] for i in range(0, 16, 4))
        row.enrol_code_hash = sha256_hex(devices_mod.normalise_code(code))
        row.enrol_code_expires_at = self.clock() + ENROL_CODE_TTL_S
        return code

    def update_key(self, name: str, body: Mapping[str, Any], *, actor: str) -> dict[str, Any]:
        if "name" in body:
            raise InvalidRequestError("A key's name cannot be changed; create a new key instead.")
        with db.session(self.engine) as session:
            row = _find_key(session, name)
            _apply_key_fields(session, row, body, partial=True)
            code = self._issue_code(row, body)
            info = key_info(session, row)
            session.add(row)
            changed = {k: info[k] for k in body if k in info}
            if code:
                changed["enrolment_code_expires_at"] = row.enrol_code_expires_at
            self._record(session, actor=actor, action="key.update", target=name, detail=changed)
            session.commit()
        return {**info, **({"enrolment_code": code} if code else {})}

    def revoke_key(self, name: str, *, actor: str) -> dict[str, Any]:
        with db.session(self.engine) as session:
            row = _find_key(session, name)
            if row.revoked_at is None:  # revoking twice keeps the first time
                row.revoked_at = self.clock()
                session.add(row)
                self._record(
                    session, actor=actor, action="key.revoke", target=name, detail={"id": row.id}
                )
                session.commit()
                session.refresh(row)
            return key_info(session, row)

    # ---------------------------------------------------------------- devices

    def list_devices(self, *, key: str | None = None, status: str | None = None) -> dict[str, Any]:
        if status is not None and status not in DEVICE_STATES:
            raise InvalidRequestError(
                f"'status' must be one of {', '.join(DEVICE_STATES)}; got {status!r}."
            )
        with db.session(self.engine) as session:
            query = select(Device, VirtualKey).where(Device.key_id == VirtualKey.id)
            if key is not None:
                query = query.where(VirtualKey.name == key)
            if status is not None:
                query = query.where(Device.status == status)
            rows = session.exec(query.order_by(col(Device.created_at), col(Device.id))).all()
        return {"devices": [device_info(d, k) for d, k in rows]}

    def approve_device(self, device_id: str, *, actor: str) -> dict[str, Any]:
        with db.session(self.engine) as session:
            device, key = _find_device(session, device_id)
            devices_mod.lock_key(session, key.id)
            session.refresh(device)  # as it is now, under the lock
            if device.status == "revoked":
                raise ConflictError(
                    f"Device {device_id} was revoked; a revoked device stays revoked. The "
                    "developer runs `ccgate login` again to enrol a new one."
                )
            if device.status == "pending":
                approved = session.exec(
                    select(Device).where(Device.key_id == key.id, Device.status == "approved")
                ).all()
                if not key.ci and len(approved) >= key.max_devices:
                    raise ConflictError(
                        f"The key {key.name!r} already has {len(approved)} approved device(s), "
                        f"its limit; revoke one first (`ccgate admin devices revoke ID`) or "
                        f"raise it (`ccgate admin keys update {key.name} --max-devices N`)."
                    )
                self._decide(session, device, key, "approved", actor=actor)
            return device_info(device, key)

    def revoke_device(self, device_id: str, *, actor: str) -> dict[str, Any]:
        with db.session(self.engine) as session:
            device, key = _find_device(session, device_id)
            if device.status != "revoked":  # revoking twice keeps the first decision
                self._decide(session, device, key, "revoked", actor=actor)
            return device_info(device, key)

    def _decide(
        self, session: Session, device: Device, key: VirtualKey, status: str, *, actor: str
    ) -> None:
        """Approve or revoke ``device``, with its audit entry, in one commit."""
        device.status, device.decided_at, device.decided_by = status, self.clock(), actor
        session.add(device)
        action = "device.approve" if status == "approved" else "device.revoke"
        detail = {"key": key.name, "name": device.name}
        self._record(session, actor=actor, action=action, target=device.id, detail=detail)
        session.commit()


# -------------------------------------------------------------------- helpers


def budget_json(row: Customer | Team | VirtualKey) -> dict[str, Any] | None:
    if row.budget_micros is None or row.budget_period is None:
        return None
    return {
        "limit_micros": row.budget_micros,
        "period": row.budget_period,
        "rolling": row.budget_rolling,
    }


def _set_budget(row: Customer | Team | VirtualKey, budget: tuple[int, str, bool] | None) -> None:
    if budget is None:
        row.budget_micros, row.budget_period, row.budget_rolling = None, None, False
    else:
        row.budget_micros, row.budget_period, row.budget_rolling = budget


def provider_info(row: Provider) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "kind": row.kind,
        "base_url": row.base_url,
        "priority": row.priority,
        "weight": row.weight,
        "options": json.loads(row.options_json) if row.options_json else {},
        "anthropic_key_id": row.anthropic_key_id,
        "created_at": row.created_at,
        "timeouts": json.loads(row.timeouts) if row.timeouts else {},
        # A daemon saw the upstream refuse this key (401/403); a new entry replaces it.
        "key_status": "failing" if row.key_failed_at is not None else "ok",
        "key_failed_at": row.key_failed_at,
        "key_failed_status": row.key_failed_status,
    }


def provider_timeouts(raw: object) -> dict[str, float]:
    """A provider entry's upstream timeouts: seconds per phase, unset phases default."""
    from ccgate.policy.bundle import MAX_TIMEOUT_S, PROVIDER_TIMEOUTS

    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise InvalidRequestError(
            f"'timeouts' must be an object with any of {', '.join(PROVIDER_TIMEOUTS)}."
        )
    out: dict[str, float] = {}
    for name, value in raw.items():
        if name not in PROVIDER_TIMEOUTS:
            raise InvalidRequestError(
                f"'timeouts.{name}' is not a timeout; use {', '.join(PROVIDER_TIMEOUTS)}."
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequestError(f"'timeouts.{name}' must be a number of seconds.")
        if not 0 < value <= MAX_TIMEOUT_S:
            raise InvalidRequestError(
                f"'timeouts.{name}' must be above 0 and at most {MAX_TIMEOUT_S:.0f} seconds."
            )
        out[name] = float(value)
    return out


def _provider_options(kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise InvalidRequestError("'options' must be an object of the provider kind's options.")
    try:
        return provider_kinds.check_options(
            kind, options, has_base_url=body.get("base_url") is not None
        )
    except provider_kinds.ProviderOptionsError as exc:
        raise InvalidRequestError(f"'options': {exc}.") from None


def customer_info(row: Customer) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "budget": budget_json(row),
        "created_at": row.created_at,
    }


def team_info(row: Team, customer_names: Mapping[str, str]) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "customer": customer_names.get(row.customer_id) if row.customer_id else None,
        "budget": budget_json(row),
        "repo_attribution": row.repo_attribution,
        "session_budget_micros": row.session_budget_micros,
        "session_rpm": row.session_rpm,
        "created_at": row.created_at,
    }


def device_info(device: Device, key: VirtualKey) -> dict[str, Any]:
    return {
        "id": device.id,
        "key": key.name,
        "name": device.name,
        "status": device.status,
        "public_key": device.public_key,
        "created_at": device.created_at,
        "decided_at": device.decided_at,
        "decided_by": device.decided_by,
    }


def find_providers(session: Session, name: str, *, provider_id: str | None) -> list[Provider]:
    """The entries of provider ``name`` (only ``provider_id`` when given); NotFoundError if none."""
    query = select(Provider).where(Provider.name == name)
    if provider_id:
        query = query.where(Provider.id == provider_id)
    rows = list(session.exec(query).all())
    if not rows:
        which = f" with id {provider_id}" if provider_id else ""
        raise NotFoundError(f"No provider named {name!r}{which}.")
    return rows


def _find_device(session: Session, device_id: str) -> tuple[Device, VirtualKey]:
    device = session.get(Device, device_id)
    key = session.get(VirtualKey, device.key_id) if device is not None else None
    if device is None or key is None:
        raise NotFoundError(f"No device {device_id!r}; `ccgate admin devices list` shows them.")
    return device, key


def key_info(session: Session, row: VirtualKey) -> dict[str, Any]:
    team, customer = key_levels(session, row)
    return {
        "id": row.id,
        "name": row.name,
        "prefix": row.prefix,
        "team": team.name if team else None,
        "customer": customer.name if customer else None,
        "budget": budget_json(row),
        "models": json.loads(row.models),
        "rpm": row.rpm,
        "tpm": row.tpm,
        "expires_at": row.expires_at,
        "revoked_at": row.revoked_at,
        "auth": row.auth,
        "offline_grace_micros": row.offline_grace_micros,
        "token_budget": token_budget_json(row),
        "max_devices": row.max_devices,
        "ci": row.ci,
        "repo_attribution": row.repo_attribution,
        "session_budget_micros": row.session_budget_micros,
        "session_rpm": row.session_rpm,
        "enrolment_code_expires_at": row.enrol_code_expires_at if row.enrol_code_hash else None,
        "created_at": row.created_at,
    }


def token_budget_json(row: VirtualKey) -> dict[str, Any] | None:
    if row.token_budget_tokens is None or row.token_budget_period is None:
        return None
    return {
        "limit_tokens": row.token_budget_tokens,
        "period": row.token_budget_period,
        "rolling": row.token_budget_rolling,
    }


def key_levels(session: Session, row: VirtualKey) -> tuple[Team | None, Customer | None]:
    """The key's team, and its customer: the team's when it has a team, else its own."""
    team = session.get(Team, row.team_id) if row.team_id else None
    customer_id = team.customer_id if team else row.customer_id
    customer = session.get(Customer, customer_id) if customer_id else None
    return team, customer


def _customer_names(session: Session) -> dict[str, str]:
    return {c.id: c.name for c in session.exec(select(Customer)).all()}


def _find_customer(session: Session, name: str) -> Customer:
    row = session.exec(select(Customer).where(Customer.name == name)).first()
    if row is None:
        raise NotFoundError(
            f"No customer named {name!r}; create it with `ccgate admin customers create`."
        )
    return row


def _find_team(session: Session, name: str) -> Team:
    row = session.exec(select(Team).where(Team.name == name)).first()
    if row is None:
        raise NotFoundError(f"No team named {name!r}; create it with `ccgate admin teams create`.")
    return row


def _find_key(session: Session, name: str) -> VirtualKey:
    row = session.exec(select(VirtualKey).where(VirtualKey.name == name)).first()
    if row is None:
        raise NotFoundError(f"No key named {name!r}; `ccgate admin keys list` shows them.")
    return row


def _apply_key_fields(
    session: Session, row: VirtualKey, body: Mapping[str, Any], *, partial: bool
) -> None:
    """Copy the create/update fields in ``body`` onto ``row`` (every field unless partial)."""

    def given(field_name: str) -> bool:
        return not partial or field_name in body

    if given("team"):
        team_name = validate.optional_name(body, "team")
        row.team_id = _find_team(session, team_name).id if team_name else None
    if partial and "team" in body and "customer" not in body:
        row.customer_id = None  # moving to a team: the team's customer applies from now on
    if given("customer"):
        customer_name = validate.optional_name(body, "customer")
        row.customer_id = _find_customer(session, customer_name).id if customer_name else None
    _reconcile_levels(session, row)
    if given("budget"):
        _set_budget(row, validate.budget(body.get("budget")))
    if given("models"):
        row.models = json.dumps(validate.models(body.get("models")))
    if given("rpm"):
        row.rpm = validate.integer(body, "rpm", default=None, minimum=1)
    if given("tpm"):
        row.tpm = validate.integer(body, "tpm", default=None, minimum=1)
    if given("expires_at"):
        row.expires_at = validate.number(body, "expires_at")
    if given("offline_grace_micros"):
        grace = validate.integer(
            body, "offline_grace_micros", default=0, maximum=validate.MAX_MICROS
        )
        row.offline_grace_micros = grace or 0
    if given("token_budget"):
        token_budget = validate.token_budget(body.get("token_budget"))
        row.token_budget_tokens, row.token_budget_period, row.token_budget_rolling = (
            token_budget or (None, None, False)
        )
    if given("ci"):
        ci = body.get("ci", False)
        if not isinstance(ci, bool):
            raise InvalidRequestError("'ci' must be true or false.")
        row.ci = ci
    if given("max_devices") or "ci" in body:  # --ci alone: that kind's default limit
        default = DEFAULT_CI_DEVICES if row.ci else 1
        limit = validate.integer(
            body, "max_devices", default=default, minimum=1, maximum=MAX_DEVICES
        )
        row.max_devices = limit or default
    if given("repo_attribution"):
        row.repo_attribution = _repo_attribution(body)
    _apply_session_caps(row, body, partial=partial)
    if given("auth"):
        auth = body.get("auth") or "provider"
        if auth not in AUTH_MODES:
            raise InvalidRequestError(f"'auth' must be provider or passthrough; got {auth!r}.")
        row.auth = auth


TEAM_UPDATE_FIELDS: Final = frozenset(
    {"budget", "repo_attribution", "session_budget_micros", "session_rpm"}
)


def _apply_session_caps(row: Team | VirtualKey, body: Mapping[str, Any], *, partial: bool) -> None:
    """``session_budget_micros`` and ``session_rpm``: a positive whole number, or null (none)."""
    if not partial or "session_budget_micros" in body:
        row.session_budget_micros = validate.integer(
            body, "session_budget_micros", default=None, minimum=1, maximum=validate.MAX_MICROS
        )
    if not partial or "session_rpm" in body:
        row.session_rpm = validate.integer(body, "session_rpm", default=None, minimum=1)


def _repo_attribution(body: Mapping[str, Any]) -> bool:
    value = body.get("repo_attribution", True)
    if not isinstance(value, bool):
        raise InvalidRequestError("'repo_attribution' must be true or false.")
    return value


def _reconcile_levels(session: Session, row: VirtualKey) -> None:
    # A key hangs under a team (and so under the team's customer) or directly under a customer;
    # naming both is fine only when they agree, and then the team carries the link.
    if row.team_id is None or row.customer_id is None:
        return
    team = session.get(Team, row.team_id)
    if team is not None and team.customer_id == row.customer_id:
        row.customer_id = None
        return
    raise InvalidRequestError(
        "A key belongs to a team or directly to a customer: the team given does not belong to "
        "that customer. Give only --team, or only --customer."
    )
