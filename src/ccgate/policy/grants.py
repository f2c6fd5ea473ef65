"""How big a budget lease to grant: one pure function shared by the server, the daemon and tests.

Many daemons share one budget (docs/protocol.md, "Budget leases"). The server hands each a slice
of what is left at every level (key, team, customer) and keeps the invariant
``spent + outstanding <= limit`` per level; this module only decides the size of one slice, from
plain numbers, so it is tested exhaustively without a database or a clock:

- ``remaining = limit - spent - outstanding`` (never negative);
- ``ask = max(want, min_grant, ceil(rate * target_s))``: enough for the request at hand and for
  ``target_s`` seconds of the daemon's recent spend, so a busy daemon comes back rarely;
- ``cap = max(want, floor(share * remaining))``: no daemon takes more than ``share`` of what is
  left unless one request needs more, so slices shrink as the budget nears zero and the last
  dollars are spread over the daemons still asking;
- ``granted = min(ask, min over levels of min(cap, remaining))``, except that a level whose
  ``remaining`` cannot fit ``want`` makes the grant 0: a slice smaller than the request it was
  asked for could not be spent on it, and would only lock budget away from other daemons.

Amounts are integer micro-dollars; rounding always favours the budget (caps round down).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

DEFAULT_TARGET_S: Final = 300.0
"""A grant aims to cover five minutes of the daemon's recent spend."""

DEFAULT_SHARE: Final = 0.25
"""One daemon never takes more than a quarter of what is left (unless one request needs more)."""

DEFAULT_MIN_GRANT: Final = 100_000
"""Ten cents: below this a daemon would come back for every request."""


@dataclass(frozen=True)
class LevelBudget:
    """One budget level as the server sees it inside the grant's transaction."""

    limit_micros: int
    spent_micros: int
    outstanding_micros: int

    @property
    def remaining_micros(self) -> int:
        return max(0, self.limit_micros - self.spent_micros - self.outstanding_micros)


@dataclass(frozen=True)
class Grant:
    granted_micros: int
    limited_by: int | None
    """Index (into the levels given) of the level that held the grant below ``ask``, if any."""


def grant_amount(
    levels: Sequence[LevelBudget],
    *,
    want_micros: int,
    rate_micros_per_s: float,
    target_s: float = DEFAULT_TARGET_S,
    share: float = DEFAULT_SHARE,
    min_grant: int = DEFAULT_MIN_GRANT,
) -> Grant:
    """The slice to grant across ``levels`` (each level with a budget; none means unlimited).

    ``limited_by`` names the first level (in the order given) whose bound is the smallest and
    below ``ask``; it is ``None`` when the daemon got everything it asked for.
    """
    _check(want_micros, rate_micros_per_s, target_s=target_s, share=share, min_grant=min_grant)
    ask = max(want_micros, min_grant, math.ceil(rate_micros_per_s * target_s))
    granted, limited_by = ask, None
    for index, level in enumerate(levels):
        remaining = level.remaining_micros
        if remaining < want_micros:
            return Grant(granted_micros=0, limited_by=index)
        bound = min(max(want_micros, math.floor(share * remaining)), remaining)
        if bound < granted:
            granted, limited_by = bound, index
    return Grant(granted_micros=granted, limited_by=limited_by)


def _check(want_micros: int, rate: float, *, target_s: float, share: float, min_grant: int) -> None:
    # Programming errors, not user errors: the server validates request bodies before this.
    if want_micros < 0 or min_grant < 0:
        raise ValueError("want_micros and min_grant must be >= 0")
    if not math.isfinite(rate) or rate < 0:
        raise ValueError("rate_micros_per_s must be a finite number >= 0")
    if not math.isfinite(target_s) or target_s <= 0:
        raise ValueError("target_s must be a finite number > 0")
    if not 0 < share <= 1:
        raise ValueError("share must be in (0, 1]")
