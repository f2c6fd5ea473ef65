"""The one way every process writes a moment in UTC: for people, and for JSON.

Both forms are UTC on purpose: a status line, a ledger export and an alert written on different
machines must name the same instant with the same text. ``iso_utc`` is for JSON and CSV (what
``--json``, the usage export and the daemon's ``/status`` carry); ``format_utc`` is for a person
(tables, messages, the web UI). A timestamp too large for ``datetime`` (a hostile bundle, a
corrupted row) is written as epoch seconds instead of raising, so one bad value cannot break a
status page.
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["format_utc", "iso_utc"]


def iso_utc(ts: float) -> str:
    """``2026-11-01T12:00:00.000Z``: ISO-8601, UTC, millisecond precision."""
    try:
        stamp = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return f"{ts:.0f}"
    return stamp.replace("+00:00", "Z")


def format_utc(ts: float) -> str:
    """``2026-12-01 00:00 UTC``: minutes are as precise as a person needs."""
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")
    except (OverflowError, OSError, ValueError):
        return f"{ts:.0f} (epoch seconds)"
