"""``ccgate admin prices import``: a ccgate table or LiteLLM's file, checked, then uploaded."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer

from ccgate.cli import console
from ccgate.errors import ConfigError


def run_import(ctx: typer.Context, file: Path, *, dry_run: bool, json_output: bool) -> None:
    from ccgate.accounting import litellm_prices
    from ccgate.accounting.pricing import PriceTable, PriceTableError
    from ccgate.cli.admin import _client

    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"Cannot read {file}: {exc.strerror or exc}.") from None
    data = litellm_prices.parse(text) if _is_litellm(text) else None
    report: dict[str, Any]
    if data is not None:
        today = datetime.fromtimestamp(time.time(), UTC).date()
        result = litellm_prices.convert(data, today=today)
        table, report = result.table, {"format": "litellm", **result.to_json()}
    else:
        try:
            table = json.loads(text)
            PriceTable.from_dict(table)
        except ValueError as exc:
            raise ConfigError(f"{file} is not a price table: {exc}") from None
        except PriceTableError as exc:
            raise ConfigError(f"{file} is not a valid price table: {exc}") from None
        report = {"format": "ccgate", "entries": len(table["entries"]), "table": table}
    uploaded = None
    if not dry_run:
        with _client(ctx) as client:
            uploaded = client.set_prices(table)
    if json_output:
        console.print_json({**report, "dry_run": dry_run, "uploaded": uploaded is not None})
        return
    _print_report(report, file=file)
    if dry_run:
        _print_table(table)
        console.info("Dry run: nothing was uploaded.")
    else:
        console.info(
            f"Bundles now carry price table {table['version']} ({len(table['entries'])} "
            "entries); daemons get it at their next sync."
        )


def _is_litellm(text: str) -> bool:
    from ccgate.accounting import litellm_prices

    try:
        return litellm_prices.looks_like_litellm(json.loads(text))
    except ValueError:
        return False


def _print_report(report: dict[str, Any], *, file: Path) -> None:
    from rich.markup import escape

    if report["format"] != "litellm":
        console.info(f"{file}: a ccgate price table with {report['entries']} entries, valid.")
        return
    console.info(
        f"{file}: LiteLLM format. {report['claude_rows']} Claude rows: "
        f"{report['claude_rows'] - len(report['unmapped'])} mapped into {report['entries']} "
        f"entries, {len(report['unmapped'])} not mapped; {report['skipped_non_claude']} rows "
        "of other models skipped."
    )
    if report["unmapped"]:
        console.out.print("Claude rows not imported:")
        for row in report["unmapped"]:
            console.out.print(
                f"  {escape(row['model'])} ({escape(row['provider'])}): {escape(row['reason'])}"
            )
    for name, items in report["derived"].items():
        console.info(f"{name}: derived {'; '.join(items)}.")
    for name, fields in report["dropped"].items():
        console.info(f"{name}: dropped {', '.join(fields)} (the table cannot express them).")


def _print_table(table: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    out = Table("entry", "from", "in", "out", "5m", "1h", "read", title="USD per MTok")
    for entry in table["entries"]:
        p = entry["usd_per_mtok"]
        out.add_row(
            escape(entry["name"]),
            entry["effective_from"],
            *(p[k] for k in ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")),
        )
    console.out.print(out)
