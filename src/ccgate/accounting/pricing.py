"""Model prices, effective-dated, and the exact cost of a response in integer micro-dollars.

Prices live in a data file (``ccgate/data/prices.json``; ``ccgate prices update`` installs a
newer one, and an admin can ship another table in the policy bundle) as decimal strings in USD
per million tokens, never floats, and are held as integer micro-dollars per million tokens
($3/MTok -> 3_000_000). docs/price-table.md documents the schema.

Finding the entry of a model at a given time (``lookup``):

1. The id is normalised (``normalise_model``): lower-cased; a trailing ``[1m]`` dropped; an ARN
   cut to its last path segment; a Bedrock id's geo prefix (``global.``, ``us.``, ``eu.``,
   ``apac.``, ``jp.``, ``au.``, ``us-gov.``), ``anthropic.`` and ``-v1:0`` suffix dropped; a
   Vertex ``@date`` turned into ``-date`` (and tried bare). A Bedrock id that is not ``global.``
   is a regional endpoint (+10% on models whose entry says so, flagged estimated).
2. Only entries whose ``effective_from`` (a UTC date) is on or before the request count. If the
   request predates every entry, the earliest entries count: pricing must never fail.
3. Entries match ids exactly or by ``fnmatch`` glob. The most specific match wins: an exact id
   beats any pattern, a longer pattern beats a shorter one, so the longest version is matched
   first (``claude-opus-5-5`` is never Opus 5). Among equal matches the latest
   ``effective_from`` wins, then the later entry in the file.
4. A model no entry matches is priced conservatively and flagged ``estimated``: each category at
   the highest rate any entry of its family (``fable``, ``mythos``, ``opus``, ``sonnet``,
   ``haiku`` in the id) charges, or of every entry when the id names no family. Never $0.

Cost of one response (``PriceTable.charge``), all in exact rational arithmetic, rounded half up
to a micro-dollar once at the end:

- Token buckets: input, 5-minute writes, 1-hour writes, cache reads, output. Cache writes that
  ``Usage`` does not split are 5-minute writes.
- Band: an entry's ``bands`` price every category of a request whose prompt (input + cache reads
  + cache writes) exceeds ``above_prompt_tokens`` (Haiku 5.5 over 100,000; the historical
  over-200,000 premium of Sonnet 4/4.5 and early Opus/Sonnet 4.6). Exactly the threshold is the
  low band.
- Fast mode (``usage.speed == "fast"``): the entry's ``fast_usd_per_mtok``; no band applies. An
  entry without fast rates is charged twice its standard rates (the ratio of every published
  fast price) and flagged estimated.
- Multipliers on the token cost: ``inference_geo == "us"`` by the entry's
  ``inference_geo_us_multiplier`` (1.1 on 4.6 and later), a regional cloud endpoint by its
  ``regional_endpoint_multiplier`` (1.1 on 4.5 and later, estimated), ``service_tier == "batch"``
  by the table's ``batch_multiplier`` (0.5). ``priority`` is contract-priced: standard rates,
  flagged estimated.
- Web searches at ``web_search_usd_per_1000``; web fetches are free; code-execution requests are
  recorded, not priced (container hours are not in ``usage``).
- A refusal before any output (``stop_reason == "refusal"``, 0 output tokens) is not billed.
- ``usage.iterations``, when present, replaces the top-level tokens: each iteration is priced by
  its own model (and band), and counted once.
- A figure the table marks ``unverified`` makes a charge that uses it estimated.

``cost_micros(usage, price)`` is the plain five-category rule for one ``Price`` (no bands or
multipliers); admission uses ``PriceLookup.worst`` for its worst case.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from fnmatch import fnmatchcase
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any, Final

from ccgate.accounting.metering import Usage
from ccgate.errors import CcgateError, ConfigError

__all__ = [
    "FAMILIES",
    "Band",
    "Charge",
    "Price",
    "PriceEntry",
    "PriceLookup",
    "PriceTable",
    "PriceTableError",
    "cost_micros",
    "normalise_model",
    "usd_micros",
]

MICROS_PER_USD = 1_000_000
TOKENS_PER_MTOK = 1_000_000
FAMILIES = ("fable", "mythos", "opus", "sonnet", "haiku")

PRICE_FIELDS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")
_ENTRY_FIELDS = {
    "name",
    "family",
    "match",
    "effective_from",
    "released",
    "usd_per_mtok",
    "note",
    "source",
    "status",
    "cache_read_multiplier",
    "fast_usd_per_mtok",
    "bands",
    "inference_geo_us_multiplier",
    "regional_endpoint_multiplier",
    "unverified",
}
_BAND_FIELDS = {"above_prompt_tokens", "usd_per_mtok", "before", "note"}
_TABLE_FIELDS = {
    "version",
    "web_search_usd_per_1000",
    "entries",
    "note",
    "source",
    "batch_multiplier",
    "unknown_models",
}
UNKNOWN_MODELS = ("estimate", "refuse")
_DECIMAL = re.compile(r"\d+(?:\.\d+)?")
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_GLOB_CHARS = frozenset("*?[")
_WRITE_5M = Fraction(5, 4)
_WRITE_1H = Fraction(2)
_FAST_FALLBACK = Fraction(2)
_ONE = Fraction(1)


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

    def scaled(self, factor: Fraction) -> Price:
        return Price(*(_round(Fraction(getattr(self, f)) * factor) for f in PRICE_FIELDS))

    def ceiling(self, other: Price) -> Price:
        return Price(*(max(getattr(self, f), getattr(other, f)) for f in PRICE_FIELDS))


@dataclass(frozen=True, slots=True)
class Band:
    """Prices for a whole request whose prompt exceeds ``above_prompt_tokens``."""

    above_prompt_tokens: int
    price: Price
    before: date | None = None
    """The band applies only to requests made before this UTC date (historical premiums)."""


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
    fast: Price | None = None
    bands: tuple[Band, ...] = ()
    geo_us: Fraction = _ONE
    regional: Fraction = _ONE
    cache_read_multiplier: Fraction | None = None
    unverified: Mapping[str, str] = field(default_factory=dict)
    """Figure path (``usd_per_mtok.cache_read``, ``fast_usd_per_mtok``, ``bands``) -> why."""
    source: str | None = None
    status: str | None = None
    note: str | None = None

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


@dataclass(frozen=True, slots=True)
class PriceLookup:
    price: Price
    entry: str
    """Display name of the entry used (or of the estimate)."""
    estimated: bool
    """True when the model id matched no entry and the family's highest rates were used."""
    rates: PriceEntry | None = None
    """The matched entry, or a synthetic one holding the conservative estimate."""
    regional: bool = False
    """The id names a Bedrock regional (non-global) endpoint."""

    def worst(self, *, prompt_tokens: int, at: datetime) -> Price:
        """The rates a standard-speed request of up to ``prompt_tokens`` can be charged."""
        band = _band(self.rates, prompt_tokens, _utc_date(at)) if self.rates else None
        worst = self.price if band is None else self.price.ceiling(band.price)
        if self.regional and self.rates is not None and self.rates.regional != _ONE:
            worst = worst.scaled(self.rates.regional)
        return worst


@dataclass(frozen=True, slots=True)
class Charge:
    """The cost of one response and how it was reached."""

    cost_micros: int
    estimated: bool
    entry: str | None
    notes: tuple[str, ...] = ()


_FOUND_MAX: Final = 256  # PriceTable.lookup's remembered answers


class PriceTable:
    """An immutable, validated price table. Build it with ``default`` or ``from_dict``."""

    __slots__ = (
        "_found",
        "batch_multiplier",
        "entries",
        "raw",
        "refuse_unknown",
        "source",
        "version",
        "web_search_micros",
    )

    def __init__(
        self,
        *,
        version: str,
        entries: Sequence[PriceEntry],
        web_search_micros: int,
        batch_multiplier: Fraction = Fraction(1, 2),
        source: str | None = None,
    ) -> None:
        if not entries:
            raise PriceTableError("The price table has no entries.")
        self.version = version
        self.entries = tuple(entries)
        self.web_search_micros = web_search_micros
        """Micro-dollars per web search request."""
        self.batch_multiplier = batch_multiplier
        self.source = source
        self.raw: Mapping[str, Any] | None = None
        """The validated table as decoded (``ccgate prices --json``, bundles)."""
        self._found: dict[tuple[str, date], PriceLookup] = {}
        self.refuse_unknown = False
        """``"unknown_models": "refuse"``: a daemon in server mode answers 403 for a model the
        table does not name instead of pricing it as an estimate."""

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
        except RecursionError:
            raise PriceTableError(f"The {source} is nested too deeply.") from None
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
        batch = data.get("batch_multiplier", "0.5")
        batch_multiplier = _multiplier(batch, where="The price table's 'batch_multiplier'")
        source = _optional_text(data.get("source"), where="The price table's 'source'")
        raw_entries = data.get("entries")
        if not isinstance(raw_entries, list) or not raw_entries:
            raise PriceTableError("The price table needs a non-empty 'entries' list.")
        entries = [_entry(raw, index=i) for i, raw in enumerate(raw_entries)]
        table = cls(
            version=version,
            entries=entries,
            web_search_micros=per_1000 // 1000,
            batch_multiplier=batch_multiplier,
            source=source,
        )
        unknown = data.get("unknown_models", "estimate")
        if unknown not in UNKNOWN_MODELS:
            raise PriceTableError(
                "The price table's 'unknown_models' must be \"estimate\" (price them at their "
                f'family\'s highest rates) or "refuse" (answer 403), got {unknown!r}.'
            )
        table.refuse_unknown = unknown == "refuse"
        table.raw = json.loads(json.dumps(data))
        return table

    def lookup(self, model: str, *, at: datetime) -> PriceLookup:
        """The price of ``model`` for a request made at ``at`` (naive datetimes count as UTC).

        Remembered per model and day (the answer depends on nothing else, and the table never
        changes): the daemon looks up the same few models on every request, 17 µs each."""
        day = _utc_date(at)
        found = self._found.get((model, day))
        if found is None:
            found = self._lookup(model, day)
            if len(self._found) >= _FOUND_MAX:
                self._found.clear()  # model ids come from request bodies: keep the memory bounded
            self._found[(model, day)] = found
        return found

    def _lookup(self, model: str, day: date) -> PriceLookup:
        live = self._live(day)
        regional = _is_regional(model)
        for candidate in _candidate_ids(model):
            entry = _most_specific(live, candidate)
            if entry is not None:
                return PriceLookup(entry.price, entry.name, False, entry, regional)
        estimate = _estimate(live, model)
        return PriceLookup(estimate.price, estimate.name, True, estimate, regional)

    def charge(
        self,
        usage: Usage,
        *,
        model: str,
        at: datetime,
        stop_reason: str | None = None,
        find: Callable[[str], PriceLookup] | None = None,
    ) -> Charge:
        """What one response costs, by the rules in the module docstring. Never raises.

        ``find`` replaces ``lookup`` (at ``at``), so a caller pricing one request several times
        can look each model up once."""
        if stop_reason == "refusal" and usage.output_tokens == 0:
            return Charge(0, False, None, ("refusal before any output: not billed",))
        notes: list[str] = []
        estimated = False
        total = Fraction(0)
        entry_name: str | None = None
        parts = (
            [(it.model or model, it.usage) for it in usage.iterations]
            if usage.iterations
            else [(model, usage)]
        )
        if usage.iterations:
            notes.append(f"{len(parts)} iterations priced each by its own model")
        for part_model, part in parts:
            lookup = find(part_model) if find else self.lookup(part_model, at=at)
            entry_name = entry_name or lookup.entry
            cost, part_estimated, part_notes = self._token_cost(
                part, lookup, at=at, speed=part.speed or usage.speed, usage=usage
            )
            total += cost
            estimated = estimated or part_estimated
            notes.extend(n for n in part_notes if n not in notes)
        total += usage.web_search_requests * self.web_search_micros
        return Charge(_round(total), estimated, entry_name, tuple(notes))

    def _token_cost(
        self, part: Usage, lookup: PriceLookup, *, at: datetime, speed: str | None, usage: Usage
    ) -> tuple[Fraction, bool, list[str]]:
        rates = lookup.rates
        assert rates is not None
        notes: list[str] = []
        estimated = lookup.estimated
        if estimated:
            notes.append(f"unknown model: priced at {lookup.entry}")
        price, figures = rates.price, "usd_per_mtok"
        if speed == "fast":
            if rates.fast is not None:
                price, figures = rates.fast, "fast_usd_per_mtok"
            else:
                price, estimated = rates.price.scaled(_FAST_FALLBACK), True
                notes.append("fast mode: no published fast rates, charged 2x standard")
        else:
            band = _band(rates, _prompt_tokens(part), _utc_date(at))
            if band is not None:
                price, figures = band.price, "bands"
                notes.append(f"prompt over {band.above_prompt_tokens:,} tokens: band rates")
        used = _used_categories(part)
        for path in rates.unverified:
            head, _, category = path.partition(".")
            if head == figures and (not category or category in used):
                estimated = True
                notes.append(f"unverified figure {path}")
        cost = Fraction(_numerator(part, price), TOKENS_PER_MTOK)
        if usage.inference_geo == "us" and rates.geo_us != _ONE:
            cost *= rates.geo_us
            notes.append(f"inference_geo us: x{_show(rates.geo_us)}")
        if lookup.regional and rates.regional != _ONE:
            cost *= rates.regional
            estimated = True
            notes.append(f"regional cloud endpoint: x{_show(rates.regional)} (estimate)")
        if usage.service_tier == "batch":
            cost *= self.batch_multiplier
            notes.append(f"batch: x{_show(self.batch_multiplier)}")
        elif usage.service_tier == "priority":
            estimated = True
            notes.append("priority tier: contract-priced, shown at standard rates")
        return cost, estimated, notes

    def _live(self, day: date) -> list[PriceEntry]:
        live = [entry for entry in self.entries if entry.effective_from <= day]
        if live:
            return live
        first = min(entry.effective_from for entry in self.entries)
        return [entry for entry in self.entries if entry.effective_from == first]


def cost_micros(
    usage: Usage, lookup_or_price: Price | PriceLookup, *, web_search_micros: int
) -> int:
    """Plain cost for one ``Price``: five categories, rounded half up once, plus web searches."""
    price = lookup_or_price.price if isinstance(lookup_or_price, PriceLookup) else lookup_or_price
    tokens_cost = (_numerator(usage, price) + TOKENS_PER_MTOK // 2) // TOKENS_PER_MTOK
    return tokens_cost + usage.web_search_requests * web_search_micros


def usd_micros(usd: str, *, option: str) -> int:
    """Dollars as written (``50``, ``12.5``, ``$0.25``) to integer micro-dollars, exactly.

    The admin CLI and the server's web UI both read budgets with it.
    """
    from decimal import Decimal, InvalidOperation

    try:
        dollars = Decimal(usd.strip().removeprefix("$"))
    except InvalidOperation:
        raise CcgateError(f"Cannot read {option} {usd!r}: give dollars like 50 or 12.5.") from None
    micros = dollars * 1_000_000
    if not dollars.is_finite() or dollars < 0 or micros != micros.to_integral_value():
        raise CcgateError(
            f"{option} {usd!r} must be a non-negative dollar amount with at most 6 decimals."
        )
    return int(micros)


def _numerator(usage: Usage, price: Price) -> int:
    five_minute = usage.cache_creation_5m_input_tokens
    one_hour = usage.cache_creation_1h_input_tokens
    unsplit = max(usage.cache_creation_input_tokens - five_minute - one_hour, 0)
    return (
        usage.input_tokens * price.input
        + usage.output_tokens * price.output
        + (five_minute + unsplit) * price.cache_write_5m
        + one_hour * price.cache_write_1h
        + usage.cache_read_input_tokens * price.cache_read
    )


def _prompt_tokens(usage: Usage) -> int:
    writes = max(
        usage.cache_creation_input_tokens,
        usage.cache_creation_5m_input_tokens + usage.cache_creation_1h_input_tokens,
    )
    return usage.input_tokens + usage.cache_read_input_tokens + writes


def _used_categories(usage: Usage) -> set[str]:
    counts = {
        "input": usage.input_tokens,
        "output": usage.output_tokens,
        "cache_write_5m": usage.cache_creation_input_tokens - usage.cache_creation_1h_input_tokens,
        "cache_write_1h": usage.cache_creation_1h_input_tokens,
        "cache_read": usage.cache_read_input_tokens,
    }
    return {name for name, count in counts.items() if count > 0}


def _band(entry: PriceEntry, prompt: int, day: date) -> Band | None:
    live = [
        b
        for b in entry.bands
        if prompt > b.above_prompt_tokens and (b.before is None or day < b.before)
    ]
    return max(live, key=lambda b: b.above_prompt_tokens) if live else None


def _round(value: Fraction) -> int:
    """Half up (costs are never negative)."""
    return int((value + Fraction(1, 2)) // 1)


def _show(value: Fraction) -> str:
    return str(Decimal(value.numerator) / Decimal(value.denominator))


# --- lookup helpers ---------------------------------------------------------------------------


def _utc_date(at: datetime) -> date:
    return at.astimezone(UTC).date() if at.tzinfo else at.date()


_BEDROCK_ID = re.compile(r"(?:(?P<geo>[a-z][a-z-]*)\.)?anthropic\.(?P<id>.+?)(?:-v\d+(?::\d+)?)?")
_VERTEX_ID = re.compile(r"(?P<id>[^@]+)@(?P<version>.+)")


def _plain(model: str) -> str:
    model = model.strip().lower()
    if model.endswith("[1m]"):
        model = model[: -len("[1m]")]
    return model.rsplit("/", 1)[-1]  # ARNs end in ".../<model id>"


def normalise_model(model: str) -> str:
    """The first-party id a model id stands for (see the module docstring)."""
    return next(reversed(list(_candidate_ids(model))))


def _is_regional(model: str) -> bool:
    bedrock = _BEDROCK_ID.fullmatch(_plain(model))
    return bedrock is not None and bedrock["geo"] != "global"


def _candidate_ids(model: str) -> Iterator[str]:
    """The id as sent, then its first-party spellings."""
    raw = model.strip().lower()
    yield raw
    model = _plain(model)
    if model != raw:
        yield model
    bedrock = _BEDROCK_ID.fullmatch(model)
    if bedrock:
        model = bedrock["id"]
        yield model
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
    """A synthetic entry: every category at the family's (or the table's) highest rate."""
    family = _family_of(model)
    kin = [entry for entry in live if entry.family == family] or list(live)
    top = kin[0].price
    fast: Price | None = None
    for entry in kin:
        top = top.ceiling(entry.price)
        for band in entry.bands:
            top = top.ceiling(band.price)
        if entry.fast is not None:
            fast = entry.fast if fast is None else fast.ceiling(entry.fast)
    label = f"the highest {family} rates" if family and kin[0].family == family else None
    return PriceEntry(
        name=label or "the highest rates in the table",
        family=family or kin[0].family,
        match=(),
        effective_from=kin[0].effective_from,
        released=kin[0].released,
        price=top,
        index=-1,
        fast=fast.ceiling(top) if fast is not None else None,
        geo_us=max(e.geo_us for e in kin),
        regional=max(e.regional for e in kin),
    )


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


def _multiplier(value: object, *, where: str) -> Fraction:
    if not isinstance(value, str) or not _DECIMAL.fullmatch(value) or Decimal(value) == 0:
        raise PriceTableError(
            f'{where} must be a positive decimal string such as "1.1", got {value!r}.'
        )
    return Fraction(Decimal(value))


def _optional_text(value: object, *, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise PriceTableError(f"{where} must be a string, got {value!r}.")
    return value


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
    price = _price(raw.get("usd_per_mtok"), where=where)
    fast_raw = raw.get("fast_usd_per_mtok")
    fast = None if fast_raw is None else _price(fast_raw, where=where, label="fast_usd_per_mtok")
    bands = tuple(
        _band_of(b, where=f"{where}: bands[{i}]") for i, b in enumerate(_list(raw, "bands", where))
    )
    multiplier = raw.get("cache_read_multiplier")
    cache_read_multiplier = (
        None
        if multiplier is None
        else _multiplier(multiplier, where=f"{where}: field 'cache_read_multiplier'")
    )
    if cache_read_multiplier is not None:
        prices = [("usd_per_mtok", price)] + ([("fast_usd_per_mtok", fast)] if fast else [])
        prices += [(f"bands[{i}]", b.price) for i, b in enumerate(bands)]
        for label, checked in prices:
            _check_rule(checked, cache_read_multiplier, where=f"{where}: {label}")
    unverified = raw.get("unverified", {})
    if not isinstance(unverified, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in unverified.items()
    ):
        raise PriceTableError(
            f"{where}: field 'unverified' must map figure paths such as "
            '"usd_per_mtok.cache_read" to the reason.'
        )
    for path in unverified:
        head, _, category = path.partition(".")
        if head not in ("usd_per_mtok", "fast_usd_per_mtok", "bands") or (
            category and category not in PRICE_FIELDS
        ):
            raise PriceTableError(f"{where}: 'unverified' names an unknown figure {path!r}.")
    return PriceEntry(
        name=name,
        family=_family(raw.get("family"), where=where),
        match=_patterns(raw.get("match"), where=where),
        effective_from=effective_from,
        released=effective_from
        if released is None
        else _date(released, where=f"{where}: field 'released'"),
        price=price,
        index=index,
        fast=fast,
        bands=bands,
        geo_us=_optional_multiplier(raw, "inference_geo_us_multiplier", where),
        regional=_optional_multiplier(raw, "regional_endpoint_multiplier", where),
        cache_read_multiplier=cache_read_multiplier,
        unverified=dict(unverified),
        source=_optional_text(raw.get("source"), where=f"{where}: field 'source'"),
        status=_optional_text(raw.get("status"), where=f"{where}: field 'status'"),
        note=_optional_text(raw.get("note"), where=f"{where}: field 'note'"),
    )


def _check_rule(price: Price, multiplier: Fraction, *, where: str) -> None:
    """The pricing page's rule: writes 1.25x and 2x input, cache reads the model's multiplier."""
    expected = {
        "cache_write_5m": _WRITE_5M * price.input,
        "cache_write_1h": _WRITE_1H * price.input,
        "cache_read": multiplier * price.input,
    }
    for name, want in expected.items():
        if getattr(price, name) != want:
            raise PriceTableError(
                f"{where}: '{name}' is {Decimal(getattr(price, name)) / MICROS_PER_USD} but the "
                f"cache rule (5m 1.25x, 1h 2x, read {_show(multiplier)}x input) gives "
                f"{Decimal(want.numerator) / want.denominator / MICROS_PER_USD}."
            )


def _optional_multiplier(raw: Mapping[str, Any], name: str, where: str) -> Fraction:
    value = raw.get(name)
    return _ONE if value is None else _multiplier(value, where=f"{where}: field {name!r}")


def _list(raw: Mapping[str, Any], name: str, where: str) -> list[Any]:
    value = raw.get(name, [])
    if not isinstance(value, list):
        raise PriceTableError(f"{where}: field {name!r} must be a list.")
    return value


def _band_of(raw: object, *, where: str) -> Band:
    if not isinstance(raw, Mapping):
        raise PriceTableError(f"{where} must be an object.")
    _no_unknown_keys(raw, _BAND_FIELDS, where=where)
    above = raw.get("above_prompt_tokens")
    if type(above) is not int or above <= 0:
        raise PriceTableError(
            f"{where}: field 'above_prompt_tokens' must be a positive integer, got {above!r}."
        )
    before = raw.get("before")
    return Band(
        above_prompt_tokens=above,
        price=_price(raw.get("usd_per_mtok"), where=where),
        before=None if before is None else _date(before, where=f"{where}: field 'before'"),
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
            'such as "claude-sonnet-4-5-20*".'
        )
    return tuple(p.strip().lower() for p in value)


def _date(value: object, *, where: str) -> date:
    if isinstance(value, str) and _ISO_DATE.fullmatch(value):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    raise PriceTableError(f'{where} must be an ISO date such as "2025-11-24", got {value!r}.')


def _price(value: object, *, where: str, label: str = "usd_per_mtok") -> Price:
    if not isinstance(value, Mapping):
        raise PriceTableError(
            f"{where}: field {label!r} must be an object with {', '.join(PRICE_FIELDS)}."
        )
    _no_unknown_keys(value, set(PRICE_FIELDS), where=f"{where}: field {label!r}")
    micros = {
        name: _micros(value.get(name), where=f"{where}: field '{label}.{name}'")
        for name in PRICE_FIELDS
    }
    return Price(**micros)


# --- the installed table (``ccgate prices update``) -------------------------------------------


def installed(path: Path) -> tuple[PriceTable, str]:
    """The table in force and where it came from: ``path`` when it holds a valid table at least
    as new (by ``version``) as the shipped one, else the shipped table.

    A damaged file never stops the daemon: the shipped table is used and the reason returned.
    """
    shipped = PriceTable.default()
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return shipped, "shipped"
    except OSError as exc:
        return shipped, f"shipped (cannot read {path}: {exc.strerror})"
    try:
        table = PriceTable.from_json(text, source=f"installed price table ({path})")
    except PriceTableError as exc:
        return shipped, f"shipped ({exc})"
    if table.version < shipped.version:
        return shipped, f"shipped (newer than the installed {table.version} at {path})"
    return table, str(path)


def install(text: bytes, path: Path) -> PriceTable:
    """Validate ``text`` and make it the installed table; a bad table changes nothing."""
    from ccgate._files import atomic_write

    table = PriceTable.from_json(text, source="new price table")
    shipped = PriceTable.default()
    if table.version < shipped.version:
        raise PriceTableError(
            f"The new price table's version {table.version!r} is older than the shipped table's "
            f"{shipped.version!r}; it would never be used. Nothing was changed."
        )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, text)
    return table


@functools.cache
def _shipped_table() -> PriceTable:
    text = resources.files("ccgate").joinpath("data/prices.json").read_text(encoding="utf-8")
    return PriceTable.from_json(text, source="shipped price table (ccgate/data/prices.json)")
