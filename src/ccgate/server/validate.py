"""Reading untrusted JSON bodies: each helper names the field it refuses and why."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ccgate.accounting import periods
from ccgate.server.errors import InvalidRequestError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
NAME_RULE = "1-64 characters: letters, digits, '.', '_', '@', '-', starting with a letter or digit"
MAX_MICROS = 2**62  # fits BIGINT with room for sums


def mapping(value: Any, *, what: str = "The request body") -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidRequestError(f"{what} must be a JSON object.")
    return value


def name(body: Mapping[str, Any], field: str = "name") -> str:
    value = body.get(field)
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidRequestError(f"{field!r} must be a name of {NAME_RULE}; got {value!r}.")
    return value


def optional_name(body: Mapping[str, Any], field: str) -> str | None:
    return None if body.get(field) is None else name(body, field)


def string(body: Mapping[str, Any], field: str, *, max_len: int = 2048) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise InvalidRequestError(f"{field!r} must be a non-empty string of at most {max_len}.")
    return value


MAX_INT32 = 2**31 - 1  # an INTEGER column on PostgreSQL
MAX_EPOCH_S = 253_402_300_799.0  # 9999-12-31T23:59:59Z: the last second datetime can show


def integer(
    body: Mapping[str, Any],
    field: str,
    *,
    default: int | None,
    minimum: int = 0,
    maximum: int = MAX_INT32,
) -> int | None:
    value = body.get(field, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise InvalidRequestError(
            f"{field!r} must be an integer from {minimum} to {maximum}; got {_short(value)}."
        )
    return value


def number(body: Mapping[str, Any], field: str) -> float | None:
    """Epoch seconds: finite and within what a date can show (NaN would never compare)."""
    value = body.get(field)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= MAX_EPOCH_S  # False for NaN too
    ):
        raise InvalidRequestError(
            f"{field!r} must be epoch seconds from 0 to {MAX_EPOCH_S:.0f}; got {_short(value)}."
        )
    return float(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def budget(value: Any) -> tuple[int, str, bool] | None:
    """A Budget object -> (limit_micros, period, rolling), or None for no budget."""
    if value is None:
        return None
    body = mapping(value, what="'budget'")
    limit = body.get("limit_micros")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_MICROS:
        raise InvalidRequestError(
            f"'budget.limit_micros' must be a whole number of micro-dollars >= 0; got {limit!r}."
        )
    period = body.get("period")
    if period not in ("1d", "1w", "1M"):
        raise InvalidRequestError(f"'budget.period' must be 1d, 1w or 1M; got {period!r}.")
    rolling = body.get("rolling", False)
    if not isinstance(rolling, bool):
        raise InvalidRequestError("'budget.rolling' must be true or false.")
    return limit, periods.parse_period(period), rolling


def token_budget(value: Any) -> tuple[int, str, bool] | None:
    """A TokenBudget object -> (limit_tokens, period, rolling), or None for no token budget."""
    if value is None:
        return None
    body = mapping(value, what="'token_budget'")
    limit = body.get("limit_tokens")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_MICROS:
        raise InvalidRequestError(
            f"'token_budget.limit_tokens' must be a whole number of tokens >= 0; got {limit!r}."
        )
    period = body.get("period")
    if period not in ("1d", "1w", "1M"):
        raise InvalidRequestError(f"'token_budget.period' must be 1d, 1w or 1M; got {period!r}.")
    rolling = body.get("rolling", False)
    if not isinstance(rolling, bool):
        raise InvalidRequestError("'token_budget.rolling' must be true or false.")
    return limit, periods.parse_period(period), rolling


def models(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
        raise InvalidRequestError("'models' must be a list of model ids or patterns.")
    return list(dict.fromkeys(value))  # drop repeats, keep order
