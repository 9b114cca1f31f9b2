"""HTTP bodies read and written fast give exactly the standard library's answers (expertd.jsonio)."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import math
import uuid
from collections import OrderedDict

import numpy as np
import pytest

from expertd import http, jsonio, protocol
from expertd.errors import BadRequest


def stdlib_dumps(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                      default=http._to_json).encode("utf-8")


BODIES = [
    b"[5]", b'{"n": 5}', b"  [1, 2.5, -0, -0.0, 1e-7, 1E+2] ", b'"text"', b"null", b"true",
    b"123456789012345678901234567890",          # more than 64 bits: exact, not a float
    b"[-9223372036854775809, 18446744073709551616]",
    b"[9223372036854775807]",                   # 19 digits that fit
    b"[12345678901234567890.5]",                # 20 digits before the point
    b"[0.00012345678901234567, 1.7291035652160645]",  # many digits after a point: orjson reads these
    b"NaN", b"[Infinity, -Infinity]", b"[1e400]", b'"\\ud800"',
    '["é", "\\u00e9", "😀"]'.encode(),
    '[1]'.encode("utf-16"),                     # the standard library detects UTF-16
    b'{"a": 1, "a": 2}', b'{"inputs": [[0.5, 0.25]]}',
    b'"1234567890123456789012345"',             # digits in a string
]

BAD_BODIES = [b"", b"[1]x", b"[1,]", b"{'a': 1}", b'"\xff"', b"[" * 3 + b"]" * 2, b"01", b"-", b"tru",
              b"[" * 1000 + b"]" * 1000]  # (deeper than the standard library reads; orjson would read it)


@pytest.mark.parametrize("body", BODIES, ids=repr)
def test_a_body_reads_as_the_standard_library_reads_it(body: bytes) -> None:
    got, expected = jsonio.loads(body), json.loads(body)
    assert repr(got) == repr(expected)  # (repr: nan equals nothing, and 1 == 1.0 would hide a float read)
    assert type(got) is type(expected)


@pytest.mark.parametrize("body", BAD_BODIES, ids=repr)
def test_a_bad_body_is_refused_with_the_standard_librarys_message(body: bytes) -> None:
    with pytest.raises((ValueError, RecursionError)) as expected:
        json.loads(body)
    with pytest.raises(type(expected.value)) as got:
        jsonio.loads(body)
    assert str(got.value) == str(expected.value)


class Colour(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Name(str):
    pass


@dataclasses.dataclass
class Point:
    x: int


VALUES = [
    5, -0.0, 1e-05, 1e16, 0.1, [1, 2.5, "é"], {"a": [True, False, None]}, (1, 2), {1, 2},
    2**70, -(2**64), {"inputs": [[0.5, 0.25]]}, {1: "int key", 2.5: "float key", None: "none key", False: "b"},
    Level.HIGH, Name("subclass"), OrderedDict(a=1), "😀", np.float32(0.1), np.arange(3), np.float64(2.5),
    np.random.default_rng(1).standard_normal((2, 4), dtype=np.float32),
]

BAD_VALUES = [
    math.nan, [1.0, math.inf], {"x": -math.inf}, np.array([np.nan], dtype=np.float32), b"bytes",
    Point(1), datetime.date(2026, 1, 1), object(), "\ud800",
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_a_reply_is_written_as_the_standard_library_writes_it(value: object) -> None:
    body = jsonio.dumps(value, http._to_json)
    assert json.loads(body) == json.loads(stdlib_dumps(value))
    assert repr(json.loads(body)) == repr(json.loads(stdlib_dumps(value)))


@pytest.mark.parametrize("value", BAD_VALUES, ids=repr)
def test_a_reply_json_cannot_carry_is_refused_as_the_standard_library_refuses_it(value: object) -> None:
    with pytest.raises((TypeError, ValueError)) as expected:
        stdlib_dumps(value)
    with pytest.raises(type(expected.value)) as got:
        jsonio.dumps(value, http._to_json)
    assert str(got.value) == str(expected.value)


def test_enums_and_uuids_are_written_as_their_values_the_one_place_where_the_two_differ() -> None:
    written = jsonio.dumps([Colour.RED, uuid.UUID(int=1)], http._to_json)
    assert written == b'["red","00000000-0000-0000-0000-000000000001"]'
    with pytest.raises(TypeError):
        stdlib_dumps(Colour.RED)


class Counted:
    """A value whose conversion counts its calls (a tensor's tolist() may be costly, or have effects)."""

    calls = 0

    def tolist(self) -> list:
        Counted.calls += 1
        return [Counted.calls, None]


class Text(str):
    def tolist(self) -> list:
        return ["not this"]


def test_a_value_is_converted_once_even_when_the_standard_library_writes_the_reply() -> None:
    Counted.calls = 0
    assert jsonio.dumps([Counted()], http._to_json) == b"[[1,null]]"
    assert Counted.calls == 1


def test_a_subclass_of_a_built_in_type_is_written_as_the_standard_library_writes_it() -> None:
    assert jsonio.dumps([Text("s")], http._to_json) == stdlib_dumps([Text("s")]) == b'["s"]'


def test_a_models_row_of_floats_reads_back_to_the_same_float32_values() -> None:
    row = np.random.default_rng(2048).standard_normal((1, 2048), dtype=np.float32)
    body = jsonio.dumps({"inputs": row.tolist()}, http._to_json)
    assert np.array_equal(np.asarray(jsonio.loads(body)["inputs"], dtype=np.float32), row)
    assert np.array_equal(np.asarray(jsonio.loads(jsonio.dumps(row.tolist(), http._to_json)), dtype=np.float32), row)


def test_http_replies_end_with_a_newline_for_curl() -> None:
    assert http.dumps([1, "a"]) == b'[1,"a"]\n'


SHAPES = [  # (JSON body, refused): nesting is judged by counting [ and { first, walking only when they are many
    (b"[[" + b",".join([b"1.5"] * 2048) + b"]]", False),
    (b"[" * 10 + b"1" + b"]" * 10, True),                     # arguments deeper than max_depth 8
    (b"[" * 8 + b"1" + b"]" * 8, False),
    (b'["[[[[[[[[[[[[", {"a": "{{{{{{{{{"}]', False),        # brackets in strings: counted, then walked
    (b'{"x": [[[[[[[[[1]]]]]]]]]}', True),
]


@pytest.mark.parametrize(("body", "refused"), SHAPES, ids=lambda v: repr(v)[:40])
def test_json_arguments_nested_too_deeply_are_refused_and_wide_rows_are_not_walked(body: bytes, refused: bool) -> None:
    value = jsonio.loads(body)
    args, kwargs = (value, {}) if isinstance(value, list) else ([], value)
    if refused:
        with pytest.raises(BadRequest, match="max_depth"):
            protocol.check_shape(args, kwargs, 4096, 8, body, json=True)
    else:
        protocol.check_shape(args, kwargs, 4096, 8, body, json=True)
