"""Server mode inside the daemon: the signed bundle, admission, and usage sync.

The gateway asks a ``Policy`` four things per request: who is this key, may the gateway serve at
all, may this request go (admission), and where does it go (upstream). ``LocalPolicy`` answers
for standalone mode (one local key, no limits). ``Governor`` answers from the bundle the server
signed for this key and device:

- At start it re-verifies the persisted bundle against the key pinned at login. A bundle that
  fails (tampered, rolled back, expired) is not obeyed: until a good one arrives from the
  server, every request gets 503 saying why.
- A poll loop fetches the bundle every ``poll_interval_s`` (ETag, so unchanged is a 304). A
  server that answers 401 (revoked or expired key) makes the daemon refuse the key at once.
- A sync loop pushes finished ledger rows in batches; the server keeps each id once, so a
  retry after a lost answer counts nothing twice. The ledger is the queue.
- Admission is ``admission.Limiter``: budgets reserve the worst case before a request goes out.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol

import anyio

from ccgate import admission, profiles
from ccgate.bundle import Bundle, BundleError, BundleStore, DeviceKey, unseal
from ccgate.ledger import Ledger, LedgerRow
from ccgate.paths import Paths
from ccgate.pricing import PriceTable
from ccgate.remote import KeyRefused, ServerClient, ServerError

log = logging.getLogger("ccgate.governor")

SYNC_BATCH = 1000
SYNC_INTERVAL_S = 2.0


@dataclass(frozen=True)
class Upstream:
    base_url: str
    api_key: str | None
    provider: str
    passthrough: bool


@dataclass(frozen=True)
class Refusal:
    """Why the gateway cannot serve at all right now (a status and a message for people)."""

    status: int
    error_type: str
    message: str


class Policy(Protocol):
    mode: str
    passthrough: bool

    def authenticate(self, token: str | None) -> str | None: ...
    def refusal(self) -> Refusal | None: ...
    def upstream(self) -> Upstream: ...
    def prices(self) -> PriceTable: ...
    def admit(
        self, req: admission.Request
    ) -> tuple[admission.Ticket | None, admission.Reject | None]: ...
    def settle(
        self, ticket: admission.Ticket | None, *, cost_micros: int, tokens: int, now: float
    ) -> None: ...
    def finished(self) -> None: ...
    def snapshot(self, *, now: float) -> dict[str, Any]: ...


@dataclass
class LocalPolicy:
    """Standalone mode: the local key, the configured upstream, no limits."""

    client_keys: dict[str, str]
    upstream_url: str
    upstream_key: str | None
    passthrough: bool
    table: PriceTable
    provider: str = "anthropic"
    mode: str = "standalone"

    def authenticate(self, token: str | None) -> str | None:
        return None if token is None else self.client_keys.get(token)

    def refusal(self) -> Refusal | None:
        return None

    def upstream(self) -> Upstream:
        return Upstream(self.upstream_url, self.upstream_key, self.provider, self.passthrough)

    def prices(self) -> PriceTable:
        return self.table

    def admit(
        self, req: admission.Request
    ) -> tuple[admission.Ticket | None, admission.Reject | None]:
        return None, None

    def settle(
        self, ticket: admission.Ticket | None, *, cost_micros: int, tokens: int, now: float
    ) -> None:
        return None

    def finished(self) -> None:
        return None

    def snapshot(self, *, now: float) -> dict[str, Any]:
        return {}


def admission_policy(bundle: Bundle) -> admission.Policy:
    levels: list[admission.LevelLimit] = []
    for kind, name, budget in (
        ("key", bundle.key.name, bundle.key.budget),
        (
            "team",
            bundle.team.name if bundle.team else "",
            bundle.team.budget if bundle.team else None,
        ),
        (
            "customer",
            bundle.customer.name if bundle.customer else "",
            bundle.customer.budget if bundle.customer else None,
        ),
    ):
        if budget is not None:
            levels.append(
                admission.LevelLimit(
                    kind=kind,  # type: ignore[arg-type]
                    name=name,
                    limit_micros=budget.limit_micros,
                    period=budget.period,
                    rolling=budget.rolling,
                )
            )
    return admission.Policy(
        key_name=bundle.key.name,
        models=bundle.key.models,
        rpm=bundle.key.rpm,
        tpm=bundle.key.tpm,
        expires_at=bundle.key.expires_at,
        revoked=False,
        levels=tuple(levels),
    )


@dataclass
class _SyncState:
    last_success: float | None = None
    last_error: str | None = None
    wake: anyio.Event = field(default_factory=anyio.Event)


class Governor:
    """The server-mode ``Policy``: see the module docstring."""

    mode = "server"
    passthrough = False

    def __init__(
        self,
        *,
        profile: profiles.Profile,
        key: str,
        device: DeviceKey,
        store: BundleStore,
        ledger: Ledger,
    ) -> None:
        self.profile = profile
        self.ledger = ledger
        self.key = key
        self.device = device
        self.store = store
        self.bundle: Bundle | None = None
        self.problem: str | None = None  # why the held bundle cannot be obeyed
        self.key_refused: str | None = None
        self.etag: str | None = None
        self._table = PriceTable.default()
        self._upstream: Upstream | None = None
        self.limiter: admission.Limiter | None = None
        self.sync_state = _SyncState()

    @classmethod
    def from_profile(cls, *, paths: Paths, profile: profiles.Profile, ledger: Ledger) -> Governor:
        """The daemon's governor: secrets from the store, bundle under the state dir."""
        key, device_private = profiles.secrets(paths, profile.name)
        store = BundleStore(
            state_dir=profiles.bundle_dir(paths, profile.name),
            public_key=profile.public_key,
            device_id=profile.device_id,
        )
        return cls(
            profile=profile,
            key=key,
            device=DeviceKey.from_private_bytes(device_private),
            store=store,
            ledger=ledger,
        )

    # -- start and the bundle --------------------------------------------------------------

    def load(self, *, now: float) -> None:
        """Re-verify the persisted bundle; a bad one is remembered as the reason to refuse."""
        try:
            bundle = self.store.load(now=now)
        except BundleError as exc:
            self.problem = str(exc)
            log.error("persisted bundle refused: %s", exc)
            return
        if bundle is None:
            self.problem = "No policy bundle yet: the daemon has not reached the ccgate server."
            return
        self._install(bundle)
        for row in self.ledger.unsynced(key_id=self.key_id, limit=1_000_000):
            assert self.limiter is not None
            self.limiter.restore_unsynced(cost_micros=row.cost_micros, at=row.started_at)

    @property
    def key_id(self) -> str:
        return self.profile.key_id

    def _install(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.problem = None
        self.etag = f'"v{bundle.version}"'
        self._table = PriceTable.from_dict(bundle.prices) if bundle.prices else PriceTable.default()
        policy = admission_policy(bundle)
        if self.limiter is None:
            self.limiter = admission.Limiter(policy=policy, prices=self._table)
        else:
            self.limiter.set_policy(policy)
            self.limiter.set_prices(self._table)
        self._upstream = self._pick_upstream(bundle)
        self.passthrough = bundle.key.auth == "passthrough"

    def _pick_upstream(self, bundle: Bundle) -> Upstream | None:
        passthrough = bundle.key.auth == "passthrough"
        if not bundle.providers:
            return None
        entry = sorted(bundle.providers, key=lambda p: p.priority)[0]
        api_key = None
        if not passthrough:
            try:
                api_key = unseal(entry.sealed_key, device=self.device, device_id=bundle.device_id)
            except BundleError as exc:
                self.problem = str(exc)
                return None
        return Upstream(entry.base_url, api_key, entry.name, passthrough)

    def client(self) -> ServerClient:
        return ServerClient(self.profile.server_url, key=self.key, device_id=self.profile.device_id)

    async def refresh(self) -> str:
        """Poll the server for the bundle once; returns what happened, for `ccgate sync`."""
        try:
            async with self.client() as client:
                envelope, etag = await client.fetch_bundle(etag=self.etag if self.bundle else None)
        except KeyRefused as exc:
            self.key_refused = str(exc)
            return str(exc)
        except ServerError as exc:
            return str(exc)
        self.key_refused = None
        if envelope is None:
            return "bundle unchanged"
        try:
            bundle = self.store.accept(envelope, now=time.time())
        except BundleError as exc:
            log.error("bundle from the server refused: %s", exc)
            return str(exc)
        self._install(bundle)
        self.etag = etag or self.etag
        return f"bundle version {bundle.version}"

    # -- usage sync -----------------------------------------------------------------------

    async def sync(self) -> str:
        """Push every unsynced finished row, in batches; returns what happened."""
        pushed = 0
        while True:
            rows = await anyio.to_thread.run_sync(self._unsynced_batch)
            try:
                async with self.client() as client:
                    answer = await client.push_usage([_usage_record(r) for r in rows])
            except KeyRefused as exc:
                self.key_refused = str(exc)
                self.sync_state.last_error = str(exc)
                return str(exc)
            except ServerError as exc:
                self.sync_state.last_error = str(exc)
                return str(exc)
            now = time.time()
            if rows:
                ids = [r.id for r in rows]
                await anyio.to_thread.run_sync(partial(self.ledger.mark_synced, ids, at=now))
            self._apply_spent(rows, answer)
            self.sync_state.last_success = now
            self.sync_state.last_error = None
            pushed += len(rows)
            if len(rows) < SYNC_BATCH:
                return f"pushed {pushed} record(s)"

    def _unsynced_batch(self) -> list[LedgerRow]:
        return self.ledger.unsynced(key_id=self.key_id, limit=SYNC_BATCH)

    def _apply_spent(self, rows: list[LedgerRow], answer: dict[str, Any]) -> None:
        if self.limiter is None:
            return
        self.limiter.synced(sum(r.cost_micros for r in rows))
        spent = answer.get("spent") or {}
        for kind in ("key", "team", "customer"):
            level = spent.get(kind)
            if isinstance(level, dict) and level.get("period_start") is not None:
                self.limiter.set_spent(
                    kind,
                    window_start=float(level["period_start"]),
                    spent_micros=int(level.get("spent_micros", 0)),
                )

    async def sync_now(self) -> dict[str, str]:
        """What `ccgate sync` asks the running daemon to do: poll, then push."""
        bundle = await self.refresh()
        usage = await self.sync() if self.bundle is not None else "no bundle: nothing pushed"
        return {"bundle": bundle, "usage": usage}

    async def run(self) -> None:
        """The background loops, for the daemon's lifespan."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._poll_loop)
            tg.start_soon(self._sync_loop)

    async def _poll_loop(self) -> None:
        while True:
            result = await self.refresh()
            log.debug("bundle poll: %s", result)
            interval = self.bundle.poll_interval_s if self.bundle else 10
            await anyio.sleep(max(1, interval))

    async def _sync_loop(self) -> None:
        while True:
            with anyio.move_on_after(SYNC_INTERVAL_S if self.sync_state.last_error is None else 15):
                await self.sync_state.wake.wait()
            self.sync_state.wake = anyio.Event()
            if self.bundle is not None:
                result = await self.sync()
                log.debug("usage sync: %s", result)

    # -- the Policy interface ----------------------------------------------------------------

    def authenticate(self, token: str | None) -> str | None:
        import hmac

        if token is None or not hmac.compare_digest(token, self.key):
            return None
        return self.key_id

    def refusal(self) -> Refusal | None:
        if self.key_refused is not None:
            return Refusal(401, "authentication_error", self.key_refused)
        if self.problem is not None or self.bundle is None:
            return Refusal(
                503,
                "api_error",
                f"ccgate cannot serve under its policy: {self.problem} "
                f"`ccgate status` shows the state.",
            )
        if time.time() >= self.bundle.expires_at:
            return Refusal(
                503,
                "api_error",
                "ccgate's policy bundle has expired and the ccgate server cannot be reached. "
                "Run `ccgate sync` once the server is reachable.",
            )
        if self._upstream is None:
            return Refusal(
                503, "api_error", "The ccgate server has no provider configured for this key."
            )
        return None

    def upstream(self) -> Upstream:
        assert self._upstream is not None
        return self._upstream

    def prices(self) -> PriceTable:
        return self._table

    def admit(
        self, req: admission.Request
    ) -> tuple[admission.Ticket | None, admission.Reject | None]:
        assert self.limiter is not None
        return self.limiter.check(req)

    def settle(
        self, ticket: admission.Ticket | None, *, cost_micros: int, tokens: int, now: float
    ) -> None:
        if ticket is not None and self.limiter is not None:
            self.limiter.settle(ticket, cost_micros=cost_micros, tokens=tokens, now=now)

    def finished(self) -> None:
        self.sync_state.wake.set()

    def snapshot(self, *, now: float) -> dict[str, Any]:
        bundle = self.bundle
        return {
            "server": self.profile.server_url,
            "profile": self.profile.name,
            "key": self.profile.key_prefix + "…",
            "bundle_version": bundle.version if bundle else None,
            "bundle_expires_at": _iso(bundle.expires_at) if bundle else None,
            "problem": self.problem or self.key_refused,
            "limits": self.limiter.snapshot(now=now) if self.limiter else None,
            "unsynced": self.ledger.count_unsynced(key_id=self.key_id),
            "last_sync": _iso(self.sync_state.last_success)
            if self.sync_state.last_success
            else None,
            "last_sync_error": self.sync_state.last_error,
        }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _usage_record(row: LedgerRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "started_at": row.started_at,
        "model": row.model,
        "status": row.status,
        "outcome": row.outcome,
        "streamed": row.streamed,
        "input_tokens": row.input_tokens,
        "output_tokens": row.output_tokens,
        "cache_creation_input_tokens": row.cache_creation_input_tokens,
        "cache_creation_1h_input_tokens": row.cache_creation_1h_input_tokens,
        "cache_read_input_tokens": row.cache_read_input_tokens,
        "web_search_requests": row.web_search_requests,
        "cost_micros": row.cost_micros,
        "latency_ms": row.latency_ms,
        "session_id": row.session_id,
        "provider": row.provider,
        "billing": row.billing,
    }
