"""The request body's JSON, strictly and fast: what ``Gateway`` judges a request by.

The body is forwarded as it came, so ccgate must read the same values the upstream will: a
top-level key that appears twice (``"model"`` judged on one value, sent with another) is
refused. The gateway reads only top-level keys (``READ``: ``model``, ``stream``,
``max_tokens``), so only those are decoded into Python objects.

The fast path is one pass of msgspec's C decoder into ``dict[str, msgspec.Raw]``: it checks the
syntax of the whole body (every nested value is skipped by a validating scan: strings and their
escapes, numbers, literals, nesting depth, the same limits as a full decode) without building
the body's object graph, and hands each top-level value's bytes to a walk that proves every
top-level key appears once. Only the values ccgate reads are then decoded from their bytes.

That scan accepts a few things msgspec's full decode refuses: invalid UTF-8 inside a nested
string, an integer longer than Python's digit limit (``sys.get_int_max_str_digits``) and a
number outside the double range. The first two are checked for here (an ``isascii`` and, for a
non-ASCII body, a UTF-8 decode: 3-5 µs on 100 KB; a digit run that long must cover one of the
bytes ``body[limit::limit + 1]``: a few dozen looked at), and such a body takes the previous
path (``_previous``): msgspec's full decode, then the same walk, and for everything msgspec
refuses or the walk cannot prove, ``json.loads`` (``_exact``), refusing a repeated key in any
object and NaN/Infinity, with the same error messages. A number out of the double range is not
checked for (a scan for exponents costs more than the whole parse): ``json.loads`` accepts it
as infinity, as before, so the only body answered differently from the previous path is one
that also repeats a key inside a nested object, which that path refused (msgspec's refusal of
the number sent it to ``json.loads``) and this one accepts, like every other nested repeat.

So a body is accepted exactly when ``json.loads`` accepts it (tests/gateway/test_body.py: NaN
and Infinity, lone surrogates, out-of-range numbers, UTF-16 and a BOM, big integers, invalid
UTF-8 and depth, top-level and nested), except that a key repeated inside a nested object
(which ccgate does not read) is not looked for: that pairs hook on every object of every body
was 0.1 ms of the 100 KB body's 0.25 ms, and the full decode that replaced it 52 µs of 75.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Final

import msgspec


class BodyError(ValueError):
    """A request body ccgate will not forward; the message says why, for the client."""


READ: Final = ("model", "stream", "max_tokens")
"""The top-level keys ``parse_body`` decodes: all the gateway reads of a body."""

_DECODE: Final = msgspec.json.Decoder().decode
_TOP_LEVEL: Final = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
_WHITESPACE: Final = frozenset(b" \t\n\r")
_DIGITS: Final = b"0123456789"
_QUOTE: Final = b'"'
_BACKSLASH: Final = b"\\"
_COLON, _COMMA, _OPEN, _CLOSE = b":,{}"
_NOT_AN_OBJECT: Final = "The request body must be a JSON object."


def parse_body(body: bytes) -> dict[str, Any]:
    """The ``READ`` values of a JSON object body (those present), strictly: no repeated
    top-level key, no NaN/Infinity, bounded depth (see the module docstring for exactly what is
    refused). Raises ``BodyError`` with the client's message."""
    try:
        values = _TOP_LEVEL(body)
    except (msgspec.MsgspecError, RecursionError):
        return _previous(body)  # not an object, or not JSON: the previous path says which
    if not body.isascii():
        try:
            body.decode()
        except UnicodeDecodeError:
            return _previous(body)
    if _long_digit_run(body) or not (_compact(body, values) or _keys_unique(body, values)):
        return _previous(body)
    try:
        return {key: _DECODE(raw) for key in READ if (raw := values.get(key)) is not None}
    except (msgspec.MsgspecError, RecursionError):
        return _previous(body)  # say, a max_tokens out of range: json.loads answers


def _previous(body: bytes) -> dict[str, Any]:
    """The path before the one-pass parse: msgspec's full decode, else ``json.loads``."""
    try:
        parsed = _DECODE(body)
    except (msgspec.MsgspecError, RecursionError):
        parsed = _exact(body)
    else:
        if isinstance(parsed, dict) and not _keys_unique(body, None):
            parsed = _exact(body)
    if not isinstance(parsed, dict):
        raise BodyError(_NOT_AN_OBJECT)
    return {key: parsed[key] for key in READ if key in parsed}


def _long_digit_run(body: bytes) -> bool:
    """Whether ``body`` may hold an integer longer than Python converts (which msgspec and
    ``json.loads`` refuse): a run of more than ``limit`` digits, in a number or a string.

    Such a run covers one of every ``limit + 1`` bytes, so only those are looked at, and
    around a digit among them the run is measured."""
    limit = sys.get_int_max_str_digits()
    if not limit:
        return False  # no limit in this interpreter: no integer is refused for its length
    step = limit + 1
    sampled = body[limit::step]
    if len(sampled.translate(None, _DIGITS)) == len(sampled):
        return False
    for index, byte in enumerate(sampled):
        if byte in _DIGITS:
            at = limit + index * step
            before = body[at - limit : at]
            after = body[at : at + step]
            run = (
                len(before) - len(before.rstrip(_DIGITS)) + len(after) - len(after.lstrip(_DIGITS))
            )
            if run > limit:
                return True
    return False


def _compact(body: bytes, values: dict[str, msgspec.Raw]) -> bool:
    """Whether ``body`` is exactly its top-level keys and their values, each key once, written
    with no whitespace and no escape in a key: then no key can repeat.

    ``values`` (msgspec's, one per distinct key) adds up to the body's length only then: a
    second occurrence of a key, whitespace between the tokens and an escape in a key (always
    longer than the character it stands for) each make the body longer than that sum. A body
    written otherwise goes to the walk (``_keys_unique``), which tells for itself."""
    if not values:
        return len(body) == 2
    size = len(values) * 4 + 1  # two quotes, a colon and a comma (or a brace) per key; "{"
    for key, raw in values.items():
        size += len(raw) + (len(key) if key.isascii() else len(key.encode()))
    return size == len(body)


def _keys_unique(body: bytes, values: dict[str, msgspec.Raw] | None) -> bool:
    """True once a walk over the top-level object (``body`` is valid JSON) has seen each of its
    keys once; False if a key repeats or the walk cannot tell (a key with an escape in it).

    ``values`` is the body decoded into ``dict[str, msgspec.Raw]`` (None: decode it here).
    Each value is skipped by its bytes as msgspec found them for that key, which are those of
    the key's LAST occurrence: at an earlier occurrence they differ, or match a prefix that a
    complete value cannot end after (``1`` of ``12``), so the walk stops there."""
    if values is None:
        try:
            values = _TOP_LEVEL(body)
        except (msgspec.MsgspecError, RecursionError):
            return False
    seen: set[bytes] = set()
    try:
        i = _skip(body, 0)
        if body[i] != _OPEN:
            return False
        i = _skip(body, i + 1)
        if body[i] == _CLOSE:
            return True
        while True:
            if body[i : i + 1] != _QUOTE:
                return False
            end = body.index(_QUOTE, i + 1)
            key = body[i + 1 : end]
            if _BACKSLASH in key or key in seen:
                return False
            seen.add(key)
            i = _skip(body, end + 1)
            if body[i] != _COLON:
                return False
            i = _skip(body, i + 1)
            value = values.get(key.decode())
            if value is None:
                return False
            raw = bytes(value)  # (comparing memoryviews is 100 times slower)
            if not body.startswith(raw, i):
                return False
            i = _skip(body, i + len(raw))
            if body[i] == _CLOSE:
                return True
            if body[i] != _COMMA:
                return False
            i = _skip(body, i + 1)
    except (IndexError, ValueError):
        return False


def _skip(body: bytes, i: int) -> int:
    while body[i] in _WHITESPACE:
        i += 1
    return i


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) == len(pairs):
        return result
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise BodyError(
                f"The request body has the key {key[:100]!r} more than once in one object; "
                "ccgate and the upstream could read different values, so it is refused."
            )
        seen.add(key)
    return result


def _no_constant(name: str) -> Any:
    raise BodyError(f"The request body contains {name}, which is not valid JSON.")


def _exact(body: bytes) -> Any:
    try:
        return json.loads(body, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except BodyError:
        raise
    except RecursionError:
        raise BodyError("The request body is nested too deeply to be a Messages request.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BodyError(f"The request body is not JSON: {exc}.") from None
