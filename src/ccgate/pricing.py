"""Model prices, effective-dated, and the exact cost of a response in integer micro-dollars.

Prices live in a data file (``ccgate/data/prices.json``; an admin can ship another table in the
policy bundle) as decimal strings in USD per million tokens, never floats, and are held as
integer micro-dollars per million tokens ($3/MTok -> 3_000_000).

Finding the price of a model at a given time:

1. Only entries whose ``effective_from`` (a UTC date) is on or before the request count. If the
   request predates every entry, the earliest entries count: pricing must never fail.
2. Entries match model ids by exact id or ``fnmatch`` glob. The most specific match wins: an
   exact id beats any pattern, a longer pattern beats a shorter one; among equally specific
   matches the latest ``effective_from`` wins, then the later entry in the file. So an entry
   for ``claude-opus-4-5*`` is never shadowed by a broader ``claude-opus-4-*``, and a price
   change is a new entry with the same ``match`` and a later date.
3. Bedrock ids (``us.anthropic.claude-sonnet-4-5-20250929-v1:0``) and Vertex ids
   (``claude-sonnet-4-5@20250929``) are tried in their first-party form too.
4. A model no entry matches is priced, flagged ``estimated``, by its family (``opus``,
   ``sonnet`` or ``haiku`` anywhere in the id) using the family's newest model (``released``);
   with no recognisable family, by the most expensive entry. An unknown model is never free.

Cost rule (``cost_micros``): numerator = the sum over the five token categories (input, output,
5-minute cache writes, 1-hour cache writes, cache reads) of tokens x price in micro-dollars per
million tokens, computed exactly in integers; it is divided by 1,000,000 once, rounding half up;
then ``web_search_requests x web_search_micros`` is added. Cache writes that ``Usage`` does not
split into 5m/1h are priced as 5-minute writes. Example: 1,234 Sonnet input tokens cost
1234 x 3_000_000 / 1_000_000 = 3702 micro-dollars.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from fnmatch import fnmatchcase
from importlib import resources
from typing import Any

from ccgate.errors import ConfigError
from ccgate.metering import Usage

__all__ = [
    "FAMILIES",
    "Price",
    "PriceEntry",
    "PriceLookup",
    "PriceTable",
    "PriceTableError",
    "cost_micros",
]

MICROS_PER_USD = 1_000_000
TOKENS_PER_MTOK = 1_000_000
FAMILIES = ("opus", "sonnet", "haiku")

_PRICE_FIELDS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")
_ENTRY_FIELDS = {"name", "family", "match", "effective_from", "released", "usd_per_mtok", "note"}
_TABLE_FIELDS = {"version", "web_search_usd_per_1000", "entries", "note"}
_DECIMAL = re.compile(r"\d+(?:\.\d+)?")
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_GLOB_CHARS = frozenset("*?[")


class PriceTableError(ConfigError):
    """A price table is malformed; the message names the entry and the field."""


@dataclass(frozen=True, slots=True)
class Price:
    """Integer micro-dollars per million tokens ($5/MTok -> 5_000_000)."""

    input: int
    output: int
    cache_write_5m: int
    cache_write_1h: int
    cache_read: int


@dataclass(frozen=True, slots=True)
class PriceLookup:
    price: Price
    entry: str
    """Display name of the entry used."""
    estimated: bool
    """True when the model id matched no entry and a family (or the dearest) entry was used."""


@dataclass(frozen=True, slots=True)
class PriceEntry:
    """One row of the table, validated."""

    name: str
    family: str
    match: tuple[str, ...]
    effective_from: date
    released: date
    price: Price
    index: int
    """Position in the file: the last tie-breaker, so lookups are deterministic."""

    def specificity(self, model: str) -> tuple[int, int] | None:
        """(1 for an exact id or 0 for a pattern, pattern length) of the best match, or None."""
        best: tuple[int, int] | None = None
        for pattern in self.match:
            if pattern == model:
                score = (1, len(pattern))
            elif _GLOB_CHARS.isdisjoint(pattern) or not fnmatchcase(model, pattern):
                continue
            else:
                score = (0, len(pattern))
            best = score if best is None else max(best, score)
        return best


class PriceTable:
    """An immutable, validated price table. Build it with ``default`` or ``from_dict``."""

    __slots__ = ("entries", "version", "web_search_micros")

    def __init__(
        self, *, version: str, entries: Sequence[PriceEntry], web_search_micros: int
    ) -> None:
        if not entries:
            raise PriceTableError("The price table has no entries.")
        self.version = version
        self.entries = tuple(entries)
        self.web_search_micros = web_search_micros
        """Micro-dollars per web search request."""

    @classmethod
    def default(cls) -> PriceTable:
        """The table shipped with ccgate, read once per process."""
        return _shipped_table()

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "price table") -> PriceTable:
        try:
            data = json.loads(text, parse_float=_reject_float)
        except ValueError as exc:
            raise PriceTableError(f"The {source} is not valid JSON: {exc}") from None
        if not isinstance(data, Mapping):
            raise PriceTableError(f"The {source} must be a JSON object.")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PriceTable:
        """Validate a decoded table; raises ``PriceTableError`` naming the bad entry and field."""
        if not isinstance(data, Mapping):
            raise PriceTableError("The price table must be an object with 'entries'.")
        _no_unknown_keys(data, _TABLE_FIELDS, where="The price table")
        version = data.get("version")
        if not isinstance(version, str) or not version:
            raise PriceTableError("The price table needs a 'version' string.")
        per_1000 = _micros(
            data.get("web_search_usd_per_1000"), where="The price table's 'web_search_usd_per_1000'"
        )
        if per_1000 % 1000:
            raise PriceTableError(
                "The price table's 'web_search_usd_per_1000' must come to a whole number of "
                "micro-dollars per request (at most 3 decimal places), "
                f"got {data.get('web_search_usd_per_1000')!r}."
            )
        raw_entries = data.get("entries")
        if not isinstance(raw_entries, list) or not raw_entries:
            raise PriceTableError("The price table needs a non-empty 'entries' list.")
        entries = [_entry(raw, index=i) for i, raw in enumerate(raw_entries)]
        return cls(version=version, entries=entries, web_search_micros=per_1000 // 1000)

    def lookup(self, model: str, *, at: datetime) -> PriceLookup:
        """The price of ``model`` for a request made at ``at`` (naive datetimes count as UTC)."""
        live = self._live(_utc_date(at))
        for candidate in _candidate_ids(model):
            entry = _most_specific(live, candidate)
            if entry is not None:
                return PriceLookup(price=entry.price, entry=entry.name, estimated=False)
        entry = _estimate(live, model)
        return PriceLookup(price=entry.price, entry=entry.name, estimated=True)

    def _live(self, day: date) -> list[PriceEntry]:
        live = [entry for entry in self.entries if entry.effective_from <= day]
        if live:
            return live
        first = min(entry.effective_from for entry in self.entries)
        return [entry for entry in self.entries if entry.effective_from == first]


def cost_micros(
    usage: Usage, lookup_or_price: Price | PriceLookup, *, web_search_micros: int
) -> int:
    """Exact cost in micro-dollars; see the module docstring for the rule."""
    price = lookup_or_price.price if isinstance(lookup_or_price, PriceLookup) else lookup_or_price
    five_minute = usage.cache_creation_5m_input_tokens
    one_hour = usage.cache_creation_1h_input_tokens
    unsplit = max(usage.cache_creation_input_tokens - five_minute - one_hour, 0)
    numerator = (
        usage.input_tokens * price.input
        + usage.output_tokens * price.output
        + (five_minute + unsplit) * price.cache_write_5m
        + one_hour * price.cache_write_1h
        + usage.cache_read_input_tokens * price.cache_read
    )
    tokens_cost = (numerator + TOKENS_PER_MTOK // 2) // TOKENS_PER_MTOK
    return tokens_cost + usage.web_search_requests * web_search_micros


# --- lookup helpers ---------------------------------------------------------------------------


def _utc_date(at: datetime) -> date:
    return at.astimezone(UTC).date() if at.tzinfo else at.date()


_BEDROCK_ID = re.compile(r"(?:[a-z0-9-]+\.)?anthropic\.(?P<id>.+?)(?:-v\d+(?::\d+)?)?")
_VERTEX_ID = re.compile(r"(?P<id>[^@]+)@(?P<version>.+)")


def _candidate_ids(model: str) -> Iterator[str]:
    """The id as sent, then its first-party spelling if it is a Bedrock or Vertex id."""
    model = model.strip().lower()
    yield model
    bedrock = _BEDROCK_ID.fullmatch(model.rsplit("/", 1)[-1])  # ARNs end in ".../<model id>"
    if bedrock:
        yield bedrock["id"]
    vertex = _VERTEX_ID.fullmatch(model)
    if vertex:
        yield f"{vertex['id']}-{vertex['version']}"
        yield vertex["id"]


def _most_specific(entries: Sequence[PriceEntry], model: str) -> PriceEntry | None:
    best: PriceEntry | None = None
    best_key: tuple[tuple[int, int], date, int] | None = None
    for entry in entries:
        score = entry.specificity(model)
        if score is None:
            continue
        key = (score, entry.effective_from, entry.index)
        if best_key is None or key > best_key:
            best, best_key = entry, key
    return best


def _family_of(model: str) -> str | None:
    """The family named earliest in the id (ids name exactly one in practice)."""
    model = model.lower()
    found = [(model.find(family), family) for family in FAMILIES if family in model]
    return min(found)[1] if found else None


def _estimate(live: Sequence[PriceEntry], model: str) -> PriceEntry:
    family = _family_of(model)
    kin = [entry for entry in live if entry.family == family]
    if kin:
        return max(kin, key=lambda e: (e.released, e.effective_from, e.index))
    return max(live, key=lambda e: (_dearness(e.price), e.effective_from, e.index))


def _dearness(price: Price) -> int:
    return price.input + price.output + price.cache_write_5m + price.cache_write_1h


# --- validation -------------------------------------------------------------------------------


def _reject_float(text: str) -> Any:
    raise ValueError(f'prices must be decimal strings such as "0.30", not the number {text}')


def _no_unknown_keys(data: Mapping[str, Any], allowed: set[str], *, where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise PriceTableError(
            f"{where} has unknown field(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(allowed))}."
        )


def _micros(value: object, *, where: str) -> int:
    """A decimal string of US dollars as integer micro-dollars, exactly."""
    if not isinstance(value, str) or not _DECIMAL.fullmatch(value):
        raise PriceTableError(
            f'{where} must be a decimal string of US dollars such as "3" or "0.30" '
            f"(not a number, which would be rounded), got {value!r}."
        )
    micros = Decimal(value) * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise PriceTableError(f"{where} is finer than a micro-dollar: {value!r}.")
    return int(micros)


def _entry(raw: object, *, index: int) -> PriceEntry:
    where = f"Price table entry {index + 1}"
    if not isinstance(raw, Mapping):
        raise PriceTableError(f"{where} must be an object.")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise PriceTableError(f"{where}: field 'name' must be a non-empty string.")
    where = f"{where} ({name!r})"
    _no_unknown_keys(raw, _ENTRY_FIELDS, where=where)
    effective_from = _date(raw.get("effective_from"), where=f"{where}: field 'effective_from'")
    released = raw.get("released")
    return PriceEntry(
        name=name,
        family=_family(raw.get("family"), where=where),
        match=_patterns(raw.get("match"), where=where),
        effective_from=effective_from,
        released=effective_from
        if released is None
        else _date(released, where=f"{where}: field 'released'"),
        price=_price(raw.get("usd_per_mtok"), where=where),
        index=index,
    )


def _family(value: object, *, where: str) -> str:
    if value not in FAMILIES:
        raise PriceTableError(
            f"{where}: field 'family' must be one of {', '.join(FAMILIES)}, got {value!r}."
        )
    return str(value)


def _patterns(value: object, *, where: str) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(p, str) and p.strip() for p in value)
    ):
        raise PriceTableError(
            f"{where}: field 'match' must be a non-empty list of model ids or glob patterns "
            'such as "claude-sonnet-4-*".'
        )
    return tuple(p.strip().lower() for p in value)


def _date(value: object, *, where: str) -> date:
    if isinstance(value, str) and _ISO_DATE.fullmatch(value):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    raise PriceTableError(f'{where} must be an ISO date such as "2025-11-24", got {value!r}.')


def _price(value: object, *, where: str) -> Price:
    if not isinstance(value, Mapping):
        raise PriceTableError(
            f"{where}: field 'usd_per_mtok' must be an object with {', '.join(_PRICE_FIELDS)}."
        )
    _no_unknown_keys(value, set(_PRICE_FIELDS), where=f"{where}: field 'usd_per_mtok'")
    micros = {
        field: _micros(value.get(field), where=f"{where}: field 'usd_per_mtok.{field}'")
        for field in _PRICE_FIELDS
    }
    return Price(**micros)


@functools.cache
def _shipped_table() -> PriceTable:
    text = resources.files("ccgate").joinpath("data/prices.json").read_text(encoding="utf-8")
    return PriceTable.from_json(text, source="shipped price table (ccgate/data/prices.json)")
