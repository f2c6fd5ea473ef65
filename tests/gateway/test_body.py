"""The request body parse: msgspec's fast path accepts exactly what json.loads accepted, with
the same values, and a repeated top-level key is always refused."""

from __future__ import annotations

import json
import random

import pytest

from bench.workload import request_body
from ccgate.gateway import _body
from ccgate.gateway._body import BodyError, parse_body


def outcome(body: bytes, parse: object = parse_body) -> tuple[str, object]:
    assert callable(parse)
    try:
        value = parse(body)
    except BodyError as exc:
        return "refused", str(exc)
    # Types and values exactly (1 and 1.0 differ, key order counts, lone surrogates escaped).
    return "parsed", json.dumps(value)


# Edges where a C decoder could differ from json.loads: each must give the same answer (value
# or refusal, with the same message) as the exact path, which is the old parse_body.
EDGES = [
    b'{"a":1}',
    b' \t\r\n{ "a" : 1 , "b" : [ ] } \n',
    b"{}",
    b"[1, 2]",  # not an object: parsed here, refused by the gateway
    b'"text"',
    b"1",
    b"null",
    b'{"a":NaN}',
    b'{"a":Infinity}',
    b'{"a":-Infinity}',
    b'{"a":1e400}',  # json.loads: inf; msgspec refuses, so the exact path answers
    b'{"a":1.7976931348623159e308}',
    b'{"a":1e-400}',
    b'{"a":-0}',
    b'{"a":-0.0}',
    b'{"a":4.9e-324}',
    b'{"a":0.1e1}',
    b'{"a":18446744073709551616}',
    b'{"a":-9223372036854775809}',
    b'{"a":' + b"9" * 4300 + b"}",
    b'{"a":' + b"9" * 4301 + b"}",  # past Python's int digit limit: refused either way
    b'{"a":"\\ud800"}',  # lone surrogates: json.loads keeps them
    b'{"a":"\\udc00x"}',
    b'{"a":"\\ud83d\\ude00"}',
    b'{"a":"\xed\xa0\x80"}',  # a surrogate in UTF-8 bytes: refused either way
    b'{"a":"\xff"}',
    b'{"a":"\xc0\x80"}',
    b'{"a":"\x01"}',
    b'{"a":"\x7f"}',
    b'{"a":"\\u0000"}',
    b'{"a":"\\x"}',
    b"\xef\xbb\xbf" + b'{"a":1}',  # a UTF-8 BOM: json.loads skips it
    '{"a":"é"}'.encode("utf-16"),  # json.loads detects UTF-16 and UTF-32
    '{"a":"é"}'.encode("utf-32-le"),
    b'{"a":1,}',
    b'{"a":01}',
    b'{"a":1}x',
    b'{"a":1}\x0c',
    b"",
    b"[" * 100 + b"]" * 100,
    b"[" * 100_000,
    b"[" * 5_000 + b"]" * 5_000,
    # repeated keys: refused, whatever the path
    b'{"model":"a","model":"b"}',
    b'{"model":"a","model":"a"}',
    b'{"model":"a", "mod\\u0065l":"b"}',  # the same key, written with an escape
    b'{"a":1,"b":2,"a":12}',
    b'{"a":12,"b":2,"a":1}',  # the last value is a prefix of the first
    b'{"a":{"x":1},"a":{"x":1}}',
    b'{"a":"1","a":"12"}',
    b'{"":1,"":2}',
    # keys with escapes and no repeat: the walk gives up, the exact path parses
    b'{"mod\\u0065l":"a","stream":true}',
    b'{"a\\"b":1,"a":2}',
]


@pytest.mark.parametrize("body", EDGES, ids=range(len(EDGES)))
def test_each_edge_is_answered_as_the_exact_parse_answers_it(body: bytes) -> None:
    assert outcome(body) == outcome(body, _body._exact)


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (b'{"model":"claude-haiku-4-5","model":"claude-opus-4-1","max_tokens":1}', "model"),
        (b'{"stream":false,"max_tokens":1,"stream":true}', "stream"),
        (b'{ "max_tokens" : 1 ,\n "max_tokens" : 100000 }', "max_tokens"),
        (b'{"model":"x","mod\\u0065l":"y"}', "model"),
        (b'{"a":12,"b":[{"a":1}],"a":1}', "a"),
    ],
)
def test_a_repeated_top_level_key_is_refused_by_name(body: bytes, key: str) -> None:
    with pytest.raises(BodyError, match=f"the key '{key}' more than once"):
        parse_body(body)


def test_a_key_repeated_in_a_nested_object_is_no_longer_refused() -> None:
    # ccgate reads only top-level keys; the upstream reads the nested ones as it likes.
    body = b'{"model":"m","metadata":{"user_id":"a","user_id":"b"}}'
    assert parse_body(body) == {"model": "m", "metadata": {"user_id": "b"}}
    with pytest.raises(BodyError, match="'user_id' more than once"):
        _body._exact(body)


@pytest.mark.parametrize("stream", [True, False])
def test_the_claude_code_body_takes_the_fast_path(stream: bool) -> None:
    body = request_body(stream=stream)
    assert _body._keys_unique(body)
    assert parse_body(body) == json.loads(body)


def test_mutated_bodies_are_answered_as_the_exact_parse_answers_them() -> None:
    # Random byte edits, including copies of a chunk elsewhere (which repeat keys): every body
    # the fast path accepts, the exact path accepts with the same value; every refusal is the
    # exact path's own. The only difference allowed is a key repeated below the top level.
    rng = random.Random(12)
    bases = [
        b'{"model":"claude-x","max_tokens":1024,"stream":true,"messages":[{"role":"user",'
        b'"content":"hi \\u00e9 \\ud83d\\ude00 \xc3\xa9"}],"t":1.5e3,"n":-0,"z":[null,false,{}]}',
        b' { "model" : "a" , "mod\\u0065l" : "b", "x": {"model": 1} , "y" : 12 , "y2" : "1" } ',
    ]
    alphabet = b'{}[]":,.-+eE0123456789\\u abcdfnrtmol\x00\x01\xc3\xa9\xff \t\n\r'
    fast, nested = 0, 0
    for _ in range(20_000):
        body = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 3)):
            at, op = rng.randrange(len(body)), rng.random()
            if op < 0.3:
                body[at] = rng.choice(alphabet)
            elif op < 0.55:
                body.insert(at, rng.choice(alphabet))
            elif op < 0.8:
                del body[at]
            else:
                start = rng.randrange(len(body))
                body[at:at] = body[start : start + rng.randint(1, 20)]
        new, old = outcome(bytes(body)), outcome(bytes(body), _body._exact)
        if new != old:
            assert new[0] == "parsed" and "more than once" in str(old[1])
            pairs = json.loads(bytes(body), object_pairs_hook=lambda p: p)
            keys = [k for k, _ in pairs]
            assert len(keys) == len(set(keys))  # the repeat was nested
            nested += 1
        fast += new[0] == "parsed"
    assert fast > 1_000 and nested < 100  # the mutations reach both paths
