"""A seat's plan quota, as the upstream reports it in ``anthropic-ratelimit-unified-*`` headers.

A Claude Code login on a subscription or seat plan (passthrough) gets these headers on every
answer the plan's limiter ran on. Their names and units are Claude Code's own reading of them
(2.1.332): per window ``anthropic-ratelimit-unified-{5h,7d,7d_oi,overage}-{utilization,reset,
status,surpassed-threshold}``, where utilization is the fraction of the window used (0-1, above 1
when usage runs past the cap) and reset is unix epoch seconds; plus the overall ``-status``
(allowed, allowed_warning, rejected), ``-reset``, ``-representative-claim`` (the window that
binds: five_hour, seven_day, ...), ``-fallback`` and ``-overage-*``. An answer without
``-status`` means the limiter did not run; Claude Code then ignores the other headers, and so
does ccgate. See docs/how-it-works.md ("Seat quota") for the sources.

Everything here is pure: headers in, a ``Quota`` out, and the text the CLI and the status line
show, with ``now`` injected.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

PREFIX: Final = "anthropic-ratelimit-unified-"
MAX_HEADERS: Final = 48
"""At most this many unified headers are kept per answer (the real API sends about a dozen)."""
MAX_VALUE: Final = 200
WINDOWS: Final = (("five_hour", "5h"), ("seven_day", "7d"))
"""The windows ccgate shows (Claude Code's names, and the header infix). ``7d_oi`` and
``overage`` are kept in the raw headers but not shown."""
WARN_AT: Final = (95, 80)


def capture(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str] | None:
    """The unified headers of one answer (name without the prefix -> value), or None.

    None also when ``-status`` is absent: the limiter did not run, the rest means nothing."""
    kept: dict[str, str] = {}
    prefix = PREFIX.encode()
    for name, value in headers:
        lower = name.lower()
        if lower.startswith(prefix) and len(kept) < MAX_HEADERS:
            kept[lower[len(prefix) :].decode("latin-1")] = value.decode("latin-1")[:MAX_VALUE]
    return kept if "status" in kept else None


def encode(raw: Mapping[str, str] | None) -> str | None:
    """The ledger column: the captured headers as compact, sorted JSON."""
    if not raw:
        return None
    return json.dumps(dict(raw), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Window:
    utilization: float | None
    """Fraction of the window used (0.42 = 42 %)."""
    resets_at: int | None
    """Unix epoch seconds."""
    status: str | None = None

    def percent(self) -> int | None:
        if self.utilization is None:
            return None
        return round(self.utilization * 100)


@dataclass(frozen=True, slots=True)
class Quota:
    observed_at: float
    status: str
    """allowed, allowed_warning or rejected."""
    representative_claim: str | None
    resets_at: int | None
    five_hour: Window | None
    seven_day: Window | None
    fallback: str | None = None
    overage_status: str | None = None

    def windows(self) -> list[tuple[str, Window]]:
        return [
            (short, w)
            for (_, short), w in zip(WINDOWS, (self.five_hour, self.seven_day), strict=True)
            if w is not None
        ]


def _number(value: str | None) -> float | None:
    if value is None or not value.strip():
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _epoch(value: str | None) -> int | None:
    number = _number(value)
    return None if number is None else round(number)


def _window(raw: Mapping[str, str], infix: str) -> Window | None:
    utilization = _number(raw.get(f"{infix}-utilization"))
    resets_at = _epoch(raw.get(f"{infix}-reset"))
    status = raw.get(f"{infix}-status")
    if utilization is None and resets_at is None and status is None:
        return None
    return Window(utilization, resets_at, status)


def parse(raw: Mapping[str, str], *, observed_at: float) -> Quota:
    """The quota the captured headers describe (see ``capture``)."""
    return Quota(
        observed_at=observed_at,
        status=raw.get("status") or "allowed",
        representative_claim=raw.get("representative-claim") or None,
        resets_at=_epoch(raw.get("reset")),
        five_hour=_window(raw, "5h"),
        seven_day=_window(raw, "7d"),
        fallback=raw.get("fallback") or None,
        overage_status=raw.get("overage-status") or None,
    )


def decode(column: str | None, *, observed_at: float) -> Quota | None:
    """The quota stored in a ledger row's ``ratelimit`` column; None when there is none."""
    if not column:
        return None
    try:
        raw = json.loads(column)
    except ValueError:
        return None
    if not isinstance(raw, dict) or "status" not in raw:
        return None
    return parse({str(k): str(v) for k, v in raw.items()}, observed_at=observed_at)


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def _current(window: Window, now: float) -> Window:
    # Past its reset the window has started afresh: what was used is not used any more, but
    # how much of the new window is, only the next answer can say.
    if window.resets_at is not None and now >= window.resets_at:
        return Window(None, None, None)
    return window


def to_json(quota: Quota | None, *, now: float) -> dict[str, Any] | None:
    """For ``status --json`` and ``usage --json``: utilization as a fraction and a percentage,
    resets as ISO 8601 (and epoch seconds, as the headers give them)."""
    if quota is None:
        return None
    out: dict[str, Any] = {
        "observed_at": _iso(quota.observed_at),
        "status": quota.status,
        "representative_claim": quota.representative_claim,
        "resets_at": _iso(quota.resets_at),
        "fallback": quota.fallback,
        "overage_status": quota.overage_status,
    }
    for (name, _), window in zip(WINDOWS, (quota.five_hour, quota.seven_day), strict=True):
        if window is None:
            out[name] = None
            continue
        current = _current(window, now)
        out[name] = {
            "utilization": current.utilization,
            "percent": current.percent(),
            "resets_at": _iso(current.resets_at),
            "resets_at_epoch": current.resets_at,
            "status": current.status,
            "window_reset": current is not window,
        }
    return out


def level(quota: Quota, *, now: float) -> int:
    """The warning level of the fullest window (95, 80 or 0); 95 also when refused."""
    if quota.status == "rejected":
        return 95
    highest = max(
        (_current(w, now).percent() or 0 for _, w in quota.windows()),
        default=0,
    )
    return next((at for at in WARN_AT if highest >= at), 0)


def short(quota: Quota, *, now: float) -> str:
    """``5h 42% · 7d 18%``: the status line's part and the first words of ``status``."""
    parts = []
    for name, window in quota.windows():
        current = _current(window, now)
        pct = current.percent()
        parts.append(f"{name} {pct}%" if pct is not None else f"{name} new window")
    text = " · ".join(parts) if parts else f"plan {quota.status}"
    if quota.status == "rejected":
        text += " (limit reached)"
    return text


def describe(quota: Quota, *, now: float, duration: Any) -> str:
    """One sentence for ``ccgate status``: each window with its reset, and how fresh it is.

    ``duration`` formats seconds (the CLI's and the status line's own helper)."""
    parts = []
    for name, window in quota.windows():
        current = _current(window, now)
        pct = current.percent()
        if pct is None:
            parts.append(f"{name} window reset {duration(now - (window.resets_at or now))} ago")
            continue
        resets = (
            f", resets in {duration(current.resets_at - now)}"
            if current.resets_at is not None
            else ""
        )
        parts.append(f"{name} {pct}% used{resets}")
    status = {"allowed_warning": "close to a limit", "rejected": "limit reached"}.get(
        quota.status, quota.status
    )
    claim = f" (binding: {quota.representative_claim})" if quota.representative_claim else ""
    seen = f"as of {duration(max(now - quota.observed_at, 0))} ago"
    return f"{'; '.join(parts) or 'no windows reported'}; {status}{claim}; {seen}"
