"""The request body parse: the one-pass fast path accepts exactly what the previous parse
(msgspec's full decode, then json.loads) accepted, with the same values for the keys ccgate
reads; that one accepts what json.loads accepts; a repeated top-level key is always refused."""

from __future__ import annotations

import json
import random

import pytest

from bench.workload import request_body
from ccgate.gateway import _body
from ccgate.gateway._body import READ, BodyError, parse_body


def exact(body: bytes) -> dict[str, object]:
    """What the contract says parse_body answers: json.loads's (with the duplicate check), the
    keys ccgate reads of an object."""
    value = _body._exact(body)
    if not isinstance(value, dict):
        raise BodyError("The request body must be a JSON object.")
    return {key: value[key] for key in READ if key in value}


def outcome(body: bytes, parse: object = parse_body) -> tuple[str, object]:
    assert callable(parse)
    try:
        value = parse(body)
    except BodyError as exc:
        return "refused", str(exc)
    # Types and values exactly (1 and 1.0 differ, key order counts, lone surrogates escaped).
    return "parsed", json.dumps(value)


def variants(body: bytes) -> list[bytes]:
    """The body; with its key "a" renamed to one ccgate reads (its value decoded); and nested,
    as a value inside an object (skipped by the fast path's scan, not decoded)."""
    return [
        body,
        body.replace(b'"a"', b'"max_tokens"'),
        b'{"model":"m","nested":[' + body + b"]}",
        b'{"model":"m","nested":{"x":' + body + b"}}",
    ]


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
    b'{"a":"\\ud800"}',  # lone surrogates: json.loads keeps them, msgspec refuses
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
    b"[" * 990 + b"]" * 990,  # about where msgspec's and json.loads's depth limits are
    b"[" * 996 + b"]" * 996,
    b"[" * 1_000 + b"]" * 1_000,
    b'{"a":"\xc3\xa9 \xf0\x9f\x98\x80"}',  # valid UTF-8
    b'{"a":"\xc3"}',  # truncated UTF-8
    b'{"a":"\xf4\x90\x80\x80"}',  # past U+10FFFF
    b'{"a":[1e400, 2]}',
    b'{"a":' + b"9" * 400 + b".5}",  # out of the double range without an exponent
    b'{"a":[' + b"9" * 4301 + b"]}",
    b'{"a":"' + b"9" * 5000 + b'"}',  # a long digit run in a string: nothing to refuse
    b'{"a":[NaN]}',
    b'{"a":{"x":-Infinity}}',
    b'{"a":[tru]}',
    b'{"a":[1,]}',
    b'{"a":{"x":1,}}',
    b'{"a":{1:2}}',
    b'{"a":["\t"]}',
    b'{"a":["\\U0041"]}',
    b'{"a":"\\ud83d\\ude00 \\u00e9 \\/ \\b"}',
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
def test_each_edge_is_answered_as_the_previous_parse_answers_it(body: bytes) -> None:
    for variant in variants(body):
        assert outcome(variant) == outcome(variant, _body._previous), variant[:200]


@pytest.mark.parametrize("body", EDGES, ids=range(len(EDGES)))
def test_the_previous_parse_answers_each_edge_as_json_loads_does(body: bytes) -> None:
    assert outcome(body, _body._previous) == outcome(body, exact)
    assert outcome(body.replace(b'"a"', b'"max_tokens"'), _body._previous) == outcome(
        body.replace(b'"a"', b'"max_tokens"'), exact
    )


@pytest.mark.parametrize("offset", [0, 1, 2, 17, 1000, 4299, 4300, 4301, 4302, 8000])
@pytest.mark.parametrize("digits", [4300, 4301, 9000])
def test_an_integer_too_long_for_python_is_refused_wherever_it_lies(
    offset: int, digits: int
) -> None:
    # The fast path looks at one byte in 4301 for a digit run that long: at every alignment
    # the run must be found, and one a digit shorter must not be refused.
    body = b'{"model":"m","pad":"' + b"x" * offset + b'","n":[' + b"7" * digits + b"]}"
    assert outcome(body) == outcome(body, _body._previous) == outcome(body, exact)
    assert (outcome(body)[0] == "refused") is (digits > 4300)
    in_string = body.replace(b"[7", b'["7').replace(b"7]", b'7"]')
    assert outcome(in_string) == ("parsed", json.dumps({"model": "m"}))


def test_the_fast_path_decodes_only_the_keys_ccgate_reads() -> None:
    body = b'{"model":"m","stream":true,"max_tokens":12,"messages":[{"content":"hi"}]}'
    assert parse_body(body) == {"model": "m", "stream": True, "max_tokens": 12}
    assert parse_body(b'{"messages":[]}') == {}
    with pytest.raises(BodyError, match="must be a JSON object"):
        parse_body(b"[1]")


def test_a_number_out_of_range_beside_a_nested_repeated_key_is_the_one_difference() -> None:
    # The previous parse refused this body only because msgspec's full decode refused the
    # number and json.loads then also checked the nested keys; finding such numbers costs more
    # than the whole fast path, so it is accepted like any other nested repeat.
    body = b'{"model":"m","metadata":{"user_id":"a","user_id":"b"},"x":[1e400]}'
    assert parse_body(body) == {"model": "m"}
    with pytest.raises(BodyError, match="'user_id' more than once"):
        _body._previous(body)
    assert parse_body(body.replace(b"1e400", b"1e300")) == {"model": "m"}
    assert _body._previous(body.replace(b"1e400", b"1e300")) == {"model": "m"}


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
    assert parse_body(body) == {"model": "m"}
    assert _body._previous(body) == {"model": "m"}
    with pytest.raises(BodyError, match="'user_id' more than once"):
        _body._exact(body)


@pytest.mark.parametrize("stream", [True, False])
def test_the_claude_code_body_takes_the_fast_path(
    stream: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = request_body(stream=stream)
    values = _body._TOP_LEVEL(body)
    assert _body._compact(body, values) and _body._keys_unique(body, values)
    full = json.loads(body)
    expected = {key: full[key] for key in READ if key in full}

    def no_fallback(_body: bytes) -> object:
        raise AssertionError("the fast path fell back")

    monkeypatch.setattr(_body, "_previous", no_fallback)
    assert parse_body(body) == expected
    pretty = json.dumps(full, indent=1).encode()  # whitespace: the walk proves the keys
    assert not _body._compact(pretty, _body._TOP_LEVEL(pretty))
    assert parse_body(pretty) == expected


@pytest.mark.parametrize(
    ("body", "compact"),
    [
        (b'{"a":1,"b":2}', True),
        (b'{"a":{"a":1},"b":[{"b":2}]}', True),
        (b'{"\xc3\xa9":1}', True),
        (b"{}", True),
        (b'{"a":1,"a":2}', False),
        (b'{"a":1,"b":2,"a":3}', False),
        (b'{"a":"xy","a":"xy"}', False),
        (b'{"mod\\u0065l":"a","stream":true}', False),  # unique, but an escape: the walk says
        (b'{"\xc3\xa9":1,"\\u00e9":2}', False),  # the same key twice, once escaped
        (b'{"a":1 }', False),
        (b"{ }", False),
    ],
)
def test_the_length_check_claims_unique_keys_only_when_they_are(body: bytes, compact: bool) -> None:
    pairs = json.loads(body, object_pairs_hook=lambda p: p)
    assert _body._compact(body, _body._TOP_LEVEL(body)) is compact
    if compact:
        assert len({k for k, _ in pairs}) == len(pairs)


def test_mutated_bodies_are_answered_as_the_exact_parse_answers_them() -> None:
    # Random byte edits, including copies of a chunk elsewhere (which repeat keys): the fast
    # path answers every body as the previous parse did; every body it accepts, the exact path
    # accepts with the same values; every refusal is the exact path's own. The only difference
    # allowed from the exact path is a key repeated below the top level.
    rng = random.Random(12)
    bases = [
        b'{"model":"claude-x","max_tokens":1024,"stream":true,"messages":[{"role":"user",'
        b'"content":"hi \\u00e9 \\ud83d\\ude00 \xc3\xa9"}],"t":1.5e3,"n":-0,"z":[null,false,{}]}',
        b' { "model" : "a" , "mod\\u0065l" : "b", "x": {"model": 1} , "y" : 12 , "y2" : "1" } ',
        b'{"model":"m","max_tokens":7,"m":[{"k":[1,-2.5e-3,"\\u00e9\xc3\xa9",{"q":null}],'
        b'"d":{"e":true,"f":[[],{}]}},"\\ud83d\\ude00"],"s":"a\\"b\\\\c\\/\\n"}',
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
        new, old = outcome(bytes(body)), outcome(bytes(body), exact)
        assert new == outcome(bytes(body), _body._previous)
        if new != old:
            assert new[0] == "parsed" and "more than once" in str(old[1])
            pairs = json.loads(bytes(body), object_pairs_hook=lambda p: p)
            keys = [k for k, _ in pairs]
            assert len(keys) == len(set(keys))  # the repeat was nested
            nested += 1
        fast += new[0] == "parsed"
    assert fast > 1_000 and nested < 100  # the mutations reach both paths
