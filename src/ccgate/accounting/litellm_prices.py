"""LiteLLM's ``model_prices_and_context_window.json`` mapped to a ccgate price table, checked.

LiteLLM's file maps model names to objects of per-token USD prices (JSON numbers such as
``3e-06``), with ``litellm_provider`` and ``mode``. ccgate keeps only Claude chat models sold
by Anthropic or, at first-party prices, by the clouds, and reports every Claude row it did not
map and why. The rules (docs/admin.md, "Importing LiteLLM's price file"):

- The file is parsed with exact decimals (``parse_float=Decimal``), so ``3.75e-06`` is the
  decimal the file wrote, never a binary float. A price becomes USD per million tokens by
  moving the point six places; it must then be a whole number of micro-dollars per MTok, or the
  row is refused (float noise such as ``3.3000000000000004e-06`` is caught here).
- Ids are mapped to the first-party form: ``vertex_ai/`` and Bedrock's ``anthropic.`` and
  ``-v1:0`` come off, Vertex's ``@20250929`` becomes ``-20250929``. Bedrock's regional ids
  (``us.``, ``eu.``, ...; ``global.`` is not regional) carry a cloud surcharge, so they are
  never imported as first-party prices; nor are resellers (OpenRouter, Azure, ...) or region
  paths (``bedrock/us-east-1/...``).
- A first-party (``litellm_provider: anthropic``) row wins over a cloud row for the same id;
  a cloud row whose prices differ from it is reported, not imported.
- Ids that differ only by a trailing release date (``claude-sonnet-4-5`` and
  ``claude-sonnet-4-5-20250929``) and cost the same are one entry matching all of them. The
  entry's ``effective_from`` and ``released`` are that date (the import day when no id has
  one): LiteLLM has no price history, so the imported table prices every request at today's
  rates.
- A missing 5-minute or 1-hour cache-write price is derived as 1.25x or 2x the input price
  (Anthropic's rule for every model) and marked in the entry's note and the report. A missing
  cache-read price is not derived (its multiplier differs by model): the row is refused.
- Over-200k-token rates (``*_above_200k_tokens``) and other fields the table cannot express are
  dropped, and the report lists them per entry.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from ccgate.accounting.pricing import FAMILIES, PriceTable, PriceTableError
from ccgate.errors import ConfigError

FIRST_PARTY: Final = "anthropic"
CLOUD_PROVIDERS: Final = frozenset({"bedrock", "bedrock_converse", "vertex_ai-anthropic_models"})
_PRICE_KEYS: Final = {
    "input": "input_cost_per_token",
    "output": "output_cost_per_token",
    "cache_write_5m": "cache_creation_input_token_cost",
    "cache_write_1h": "cache_creation_input_token_cost_above_1hr",
    "cache_read": "cache_read_input_token_cost",
}
_DERIVED: Final = {"cache_write_5m": Decimal("1.25"), "cache_write_1h": Decimal(2)}
# Fields that say nothing about a price, or that the table does not need: never reported.
_QUIET: Final = re.compile(
    r"(litellm_provider|mode|max_\w+|supports_\w+|tool_use_system_prompt_tokens|source|"
    r"deprecation_date|metadata|supported_\w+|search_context_cost_per_query|comment)"
)
_REGIONAL = re.compile(r"(?:us|eu|apac|ap|jp|au|ca|us-gov)\.anthropic\.")
_DATE_SUFFIX = re.compile(r"-(\d{8})$")
_MICRO = Decimal(1_000_000)


class LiteLLMImportError(ConfigError):
    """The file is not LiteLLM's price format, or nothing in it could be mapped."""


@dataclass(frozen=True)
class Unmapped:
    """A Claude row left out of the table, and why."""

    model: str
    provider: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"model": self.model, "provider": self.provider, "reason": self.reason}


@dataclass
class ImportResult:
    table: dict[str, Any]
    unmapped: list[Unmapped] = field(default_factory=list)
    derived: dict[str, list[str]] = field(default_factory=dict)  # entry -> derived prices
    dropped: dict[str, list[str]] = field(default_factory=dict)  # entry -> dropped fields
    skipped_non_claude: int = 0
    claude_rows: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "entries": len(self.table["entries"]),
            "claude_rows": self.claude_rows,
            "skipped_non_claude": self.skipped_non_claude,
            "unmapped": [u.to_json() for u in self.unmapped],
            "derived": self.derived,
            "dropped": self.dropped,
            "table": self.table,
        }


@dataclass
class _Row:
    source: str  # the LiteLLM key
    provider: str
    model: str  # first-party id
    prices: dict[str, Decimal]  # USD per MTok
    derived: list[str]
    dropped: list[str]


def parse(text: str | bytes) -> dict[str, Any]:
    """LiteLLM's JSON with exact decimals; LiteLLMImportError when it is not that format."""
    try:
        data = json.loads(text, parse_float=Decimal)
    except ValueError as exc:
        raise LiteLLMImportError(f"The file is not JSON: {exc}.") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise LiteLLMImportError(
            "The file is not LiteLLM's model_prices_and_context_window.json: expected an "
            "object mapping model names to objects."
        )
    return data


def looks_like_litellm(data: Any) -> bool:
    """True for LiteLLM's shape (name -> {input_cost_per_token...}), not a ccgate table."""
    if not isinstance(data, Mapping) or "entries" in data:
        return False
    return any(isinstance(v, Mapping) and "litellm_provider" in v for v in data.values())


def convert(data: Mapping[str, Any], *, today: date) -> ImportResult:
    """The ccgate price table for the Claude chat rows of ``data``; see the module docstring."""
    result = ImportResult(table={})
    first_party: dict[str, _Row] = {}
    cloud: dict[str, list[_Row]] = {}
    for source, raw in data.items():
        if source == "sample_spec" or not isinstance(raw, Mapping):
            continue
        provider = str(raw.get("litellm_provider", ""))
        if "claude" not in source.lower():
            result.skipped_non_claude += 1
            continue
        result.claude_rows += 1
        row = _row(source, provider, raw, result)
        if row is None:
            continue
        if provider == FIRST_PARTY:
            if row.model in first_party:
                _unmap(result, row, f"a second first-party row for {row.model}")
            else:
                first_party[row.model] = row
        else:
            cloud.setdefault(row.model, []).append(row)
    chosen = dict(first_party)
    for model, rows in cloud.items():
        for row in rows:
            kept = chosen.get(model)
            if kept is None:
                chosen[model] = row
            elif kept.prices != row.prices:
                _unmap(
                    result,
                    row,
                    f"prices differ from {kept.source} ({kept.provider}); "
                    "the first-party price is kept",
                )
    entries = _entries(chosen.values(), today=today, result=result)
    if not entries:
        raise LiteLLMImportError(
            "No Claude chat model in the file could be mapped"
            + (f" ({len(result.unmapped)} rows refused; see --json)." if result.unmapped else ".")
        )
    result.table = {
        "version": f"litellm-{today.isoformat()}",
        "note": (
            "Imported from LiteLLM's model_prices_and_context_window.json by `ccgate admin "
            "prices import`; USD per million tokens. LiteLLM has no price history: every "
            "entry is effective from its model's release date."
        ),
        "web_search_usd_per_1000": _web_search(data),
        "entries": entries,
    }
    try:
        PriceTable.from_dict(result.table)
    except PriceTableError as exc:  # a bug here, not in the file: say so plainly
        raise LiteLLMImportError(f"The mapped table does not validate: {exc}") from None
    return result


def _unmap(result: ImportResult, row: _Row, reason: str) -> None:
    result.unmapped.append(Unmapped(row.source, row.provider, reason))


def _row(source: str, provider: str, raw: Mapping[str, Any], result: ImportResult) -> _Row | None:
    def refuse(reason: str) -> None:
        result.unmapped.append(Unmapped(source, provider, reason))

    if provider != FIRST_PARTY and provider not in CLOUD_PROVIDERS:
        refuse(f"provider {provider or '(none)'} is not Anthropic or a cloud at list price")
        return None
    mode = raw.get("mode")
    if mode != "chat":
        refuse(f"mode {mode!r} is not a chat model")
        return None
    model, problem = first_party_id(source)
    if model is None:
        refuse(problem)
        return None
    prices: dict[str, Decimal] = {}
    derived: list[str] = []
    for name, key in _PRICE_KEYS.items():
        value = raw.get(key)
        if value is None and name in _DERIVED and "input" in prices:
            prices[name] = prices["input"] * _DERIVED[name]
            derived.append(f"{name} = {_DERIVED[name]} x input (no {key})")
            continue
        if value is None:
            refuse(f"no {key}")
            return None
        per_mtok, problem = usd_per_mtok(value)
        if per_mtok is None:
            refuse(f"{key} {problem}")
            return None
        prices[name] = per_mtok
    dropped = sorted(k for k in raw if k not in _PRICE_KEYS.values() and not _QUIET.fullmatch(k))
    return _Row(source, provider, model, prices, derived, dropped)


def first_party_id(source: str) -> tuple[str | None, str]:
    """The first-party model id of a LiteLLM key, or None and why it has none."""
    model = source.strip().lower()
    if model.startswith("vertex_ai/"):
        model = model.removeprefix("vertex_ai/")
    elif model.startswith("bedrock/"):
        return None, "a region- or commitment-specific Bedrock row, not a list price"
    if "/" in model:
        return None, "a reseller's id, not Anthropic's price"
    if _REGIONAL.match(model):
        return None, "a regional cloud id: its price carries the cloud's regional surcharge"
    model = model.removeprefix("global.").removeprefix("anthropic.")
    model = re.sub(r"-v\d+(?::\d+)?$", "", model)
    model = re.sub(r"@(\d{8})$", r"-\1", model).replace("@", "-")
    if not re.fullmatch(r"claude-[a-z0-9.-]+", model):
        return None, f"{model!r} is not a Claude model id"
    return model, ""


def usd_per_mtok(value: Any) -> tuple[Decimal | None, str]:
    """A per-token USD price as USD per million tokens, exactly; None and why when it is not
    a whole number of micro-dollars per MTok."""
    if isinstance(value, bool) or not isinstance(value, Decimal | int):
        return None, f"is not a number: {value!r}"
    try:
        per_mtok = Decimal(value) * _MICRO
    except InvalidOperation:
        return None, f"is not a number: {value!r}"
    if not per_mtok.is_finite() or per_mtok < 0:
        return None, f"is not a price: {value!r}"
    if per_mtok * _MICRO != (per_mtok * _MICRO).to_integral_value():
        return None, f"{value} is not a whole micro-dollar per million tokens (float noise?)"
    return per_mtok, ""


def _family(model: str) -> str | None:
    found = [(model.find(f), f) for f in FAMILIES if f in model]
    return min(found)[1] if found else None


def _entries(rows: Sequence[_Row] | Any, *, today: date, result: ImportResult) -> list[Any]:
    groups: dict[tuple[str, tuple[tuple[str, Decimal], ...]], list[_Row]] = {}
    for row in rows:
        if _family(row.model) is None:
            families = ", ".join(FAMILIES)
            _unmap(result, row, f"no model family ccgate knows ({families}) in the id")
            continue
        base = _DATE_SUFFIX.sub("", row.model).removesuffix("-latest")
        groups.setdefault((base, tuple(sorted(row.prices.items()))), []).append(row)
    bases = [base for base, _prices in groups]
    entries: list[dict[str, Any]] = []
    for (base, _prices), members in sorted(groups.items()):
        ids = sorted({r.model for r in members})
        dates = sorted(m[1] for r in ids if (m := _DATE_SUFFIX.search(r)))
        day = _date_of(dates[0], default=today) if dates else today
        prices = members[0].prices
        derived = sorted({d for r in members for d in r.derived})
        dropped = sorted({d for r in members for d in r.dropped})
        entry: dict[str, Any] = {
            # Two price groups of one base (a dated id priced apart) are named by their ids.
            "name": base if bases.count(base) == 1 else ids[0],
            "family": _family(base),
            "match": ids,
            "effective_from": day.isoformat(),
            "released": day.isoformat(),
            "usd_per_mtok": {name: _text(prices[name]) for name in _PRICE_KEYS},
        }
        notes = [f"from LiteLLM {', '.join(sorted(r.source for r in members))}"]
        if derived:
            notes.append("derived: " + "; ".join(derived))
            result.derived[entry["name"]] = derived
        if dropped:
            result.dropped[entry["name"]] = dropped
        entry["note"] = ". ".join(notes)
        entries.append(entry)
    return entries


def _date_of(digits: str, *, default: date) -> date:
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:  # eight digits that are not a date: not a release date after all
        return default


def _text(value: Decimal) -> str:
    return format(value.normalize(), "f")


def _web_search(data: Mapping[str, Any]) -> str:
    """USD per 1,000 web searches from the first-party rows; $10 (the list price) if none say."""
    seen: set[Decimal] = set()
    for raw in data.values():
        if not isinstance(raw, Mapping) or raw.get("litellm_provider") != FIRST_PARTY:
            continue
        search = raw.get("search_context_cost_per_query")
        if isinstance(search, Mapping) and isinstance(
            search.get("search_context_size_medium"), Decimal | int
        ):
            seen.add(Decimal(search["search_context_size_medium"]) * 1000)
    return _text(seen.pop()) if len(seen) == 1 else "10"
