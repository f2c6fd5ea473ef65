"""The governor in-process against the real server: ``create_app`` on a SQLite file, reached
through ``httpx.ASGITransport``, one clock for both sides.

A ``Rig`` is the server with its admin API; ``Rig.enrol`` makes a "machine" (its own state
folder and ledger, a device enrolled the way ``ccgate login`` enrols it) and returns its
``Daemon``: the ``Governor`` wired to the server through the rig's ``Network``, plus
``Daemon.request``, which drives one ``/v1/messages`` through the governor the way the relay does
(admit, the ledger row, settle). Time moves only when a test moves ``Rig.clock``.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
from sqlalchemy import text

from ccgate.client import profiles
from ccgate.client.remote import ServerClient
from ccgate.gateway.governor import Governor
from ccgate.gateway.policy import Ticket
from ccgate.policy import limits as admission
from ccgate.policy.bundle import BundleStore, DeviceKey
from ccgate.server.app import ServerContext
from ccgate.store.ledger import Ledger, RequestRecord

START = 1_796_054_400.0  # 2026-11-30 16:00 UTC, a Monday: Sonnet 4.6 at its list price
SERVER_URL = "http://ccgate-server.test"
MODEL = "claude-sonnet-4-6"
# Sonnet: $3 per million input tokens, $15 per million output tokens (micro-dollars per token).
INPUT_MICROS, OUTPUT_MICROS = 3, 15


def sonnet_cost(input_tokens: int, output_tokens: int) -> int:
    return input_tokens * INPUT_MICROS + output_tokens * OUTPUT_MICROS


async def settled(condition: Callable[[], bool], *, within_s: float = 10.0) -> None:
    """Wait until background tasks make ``condition`` true: the loops' work runs on the event
    loop and the server's on threads, so it is awaited, never timed; fails after ``within_s``."""
    with anyio.fail_after(within_s):
        while not condition():
            await anyio.wait_all_tasks_blocked()
            if not condition():
                await anyio.sleep(0.001)


class Clock:
    """Both sides' ``time.time``; a test moves it, nothing sleeps."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Network(httpx.AsyncBaseTransport):
    """The wire between the daemons and the server.

    The daemons' requests reach the server app unless the server is ``down`` (nothing
    answers: a refused connection) or ``lose_answers`` names a path (the server handles the
    request, and the answer is lost on the way back). ``seen`` lists what the server
    answered; ``closed`` counts the clients (connection pools) closed over this network."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._asgi = httpx.ASGITransport(app=app)
        self.down = False
        self.lose_answers: set[str] = set()
        self.seen: list[tuple[str, str, int]] = []
        self.closed = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        response = await self._asgi.handle_async_request(request)
        await response.aread()
        self.seen.append((request.method, request.url.path, response.status_code))
        if request.url.path in self.lose_answers:
            raise httpx.ReadError("connection reset by peer", request=request)
        return response

    async def aclose(self) -> None:
        self.closed += 1  # the server app stays: other daemons share the network

    def calls(self, method: str, path: str) -> list[int]:
        """The status of every answered ``method path``, oldest first."""
        return [status for m, p, status in self.seen if (m, p) == (method, path)]


@dataclass
class Daemon:
    """One machine's governor and ledger."""

    governor: Governor
    ledger: Ledger
    clock: Clock
    status: str  # the enrolment's: "approved" or "pending"
    device_id: str

    async def request(
        self,
        *,
        input_tokens: int = 1000,
        output_tokens: int = 100,
        max_tokens: int = 256,
        model: str = MODEL,
    ) -> tuple[RequestRecord, admission.Reject | None]:
        """One ``/v1/messages`` as the relay handles it; the ledger row and the refusal, if any.

        Admitted, it is answered with ``input_tokens``/``output_tokens`` of Sonnet; refused, its
        row is the relay's rejected row (nothing spent)."""
        now = self.clock()
        record = RequestRecord(
            id=secrets.token_hex(16),
            started_at=now,
            key_id=self.governor.key_id,
            method="POST",
            path="/v1/messages",
            model=model,
        )
        body_bytes = 200
        ticket, reject = await self.governor.admit(
            admission.Request(model=model, body_bytes=body_bytes, max_tokens=max_tokens, now=now)
        )
        if reject is not None:
            record.status, record.outcome, record.error = reject.status, "rejected", reject.message
            self._finish(record, None)
            return record, reject
        assert ticket is not None
        record.lease_id = ticket.lease_id
        record.status, record.outcome = 200, "ok"
        record.input_tokens, record.output_tokens = input_tokens, output_tokens
        record.cost_micros = sonnet_cost(input_tokens, output_tokens)
        record.price_version = self.governor.prices().version
        self._finish(record, ticket)
        return record, None

    def _finish(self, record: RequestRecord, ticket: Ticket | None) -> None:
        self.ledger.record_finish(record)
        assert self.ledger.flush()
        tokens = record.input_tokens + record.cache_creation_input_tokens + record.output_tokens
        self.governor.settle(
            ticket, cost_micros=record.cost_micros, tokens=tokens, now=self.clock()
        )
        self.governor.finished()

    def served(self) -> tuple[int, int, int]:
        """(requests, input tokens, cost) of every row this machine's ledger holds."""
        with contextlib.closing(sqlite3.connect(self.ledger.path)) as db:
            ((count, tokens, cost),) = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(cost_micros), 0) "
                "FROM requests WHERE key_id = ?",
                [self.governor.key_id],
            ).fetchall()
        return int(count), int(tokens), int(cost)

    def unsynced(self) -> int:
        return self.ledger.count_unsynced(key_id=self.governor.key_id)


@dataclass
class Rig:
    ctx: ServerContext
    network: Network
    admin_token: str
    clock: Clock
    root: Path
    daemons: list[Daemon] = field(default_factory=list)

    def _admin(self) -> httpx.AsyncClient:
        # The admin's own way in: the daemons' network (its outages, its log) is not involved.
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.network.app),
            base_url=SERVER_URL,
            headers={"authorization": f"Bearer {self.admin_token}"},
        )

    async def ok(self, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
        async with self._admin() as client:
            response = await client.request(method, "/admin/v1" + path, **kwargs)
        assert response.status_code == status, response.text
        return response.json()

    async def new_key(self, name: str, **fields: Any) -> str:
        created = await self.ok("POST", "/keys", 201, json={"name": name, **fields})
        return str(created["key"])

    async def enrol(self, key: str, *, machine: str = "laptop") -> Daemon:
        """A machine logged in with ``key``: enrolled, its first bundle fetched if approved."""
        device = DeviceKey.generate()
        async with ServerClient(SERVER_URL, transport=self.network) as anonymous:
            public_key, fingerprint = await anonymous.server_key()
        async with ServerClient(SERVER_URL, key=key, transport=self.network) as client:
            device_id, key_id, status = await client.register_device(device=device, name=machine)
        profile = profiles.Profile(
            name="default",
            server_url=SERVER_URL,
            public_key_b64=base64.b64encode(public_key).decode(),
            fingerprint=fingerprint,
            device_id=device_id,
            key_id=key_id,
            key_prefix=key[:12],
        )
        daemon = self.machine(machine, profile=profile, key=key, device=device)
        daemon.status = status
        if status == "approved":
            assert (await daemon.governor.refresh()).startswith("bundle version")
        return daemon

    def machine(
        self, machine: str, *, profile: profiles.Profile, key: str, device: DeviceKey
    ) -> Daemon:
        """The daemon of ``machine`` as it starts: its state folder and ledger as they are."""
        state = self.root / machine
        state.mkdir(parents=True, exist_ok=True)
        ledger = Ledger(state / "ledger.db")
        ledger.start_writer()
        governor = Governor(
            profile=profile,
            key=key,
            device=device,
            store=BundleStore(
                state_dir=state / "bundle",
                public_key=profile.public_key,
                device_id=profile.device_id,
            ),
            ledger=ledger,
            transport=self.network,
            clock=self.clock,
        )
        daemon = Daemon(governor, ledger, self.clock, "approved", profile.device_id)
        self.daemons.append(daemon)
        return daemon

    def restart(self, daemon: Daemon, machine: str = "laptop") -> Daemon:
        """The same machine's daemon started again: the persisted bundle and leases loaded."""
        daemon.ledger.stop_writer()
        daemon.ledger.close()
        governor = daemon.governor
        again = self.machine(
            machine, profile=governor.profile, key=governor.key, device=governor.device
        )
        again.governor.load(now=self.clock())
        return again

    async def totals(self, by: str = "key") -> dict[str, Any]:
        usage = await self.ok("GET", "/usage", params={"by": by, "since": 0})
        totals: dict[str, Any] = usage["totals"]
        return totals

    def leases(self) -> list[dict[str, Any]]:
        """Every lease the server holds: granted, used, and whether it came back."""
        with self.ctx.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT id, granted_micros, used_micros, returned_at FROM leases ORDER BY id")
            ).all()
        return [
            {"id": r[0], "granted": r[1], "used": r[2], "returned": r[3] is not None} for r in rows
        ]

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.ledger.stop_writer()
            daemon.ledger.close()
        self.ctx.engine.dispose()
