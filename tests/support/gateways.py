"""A standalone gateway built in-process, the way ``ccgate daemon`` builds one (no socket)."""

from __future__ import annotations

import httpx

from ccgate.accounting.pricing import PriceTable
from ccgate.gateway.policy import LocalPolicy
from ccgate.gateway.proxy import Gateway, GatewaySettings, OnFinish
from ccgate.store.ledger import Ledger


def standalone(
    *,
    port: int,
    ledger: Ledger,
    upstream_url: str,
    upstream_key: str | None,
    client_keys: dict[str, str],
    passthrough: bool = False,
    log_content: bool = False,
    prices: PriceTable | None = None,
    on_finish: OnFinish | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Gateway:
    policy = LocalPolicy(
        client_keys=client_keys,
        upstream_url=upstream_url,
        upstream_key=upstream_key,
        passthrough=passthrough,
        table=prices or PriceTable.default(),
    )
    return Gateway(
        settings=GatewaySettings(port=port, log_content=log_content),
        ledger=ledger,
        policy=policy,
        on_finish=on_finish,
        transport=transport,
    )
