"""Server mode inside the daemon: the signed bundle, admission, leases and usage sync.

``Governor`` is the server-mode ``Policy`` (gateway/policy.py): it answers the gateway from the
bundle the server signed for this key and device:

- At start it re-verifies the persisted bundle against the key pinned at login. A bundle that
  fails (tampered, rolled back, expired) is not obeyed: until a good one arrives from the
  server, every request gets 503 saying why.
- A poll loop fetches the bundle every ``poll_interval_s`` (ETag, so unchanged is a 304). A
  server that answers 401 (revoked or expired key) makes the daemon refuse the key at once.
- Budgets are spent from leases (``wallet.Wallet``): a request reserves its worst case inside a
  lease before it goes out. When no lease has room, admission waits for the server to grant
  more; a lease loop asks early, before the slice runs out. Offline, only the admin's grace may
  be spent beyond the leases held.
- A sync loop pushes finished ledger rows in batches; the server keeps each id once, so a
  retry after a lost answer counts nothing twice. The ledger is the queue.
- Model allowlists, rate limits and key expiry are ``admission.Limiter``; token budgets are
  ``wallet.TokenMeter``.
- One server client (one connection pool) serves every poll, sync batch and lease request
  while the governor runs (``connected``), and is closed when it stops. Its transport and the
  clock are injectable, so tests drive the governor in-process against the real server app.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx

from ccgate._files import atomic_write
from ccgate._format import iso_utc
from ccgate.accounting import periods, quota
from ccgate.accounting.pricing import PriceTable
from ccgate.client import profiles
from ccgate.client.remote import KeyRefused, ServerClient, ServerError
from ccgate.gateway.policy import Refusal, Ticket, Upstream
from ccgate.gateway.routing import KeyFailure, Plan, PoolKey, Router, Timeouts, single
from ccgate.paths import Paths
from ccgate.policy import limits as admission
from ccgate.policy.bundle import (
    Bundle,
    BundleError,
    BundleStore,
    DeviceKey,
    KeyPolicy,
    LevelPolicy,
    unseal,
)
from ccgate.policy.limits import estimate_input_tokens, format_usd
from ccgate.policy.wallet import GRACE, Lease, TokenMeter, Wallet
from ccgate.store.ledger import Ledger, LedgerRow

log = logging.getLogger("ccgate.governor")

DEFAULT_PASSTHROUGH_UPSTREAM = "https://api.anthropic.com"
SYNC_BATCH = 1000
SYNC_INTERVAL_S = 2.0
SYNC_DEBOUNCE_S = 0.2
SPENT_REFRESH_S = 60.0
LEASE_WAIT_S = 10.0


def has_budget(bundle: Bundle) -> bool:
    return bool(_level_budgets(bundle))


def admission_policy(bundle: Bundle) -> admission.KeyRules:
    """Models, rates and expiry; budgets are not here: leases enforce them."""
    return admission.KeyRules(
        key_name=bundle.key.name,
        models=bundle.key.models,
        rpm=bundle.key.rpm,
        tpm=bundle.key.tpm,
        expires_at=bundle.key.expires_at,
        revoked=False,
    )


def session_caps(bundle: Bundle) -> admission.SessionCaps:
    """The tightest of the key's and its team's session caps, each naming who set it."""
    levels: list[tuple[str, KeyPolicy | LevelPolicy]] = [(f"key '{bundle.key.name}'", bundle.key)]
    if bundle.team is not None:
        levels.append((f"team '{bundle.team.name}'", bundle.team))
    budget = min(
        (
            (lvl.session_budget_micros, who)
            for who, lvl in levels
            if lvl.session_budget_micros is not None
        ),
        default=(None, "the key"),
    )
    rpm = min(
        ((lvl.session_rpm, who) for who, lvl in levels if lvl.session_rpm is not None),
        default=(None, "the key"),
    )
    return admission.SessionCaps(
        budget_micros=budget[0],
        rpm=rpm[0],
        budget_source=budget[1],
        rpm_source=rpm[1],
        raise_hint="ask your ccgate admin to raise it",
    )


def budget_message(limited: dict[str, Any] | None, *, server_url: str, offline: bool) -> str:
    """The 402 sentence: which budget, how much, when it resets, whom to ask."""
    if offline or not limited:
        return (
            f"ccgate cannot reach its server ({server_url}) and this machine's budget allowance "
            "is used up. Requests resume once the server is reachable; ask your ccgate admin "
            "if it stays down."
        )
    level = str(limited.get("level", "key"))
    name = limited.get("name") or ""
    held = int(limited.get("outstanding_micros") or 0)
    held_text = f" and {format_usd(held)} held in leases by this and other machines" if held else ""
    return (
        f"{level.capitalize()} '{name}' budget exhausted: "
        f"{format_usd(int(limited.get('spent_micros') or 0))} spent{held_text} of "
        f"{format_usd(int(limited.get('limit_micros') or 0))} ({limited.get('resets', '')}). "
        "Ask your ccgate admin to raise it."
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
        passthrough_upstream: str = DEFAULT_PASSTHROUGH_UPSTREAM,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.profile = profile
        self.transport = transport
        self.clock = clock
        self.passthrough_upstream = passthrough_upstream
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
        # Key pools, fallbacks and breakers (gateway/routing.py); kept across bundle updates.
        self.router = Router()
        self.timeouts = Timeouts()
        self.limiter: admission.Limiter | None = None
        self.wallet = Wallet()
        self.tokens: TokenMeter | None = None
        self.limited_by: dict[str, Any] | None = None
        self.sessions = admission.SessionMeter(
            admission.SessionCaps(), spent_before=ledger.session_spent
        )
        self.last_spent: dict[str, Any] = {}  # the server's Spent, from the last answer
        self.offline = False
        self.sync_state = _SyncState()
        self._lease_lock = anyio.Lock()
        self._lease_wake = anyio.Event()
        self._server: ServerClient | None = None
        self._server_users = 0

    @classmethod
    def from_profile(
        cls,
        *,
        paths: Paths,
        profile: profiles.Profile,
        ledger: Ledger,
        passthrough_upstream: str = "",
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Governor:
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
            passthrough_upstream=passthrough_upstream or DEFAULT_PASSTHROUGH_UPSTREAM,
            transport=transport,
            clock=clock,
        )

    @property
    def key_id(self) -> str:
        return self.profile.key_id

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
        self.problem = self._not_ours(bundle)
        if self.problem is not None:
            log.error("persisted bundle refused: %s", self.problem)
            return
        self._install(bundle)
        self._load_leases(now=now)
        assert self.limiter is not None
        for row in self.ledger.unsynced(key_id=self.key_id, limit=1_000_000):
            if self.tokens is not None:
                self.tokens.local_tokens += _tokens(row)

    def _not_ours(self, bundle: Bundle) -> str | None:
        """Why a verified bundle for this device is still not this key's, or None.

        The store already checks the signature and the device; a bundle signed for another
        virtual key (another profile's, copied over) must not hand this one its policy."""
        digest = hashlib.sha256(self.key.encode("utf-8")).hexdigest()
        if bundle.key.id != self.key_id or not hmac.compare_digest(bundle.key.hash, digest):
            return (
                f"The policy bundle is for the key {bundle.key.name!r}, not this profile's "
                f"({self.profile.key_prefix}...); it is not obeyed. Run `ccgate sync`, or "
                "`ccgate login` again."
            )
        return None

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
        self.sessions.caps = session_caps(bundle)
        self.wallet.grace_micros = bundle.key.offline_grace_micros
        self.wallet.unlimited = not has_budget(bundle)
        budget = bundle.key.token_budget
        if budget is None:
            self.tokens = None
        elif self.tokens is None or (self.tokens.limit_tokens, self.tokens.period) != (
            budget.limit_tokens,
            budget.period,
        ):
            self.tokens = TokenMeter(budget.limit_tokens, budget.period, budget.rolling)
        self._upstream = self._pick_upstream(bundle)
        self.passthrough = bundle.key.auth == "passthrough"

    def _pick_upstream(self, bundle: Bundle) -> Upstream | None:
        """Install the bundle's providers in the router; the first by priority is returned
        (what status names). An entry whose key cannot be opened is left out; none usable is
        the problem that refuses requests."""
        passthrough = bundle.key.auth == "passthrough"
        if passthrough:
            # The user's own login (a seat or subscription) only works with Anthropic's API, and
            # the server sends no provider keys for it: the daemon's own upstream setting
            # (`ccgate up --upstream`, default api.anthropic.com) is where it goes.
            self.router.update(())
            return Upstream(self.passthrough_upstream, None, "anthropic", True)
        keys: list[PoolKey] = []
        problem: str | None = None
        for index, entry in enumerate(bundle.providers):
            try:
                api_key = (
                    None  # bedrock, vertex: the machine's own cloud credentials sign
                    if not entry.sealed_key
                    else unseal(entry.sealed_key, device=self.device, device_id=bundle.device_id)
                )
            except BundleError as exc:
                problem = str(exc)
                log.error("provider entry %s left out: %s", entry.id or entry.name, exc)
                continue
            upstream = Upstream(
                entry.base_url, api_key, entry.name, False, kind=entry.kind, options=entry.options
            )
            keys.append(
                PoolKey(
                    upstream,
                    label=entry.id or f"{entry.name}#{index}",
                    weight=entry.weight,
                    priority=entry.priority,
                    timeouts=self.timeouts.merged(entry.timeouts),
                )
            )
        self.router.update(keys)
        if not keys:
            if problem is not None:
                self.problem = problem
            return None
        return min(keys, key=lambda k: k.priority).upstream

    def client(self) -> ServerClient:
        """A new client of its own, for a caller outside the governor's loops to close."""
        return ServerClient(
            self.profile.server_url,
            key=self.key,
            device_id=self.profile.device_id,
            device=self.device,
            transport=self.transport,
        )

    @asynccontextmanager
    async def connected(self) -> AsyncIterator[ServerClient]:
        """The governor's server client, shared by everything that runs meanwhile.

        ``run`` holds it for the daemon's lifetime, so polls, sync batches and lease requests
        reuse one connection pool; a call made while nothing holds it (``ccgate sync`` without
        a daemon) opens it for that call. The last holder to leave closes it, even when
        cancelled: the pool's sockets must not outlive the event loop they belong to."""
        if self._server is None:
            self._server = self.client()
        server = self._server
        self._server_users += 1
        try:
            yield server
        finally:
            self._server_users -= 1
            if self._server_users == 0 and self._server is server:
                self._server = None
                with anyio.CancelScope(shield=True):
                    await server.aclose()

    async def refresh(self) -> str:
        """Poll the server for the bundle once; returns what happened, for `ccgate sync`."""
        try:
            async with self.connected() as client:
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
            bundle = self.store.accept(envelope, now=self.clock())
        except BundleError as exc:
            log.error("bundle from the server refused: %s", exc)
            return str(exc)
        problem = self._not_ours(bundle)
        if problem is not None:
            log.error("bundle from the server refused: %s", problem)
            self.problem = problem
            return problem
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
                failures = self.router.unreported_failures()
                async with self.connected() as client:
                    named = repo_attribution(self.bundle)
                    answer = await client.push_usage(
                        [_usage_record(r, named) for r in rows],
                        key_failures=[_key_failure(f) for f in failures],
                    )
            except KeyRefused as exc:
                self.key_refused = str(exc)
                self.sync_state.last_error = str(exc)
                return str(exc)
            except ServerError as exc:
                self.sync_state.last_error = str(exc)
                return str(exc)
            now = self.clock()
            if rows:
                ids = [r.id for r in rows]
                await anyio.to_thread.run_sync(partial(self.ledger.mark_synced, ids, at=now))
            self.router.mark_reported(failures)
            self._apply_spent(rows, answer)
            self.sync_state.last_success = now
            self.sync_state.last_error = None
            pushed += len(rows)
            if len(rows) < SYNC_BATCH:
                return f"pushed {pushed} record(s)"

    def _unsynced_batch(self) -> list[LedgerRow]:
        return self.ledger.unsynced(key_id=self.key_id, limit=SYNC_BATCH)

    def _apply_spent(self, rows: list[LedgerRow], answer: dict[str, Any]) -> None:
        spent = answer.get("spent")
        if not isinstance(spent, dict):
            spent = {}  # the rows are confirmed (remote.push_usage); a bad summary is not used
        else:
            self.last_spent = spent
        if self.tokens is not None:
            key_level = spent.get("key")
            server_tokens = key_level.get("tokens") if isinstance(key_level, dict) else None
            self.tokens.synced(
                sum(_tokens(r) for r in rows),
                server_tokens=int(server_tokens) if isinstance(server_tokens, int) else None,
            )

    # -- leases ---------------------------------------------------------------------------

    async def renew(self, *, want: int) -> None:
        """Ask the server for a lease (returning finished ones); one request at a time."""
        async with self._lease_lock, self.connected():
            now = self.clock()
            if want and self.wallet.reserve_possible(want, now=now):
                return  # another request's renewal already made room
            await self.sync()
            unsynced = await anyio.to_thread.run_sync(self._unsynced_lease_ids)
            done = self.wallet.finished(now=now, unsynced=unsynced)
            if want:
                # A request no lease here can fit: hand back the idle leases too, so their
                # unused money counts towards what the server can grant for it.
                done = sorted(set(done) | set(self.wallet.idle(unsynced=unsynced)))
            body = {
                "want_micros": want,
                "rate_micros_per_s": self.wallet.rate(now=now),
                "return": done,
            }
            try:
                async with self.connected() as client:
                    answer = await client.request_lease(body)
            except KeyRefused as exc:
                self.key_refused = str(exc)
                return
            except ServerError as exc:
                log.warning("lease request failed: %s", exc)
                self.offline = True
                return
            self.offline = False
            self.wallet.back_online()
            self.wallet.drop(done)
            self._save_leases()
            self.limited_by = answer.get("limited_by")
            if isinstance(answer.get("spent"), dict):
                self.last_spent = answer["spent"]
            if answer.get("unlimited"):
                self.wallet.unlimited = True
                return
            lease = answer.get("lease")
            if isinstance(lease, dict) and int(lease.get("granted_micros", 0)) > 0:
                self.wallet.add(
                    Lease(
                        id=str(lease["id"]),
                        granted=int(lease["granted_micros"]),
                        expires_at=float(lease["expires_at"]),
                    )
                )
                self._save_leases()

    @property
    def _leases_file(self) -> Path:
        return self.store.files.leases_file

    def _save_leases(self) -> None:
        """Leases outlive the process: a daemon restarted offline keeps serving from them."""
        data = [
            {"id": lease.id, "granted": lease.granted, "expires_at": lease.expires_at}
            for lease in self.wallet.leases.values()
        ]
        atomic_write(self._leases_file, json.dumps(data).encode("utf-8"))

    def _load_leases(self, *, now: float) -> None:
        try:
            data = json.loads(self._leases_file.read_text(encoding="utf-8"))
            leases = [
                Lease(
                    id=str(item["id"]),
                    granted=int(item["granted"]),
                    expires_at=float(item["expires_at"]),
                )
                for item in data
            ]
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable %s", self._leases_file)
            return
        used = self.ledger.spent_by_lease([lease.id for lease in leases])
        for lease in leases:
            lease.used = used.get(lease.id, 0)
            self.wallet.add(lease)

    def _unsynced_lease_ids(self) -> set[str]:
        rows = self.ledger.unsynced(key_id=self.key_id, limit=1_000_000)
        return {r.lease_id for r in rows if r.lease_id}

    async def return_leases(self) -> None:
        """At shutdown: push usage, then hand every idle lease back so others can use it."""
        async with self.connected():
            await self._return_idle()

    async def _return_idle(self) -> None:
        await self.sync()
        unsynced = await anyio.to_thread.run_sync(self._unsynced_lease_ids)
        idle = self.wallet.idle(unsynced=unsynced)
        if not idle:
            return
        try:
            async with self.connected() as client:
                for lease_id in idle:
                    await client.return_lease(lease_id)
        except ServerError as exc:
            log.warning("could not return leases: %s", exc)
            return
        self.wallet.drop(idle)
        self._save_leases()

    # -- loops ----------------------------------------------------------------------------

    async def sync_now(self) -> dict[str, str]:
        """What `ccgate sync` asks the running daemon to do: poll, then push."""
        async with self.connected():
            bundle = await self.refresh()
            usage = await self.sync() if self.bundle is not None else "no bundle: nothing pushed"
        return {"bundle": bundle, "usage": usage}

    async def run(self) -> None:
        """The background loops, for the daemon's lifespan; leases go back when it ends, and
        then the server client is closed."""
        async with self.connected():
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._poll_loop)
                    tg.start_soon(self._sync_loop)
                    tg.start_soon(self._lease_loop)
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await self.return_leases()

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
                # A burst of requests finishing together goes out as one batch.
                await anyio.sleep(SYNC_DEBOUNCE_S)
            self.sync_state.wake = anyio.Event()
            if self.bundle is not None and await self._sync_due():
                result = await self.sync()
                log.debug("usage sync: %s", result)

    async def _sync_due(self) -> bool:
        """Push when rows wait; otherwise only refresh the server's figures now and then."""
        last = self.sync_state.last_success
        if last is None or self.clock() - last >= SPENT_REFRESH_S:
            return True
        count = await anyio.to_thread.run_sync(
            partial(self.ledger.count_unsynced, key_id=self.key_id)
        )
        return count > 0

    async def _lease_loop(self) -> None:
        """Ask for a lease before the slice runs out, so requests rarely wait for one."""
        while True:
            with anyio.move_on_after(30 if not self.offline else 10):
                await self._lease_wake.wait()
            self._lease_wake = anyio.Event()
            now = self.clock()
            if self.bundle is not None and self.wallet.needs_renewal(now=now):
                await self.renew(want=0)

    # -- the Policy interface ----------------------------------------------------------------

    def authenticate(self, token: str | None) -> str | None:
        # Bytes: compare_digest raises TypeError on a str with non-ASCII characters.
        if token is None or not hmac.compare_digest(token.encode(), self.key.encode()):
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
        if self.clock() >= self.bundle.expires_at:
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

    def plan(self, affinity: str, *, now: float) -> Plan:
        upstream = self.upstream()
        if upstream.passthrough:
            return single(upstream, label="passthrough", timeouts=self.timeouts)
        return self.router.plan(affinity, now=now)

    def prices(self) -> PriceTable:
        return self._table

    async def admit(self, req: admission.Request) -> tuple[Ticket | None, admission.Reject | None]:
        assert self.limiter is not None
        inner, reject = self.limiter.check(req)
        if reject is not None or inner is None:
            return None, reject
        # The ticket grows with each reservation made; a refusal settles what it holds so far.
        held = Ticket(inner, None, inner.reserve_micros, 0)
        session_refused = self.sessions.check(req.session_id, now=req.now)
        if session_refused is not None:
            self.settle(held, cost_micros=0, tokens=0, now=req.now)
            return None, session_refused
        held = replace(held, session_id=req.session_id)
        if self.tokens is not None:
            worst_tokens = estimate_input_tokens(req.body_bytes) + max(req.max_tokens, 0)
            problem = self.tokens.check(worst_tokens, now=req.now)
            if problem is not None:
                self.settle(held, cost_micros=0, tokens=0, now=req.now)
                return None, _billing(problem + " Ask your ccgate admin to raise it.")
            held = replace(held, reserved_tokens=worst_tokens)
        lease_id = await self._reserve(inner.reserve_micros, now=req.now)
        if lease_id is None:
            self.settle(held, cost_micros=0, tokens=0, now=req.now)
            message = budget_message(
                self.limited_by, server_url=self.profile.server_url, offline=self.offline
            )
            return None, _billing(message)
        if self.wallet.needs_renewal(now=req.now):
            self._lease_wake.set()
        return replace(held, lease_id=lease_id or None), None

    async def _reserve(self, amount: int, *, now: float) -> str | None:
        """The lease id reserved against; "" when no budget applies; None when refused."""
        if self.wallet.unlimited:
            return ""
        lease_id = self.wallet.reserve(amount, now=now)
        if lease_id is None:
            with anyio.move_on_after(LEASE_WAIT_S):
                await self.renew(want=amount)
            if self.wallet.unlimited:
                return ""
            lease_id = self.wallet.reserve(amount, now=self.clock())
        if lease_id is None and self.offline and self.wallet.reserve_grace(amount):
            return GRACE
        return lease_id

    def settle(self, ticket: Ticket | None, *, cost_micros: int, tokens: int, now: float) -> None:
        if ticket is None:
            return
        if self.limiter is not None and ticket.limiter is not None:
            self.limiter.settle(ticket.limiter, cost_micros=cost_micros, tokens=tokens, now=now)
        if ticket.lease_id is not None:
            self.wallet.settle(
                ticket.lease_id, reserved=ticket.reserved_micros, actual=cost_micros, now=now
            )
        if self.tokens is not None and ticket.reserved_tokens:
            self.tokens.settle(reserved=ticket.reserved_tokens, actual=tokens)
        self.sessions.settle(ticket.session_id, cost_micros=cost_micros)

    def finished(self) -> None:
        self.sync_state.wake.set()

    def _budget_levels(self, now: float) -> list[dict[str, Any]]:
        """Per level: its limit, what the server last counted, what this machine holds leased."""
        if self.bundle is None:
            return []
        held = self.wallet.available(now)
        out = []
        for kind, name, budget in _level_budgets(self.bundle):
            server = self.last_spent.get(kind)
            spent = server.get("spent_micros") if isinstance(server, dict) else None
            out.append(
                {
                    "kind": kind,
                    "name": name,
                    "limit_micros": budget.limit_micros,
                    "period": budget.period,
                    "rolling": budget.rolling,
                    "spent_micros": spent,
                    "lease_available_micros": held,
                    "resets": periods.describe_reset(
                        budget.period, rolling=budget.rolling, now=now
                    ),
                }
            )
        return out

    def snapshot(self, *, now: float) -> dict[str, Any]:
        return {
            **profiles.summary(self.profile, self.bundle),
            "problem": self.key_refused or self.problem,  # the order refusal() answers in
            "limits": self.limiter.snapshot(now=now) if self.limiter else None,
            "budgets": self._budget_levels(now),
            "lease": {
                "unlimited": self.wallet.unlimited,
                "available_micros": self.wallet.available(now),
                "leases": len(self.wallet.leases),
                "offline": self.offline,
                "grace_used_micros": self.wallet.grace_used,
                "limited_by": self.limited_by,
            },
            "tokens": None
            if self.tokens is None
            else {
                "limit": self.tokens.limit_tokens,
                "used": self.tokens.server_tokens + self.tokens.local_tokens,
                "period": self.tokens.period,
                "resets": periods.describe_reset(
                    self.tokens.period, rolling=self.tokens.rolling, now=now
                ),
            },
            "providers": self.router.snapshot(now=now),  # key states and breakers, no secrets
            "unsynced": self.ledger.count_unsynced(key_id=self.key_id),
            "last_sync": iso_utc(self.sync_state.last_success)
            if self.sync_state.last_success
            else None,
            "last_sync_error": self.sync_state.last_error,
        }


def _level_budgets(bundle: Bundle) -> list[tuple[str, str, Any]]:
    levels = [("key", bundle.key.name, bundle.key.budget)]
    if bundle.team is not None:
        levels.append(("team", bundle.team.name, bundle.team.budget))
    if bundle.customer is not None:
        levels.append(("customer", bundle.customer.name, bundle.customer.budget))
    return [(kind, name, budget) for kind, name, budget in levels if budget is not None]


def _billing(message: str) -> admission.Reject:
    return admission.Reject(
        status=402,
        error_type="billing_error",
        message=message,
        retry_after=None,
        should_retry=False,
    )


def _tokens(row: LedgerRow) -> int:
    return row.input_tokens + row.cache_creation_input_tokens + row.output_tokens


def repo_attribution(bundle: Bundle | None) -> bool:
    """Whether usage records may name the repository: off when the key or its team says so."""
    if bundle is None:
        return False
    team = bundle.team
    return bundle.key.repo_attribution and (team is None or team.repo_attribution)


def _usage_record(row: LedgerRow, repo_attribution: bool = True) -> dict[str, Any]:
    record = {
        "id": row.id,
        "started_at": row.started_at,
        "model": row.model,
        "status": row.status,
        "outcome": row.outcome,
        "streamed": row.streamed,
        **row.usage_counts(),
        "cost_micros": row.cost_micros,
        "latency_ms": row.latency_ms,
        "session_id": row.session_id,
        "provider": row.provider,
        "billing": row.billing,
        "price_estimated": row.price_estimated,
        "speed": row.speed,
        "inference_geo": row.inference_geo,
        "service_tier": row.service_tier,
        "iterations": row.iterations,
        "stop_reason": row.stop_reason,
        "price_version": row.price_version,
        "attempts": row.attempts,
    }
    if row.lease_id and row.lease_id != GRACE:
        record["lease_id"] = row.lease_id
    if repo_attribution and row.repo is not None:
        record["repo"], record["branch"] = row.repo, row.branch
    record.update(quota_fields(row))
    return record


def quota_fields(row: LedgerRow) -> dict[str, Any]:
    """The seat plan's quota of a row, as the usage record names it; empty without one."""
    parsed = quota.decode(row.ratelimit, observed_at=row.started_at)
    if parsed is None:
        return {}
    fields: dict[str, Any] = {
        "quota_status": parsed.status[:16],
        "quota_claim": (parsed.representative_claim or "")[:32] or None,
    }
    for infix, window in (("5h", parsed.five_hour), ("7d", parsed.seven_day)):
        fields[f"quota_{infix}_utilization"] = window.utilization if window else None
        fields[f"quota_{infix}_reset"] = window.resets_at if window else None
    return fields


def _key_failure(failure: KeyFailure) -> dict[str, Any]:
    """A provider key the upstream refused, as the server's usage push takes it: the entry id
    (the key's label; never the key), the status and when."""
    return {"provider_id": failure.label, "status": failure.status, "at": failure.at}
