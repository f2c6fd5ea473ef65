"""Money for people: one formatter for every table, the status line and error messages.

Base layer (no imports beyond the standard library) so the status line can use it without
loading the CLI.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

__all__ = ["money"]


def money(micros: int) -> str:
    """Exact to the cent, and meaningful below a dollar: every table uses this.

    From $1 up: cents, rounded half up (``$1.55``, ``$1,234.57``). Below $1: four significant
    digits (``$0.1248``, ``$0.02925``, ``$0.0034``, ``$0.50``), so a sub-cent request never
    shows as ``$0.00``.
    """
    if micros == 0:
        return "$0"
    sign = "-" if micros < 0 else ""
    exact = Decimal(abs(micros)) / 1_000_000
    if exact >= 1:
        return f"{sign}${exact.quantize(Decimal('0.01'), ROUND_HALF_UP):,}"
    digits = exact.adjusted()  # -1 for 0.1..0.99, -2 for 0.01..0.099, ...
    shown = exact.quantize(Decimal(1).scaleb(digits - 3), ROUND_HALF_UP)
    if shown >= 1:
        return f"{sign}$1.00"
    text = f"{shown:f}".rstrip("0")
    if len(text.split(".")[1]) < 2:
        text = f"{shown:.2f}"
    return f"{sign}${text}"
