"""``ccgate prices``: the price table in force, and ``prices update`` to install a newer one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from ccgate.cli import console
from ccgate.errors import CcgateError

if TYPE_CHECKING:
    from ccgate.accounting.pricing import PriceEntry, PriceTable

app = typer.Typer(
    help="Show the price table in force, or install a newer one.",
    invoke_without_command=True,
)

MAX_TABLE_BYTES = 8 * 1024 * 1024


@app.callback()
def show(
    ctx: typer.Context,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
) -> None:
    """The price table ccgate uses now: version, source, every entry, what is estimated.

    Prices are USD per million tokens. The daemon uses the newer (by version) of the shipped
    table and the one `ccgate prices update` installed. `--json` prints the table itself, in
    the format `prices update` and `admin prices set` read.
    """
    if ctx.invoked_subcommand is not None:
        return
    from ccgate import paths as paths_mod
    from ccgate.accounting import pricing

    table, origin = pricing.installed(paths_mod.resolve().prices_file)
    if json_output:
        console.print_json(table.raw)  # exactly the table: `admin prices set` takes it back
        return
    _render(table, origin)


@app.command("update")
def update(
    source: Annotated[
        str, typer.Argument(help="A price table file, or an http(s) URL to fetch it from.")
    ],
) -> None:
    """Validate a price table and install it; a malformed table is refused and changes nothing.

    The table has the schema of docs/price-table.md. Rows the old table priced as estimates
    and the new one prices exactly are re-priced in the local ledger. Restart the daemon
    (`ccgate down && ccgate up`) for new requests to use it. In server mode the admin's table
    (from the policy bundle) prices requests instead.
    """
    import time

    from ccgate import paths as paths_mod
    from ccgate.accounting import pricing
    from ccgate.cli.render import money

    text = _read(source)
    paths = paths_mod.resolve()
    table = pricing.install(text, paths.prices_file)
    console.info(
        f"Installed price table {table.version} ({len(table.entries)} entries) "
        f"at {paths.prices_file}."
    )
    from ccgate.client import profiles

    if profiles.load(paths) is not None:
        console.warn(
            "This machine is in server mode: the admin's price table (from the policy bundle) "
            "prices its requests, and the server re-prices them."
        )
        return
    repriced = _reprice(paths.ledger_file, table, now=time.time())
    if repriced is not None and repriced.rows:
        console.info(
            f"Re-priced {repriced.rows} estimated request(s) in the ledger: "
            f"{money(repriced.before_micros)} -> {money(repriced.after_micros)}."
        )
    console.info("Restart the daemon (`ccgate down && ccgate up`) to price new requests with it.")


def _read(source: str) -> bytes:
    from pathlib import Path

    if source.startswith(("https://", "http://")):
        import httpx

        try:
            response = httpx.get(source, timeout=30.0, follow_redirects=True)
        except httpx.HTTPError as exc:
            raise CcgateError(f"Cannot fetch {source}: {exc}. Nothing was changed.") from None
        if response.status_code != 200:
            raise CcgateError(
                f"Fetching {source} answered HTTP {response.status_code}. Nothing was changed."
            )
        data = response.content
    else:
        try:
            data = Path(source).expanduser().read_bytes()
        except OSError as exc:
            raise CcgateError(
                f"Cannot read {source}: {exc.strerror}. Nothing was changed."
            ) from None
    if len(data) > MAX_TABLE_BYTES:
        raise CcgateError(f"{source} is larger than 8 MB: not a price table. Nothing was changed.")
    return data


def _reprice(ledger_file: Any, table: PriceTable, *, now: float) -> Any:
    from ccgate.accounting.repricing import reprice_ledger
    from ccgate.store.ledger import Ledger

    if not ledger_file.exists():
        return None
    ledger = Ledger(ledger_file)
    try:
        return reprice_ledger(ledger, table, now=now)
    finally:
        ledger.close()


def _dollars(micros: int) -> str:
    from decimal import Decimal

    text = f"{Decimal(micros) / 1_000_000:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _flags(entry: PriceEntry) -> str:
    parts: list[str] = []
    if entry.fast is not None:
        parts.append(f"fast {_dollars(entry.fast.input)}/{_dollars(entry.fast.output)}")
    for band in entry.bands:
        until = f" until {band.before}" if band.before else ""
        parts.append(
            f">{band.above_prompt_tokens // 1000}K {_dollars(band.price.input)}/"
            f"{_dollars(band.price.output)}{until}"
        )
    if entry.unverified:
        parts.append("unverified: " + ", ".join(sorted(entry.unverified)))
    return "; ".join(parts)


def _render(table: PriceTable, origin: str) -> None:
    import textwrap

    from rich.table import Table

    out = console.out
    out.print(f"Price table {table.version} ({origin})")
    if table.source:
        out.print(textwrap.fill(f"Source: {table.source}", width=80))
    grid = Table(box=None, pad_edge=False, header_style="bold")
    for name, justify in (
        ("Model", "left"),
        ("From", "left"),
        ("In", "right"),
        ("5m wr", "right"),
        ("1h wr", "right"),
        ("Read", "right"),
        ("Out", "right"),
        ("Notes", "left"),
    ):
        grid.add_column(name, justify=justify)  # type: ignore[arg-type]
    for entry in table.entries:
        p = entry.price
        grid.add_row(
            entry.name.removeprefix("Claude "),
            entry.effective_from.isoformat(),
            *(_dollars(v) for v in (p.input, p.cache_write_5m, p.cache_write_1h, p.cache_read)),
            _dollars(p.output),
            _flags(entry),
        )
    out.print(grid)
    legend = (
        "USD per million tokens. Web search $"
        f"{_dollars(table.web_search_micros * 1000)} per 1,000; batch x"
        f"{float(table.batch_multiplier):g}. Estimated (and marked so in usage): models not "
        "in the table (priced at their family's highest rates), unverified figures, regional "
        "cloud endpoints (+10%), fast mode without published rates (2x), priority tier."
    )
    out.print(textwrap.fill(legend, width=80))
