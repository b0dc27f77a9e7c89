"""QMP framing, request checking and option parsing, fed bytes and strings (no sockets).

What is tested:

- :class:`fleece.qmp.framing.Splitter`: messages split at every byte boundary, several values
  concatenated with no separator or with any whitespace between them, strings holding braces,
  brackets, escaped quotes and backslashes; garbage (bare words, a lone ``}`` or ``]``, invalid
  UTF-8, nesting deeper than ``MAX_DEPTH``, a message longer than ``MAX_MESSAGE``) gives a
  :class:`ParseError` and the very next valid message still parses; the tail of an over-long
  message is never parsed as new messages; a top-level string with a brace and the QMP spec's
  resynchronisation (a control character or a 0xFF byte) work. QEMU's own JSON extension
  (single-quoted strings) is accepted, and every syntax and lexical error reads word for word
  as qemu-storage-daemon 7.2's (the table ``QEMU_JSON_ERRORS``, each case taken from the real
  daemon), as does :func:`fleece.qmp.framing.parse_json`.
- Hypothesis: random JSON values (any encoding, fed in random pieces) come back equal; random
  bytes and random JSON never make ``feed()`` raise, and it only ever returns ``Message`` or
  ``ParseError``.
- :func:`fleece.qmp.framing.encode`: one line of JSON and CRLF.
- :func:`fleece.qmp.framing.parse_request`: QEMU's dispatcher errors, word for word (not an
  object, lacks ``execute``, ``execute`` not a string, ``arguments`` not an object, an
  unexpected member, ``exec-oob`` without the capability), and the id echoed in each.
- :mod:`fleece.schema`: missing, unexpected and mistyped arguments named as QEMU names them.
- :func:`fleece.keyval.parse_keyval`: dotted keys, the ``,,`` escape, the implied key of
  ``--object``, duplicate keys, a key both value and object, empty elements, JSON input.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fleece.qmp.framing as framing
from fleece.errors import GenericError
from fleece.keyval import KeyvalError, parse_keyval
from fleece.qmp.framing import (
    BadRequest,
    Event,
    Message,
    ParseError,
    Request,
    Splitter,
    encode,
    parse_request,
)
from fleece.schema import check_arguments

pytestmark = pytest.mark.timeout(60)

CAPS = b'{"execute": "qmp_capabilities"}'
CAPS_VALUE = {"execute": "qmp_capabilities"}

SAMPLES: list[Any] = [
    {"execute": "qmp_capabilities"},
    {"execute": "drive-backup", "id": [1, "two", {"3": None}],
     "arguments": {"device": "virtio0", "sync": "none", "target": "/tmp/a b/pit.qcow2"}},
    {"execute": "x", "arguments": {"s": "{[}]\"\\{\\\"}", "t": "}}}]]]", "u": "\\"}},
    {"a": "\u00e9\u4e2d\U0001f600", "b": "line\nbreak\ttab", "c": -1.5e-3, "d": [True, False]},
    [],
    {},
    [[[[{"deep": [1, [2, [3]]]}]]]],
]


def feed_all(data: bytes, pieces: list[bytes] | None = None) -> list[Event]:
    """Feed ``data`` (or the ``pieces``) to a fresh splitter; every event returned."""
    splitter = Splitter()
    events: list[Event] = []
    for piece in pieces if pieces is not None else [data]:
        events.extend(splitter.feed(piece))
    return events


def messages(events: list[Event]) -> list[Any]:
    return [event.value for event in events if isinstance(event, Message)]


def errors(events: list[Event]) -> list[ParseError]:
    return [event for event in events if isinstance(event, ParseError)]


# -- splitting ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", SAMPLES, ids=range(len(SAMPLES)))
def test_message_split_at_every_byte_boundary(value: Any) -> None:
    data = json.dumps(value).encode()
    for cut in range(len(data) + 1):
        events = feed_all(data, [data[:cut], data[cut:]])
        assert events == [Message(value)], f"cut at {cut}"


def test_message_fed_one_byte_at_a_time_completes_on_its_last_byte() -> None:
    data = json.dumps(SAMPLES[1]).encode()
    splitter = Splitter()
    for index in range(len(data) - 1):
        assert splitter.feed(data[index : index + 1]) == []
    assert splitter.feed(data[-1:]) == [Message(SAMPLES[1])]


def test_values_concatenated_without_separators() -> None:
    values = [v for v in SAMPLES if isinstance(v, dict | list)]
    data = b"".join(json.dumps(v, separators=(",", ":")).encode() for v in values)
    assert messages(feed_all(data)) == values
    assert errors(feed_all(data)) == []
    # and split at every boundary of the whole stream
    for cut in range(0, len(data) + 1, 7):
        assert messages(feed_all(data, [data[:cut], data[cut:]])) == values


@pytest.mark.parametrize("gap", [b"", b" ", b"\n", b"\r\n", b"\t", b" \r\n\t \n\n  "])
def test_whitespace_between_and_inside_values(gap: bytes) -> None:
    spaced = b'{ "execute" :\n "query-version" ,\t"id"\r\n: [ 1 , 2 ] }'
    data = gap + CAPS + gap + spaced + gap + CAPS + gap
    events = feed_all(data)
    assert messages(events) == [CAPS_VALUE, {"execute": "query-version", "id": [1, 2]},
                                CAPS_VALUE]
    assert errors(events) == []


def test_strings_with_braces_and_escapes_do_not_end_the_value() -> None:
    tricky = {"s": '}', "t": "{", "u": "]]", "v": '\\"}', "w": "\\", "x": '"{"'}
    data = json.dumps(tricky).encode() + CAPS
    assert messages(feed_all(data)) == [tricky, CAPS_VALUE]
    for cut in range(len(data) + 1):
        assert messages(feed_all(data, [data[:cut], data[cut:]])) == [tricky, CAPS_VALUE]


def test_escaped_backslash_before_closing_quote() -> None:
    # "a\\" ends the string at the second quote; a naive scanner treats \" as an escape.
    data = b'{"a": "x\\\\"}' + CAPS
    assert messages(feed_all(data)) == [{"a": "x\\"}, CAPS_VALUE]


def test_non_ascii_utf8_split_inside_a_character() -> None:
    data = json.dumps({"name": "disk-\u00e9\u4e2d\U0001f600"}, ensure_ascii=False).encode()
    for cut in range(len(data) + 1):
        assert messages(feed_all(data, [data[:cut], data[cut:]])) == [
            {"name": "disk-\u00e9\u4e2d\U0001f600"}
        ]


@pytest.mark.parametrize("scalar", [b"42", b"-1.5", b"true", b"false", b"null"])
def test_bare_scalar_is_a_message_once_terminated(scalar: bytes) -> None:
    splitter = Splitter()
    assert splitter.feed(scalar) == []  # a number may still go on
    events = splitter.feed(b"\n" + CAPS)
    assert events == [Message(json.loads(scalar)), Message(CAPS_VALUE)]


# -- garbage and recovery -----------------------------------------------------------------------
GARBAGE: dict[str, bytes] = {
    "bare word": b"hello\n",
    "bare word before a brace": b"hello",
    "truncated literal": b"tru\n",
    "lone close brace": b"}",
    "lone close bracket": b"]",
    "extra close brace": b'{"a": 1}}',
    "invalid utf-8 at top level": b"\xff\xfe\n",
    "invalid utf-8 in a string": b'{"execute": "\xc3\x28"}',
    "truncated utf-8 in a string": b'{"execute": "\xe4\xb8"}',
    "bad value inside an object": b'{"execute": nope}',
    "missing colon": b'{"execute" "x"}',
    "trailing comma": b'{"execute": "x",}',
    "mismatched brackets": b'{"a": [1, 2}]',
    "too deep": b"[" * (framing.MAX_DEPTH + 20) + b"]" * (framing.MAX_DEPTH + 20),
}


#: QEMU's words when a value is over one of its limits
LIMIT_ERRORS = ("JSON token size limit exceeded", "JSON token count limit exceeded",
                "JSON nesting depth limit exceeded")


@pytest.mark.parametrize("garbage", list(GARBAGE.values()), ids=list(GARBAGE))
def test_garbage_gives_parse_error_and_the_stream_recovers(garbage: bytes) -> None:
    events = feed_all(garbage + CAPS + b"\n" + CAPS)
    assert errors(events), events
    assert all(e.desc.startswith("JSON parse error, ") or e.desc in LIMIT_ERRORS
               for e in errors(events))
    assert events[-2:] == [Message(CAPS_VALUE), Message(CAPS_VALUE)]
    values = messages(events)
    assert values[-2:] == [CAPS_VALUE, CAPS_VALUE]
    # Whatever else came out is not a command (a leading valid value may, like {"a": 1}).
    assert all(not (isinstance(v, dict) and "execute" in v) for v in values[:-2])


def test_invalid_utf8_error_says_so() -> None:
    events = feed_all(b'{"execute": "\xc3\x28"}')
    assert events == [ParseError("JSON parse error, invalid UTF-8 sequence in string")]


def test_too_deep_error_says_so() -> None:
    deep = framing.MAX_DEPTH + 20
    events = feed_all(b"[" * deep + b"]" * deep + CAPS)
    assert events == [ParseError("JSON nesting depth limit exceeded"), Message(CAPS_VALUE)]


def test_deep_but_allowed_nesting_parses() -> None:
    depth = 200
    events = feed_all(b"[" * depth + b"]" * depth)
    assert len(events) == 1 and isinstance(events[0], Message)


def test_nesting_of_max_depth_parses() -> None:
    depth = framing.MAX_DEPTH
    events = feed_all(b"[" * depth + b"]" * depth)
    assert len(events) == 1 and isinstance(events[0], Message)


def test_nesting_just_over_the_limit_recovers() -> None:
    deep = framing.MAX_DEPTH + 1
    events = feed_all(b"[" * deep + b"]" * deep + b"\n" + CAPS + b"\n" + CAPS)
    assert events == [ParseError("JSON nesting depth limit exceeded"), Message(CAPS_VALUE),
                      Message(CAPS_VALUE)]


def test_overlong_message_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(framing, "MAX_MESSAGE", 64)
    events = feed_all(b'{"execute": "x", "arguments": {"pad": "' + b"A" * 100 + b'"}}\n' + CAPS)
    assert events == [ParseError("JSON token size limit exceeded"), Message(CAPS_VALUE)]


def test_overlong_message_tail_is_not_executed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(framing, "MAX_MESSAGE", 64)
    smuggled = (b'{"execute": "query-version", "arguments": {"pad": "' + b"A" * 100
                + b'", "inner": {"execute": "quit"}}}')
    events = feed_all(smuggled + b"\n" + CAPS)
    assert {"execute": "quit"} not in messages(events)
    assert events == [ParseError("JSON token size limit exceeded"), Message(CAPS_VALUE)]


def test_top_level_string_with_a_brace() -> None:
    events = feed_all(b'"{"\n' + CAPS + b"\n" + CAPS)
    assert events == [Message("{"), Message(CAPS_VALUE), Message(CAPS_VALUE)]


def test_top_level_string_without_spaces_or_braces() -> None:
    assert feed_all(b'"abc"\n' + CAPS) == [Message("abc"), Message(CAPS_VALUE)]


@pytest.mark.parametrize("reset", [b"\x01", b"\xff"], ids=["control", "0xff"])
def test_control_character_resynchronises(reset: bytes) -> None:
    events = feed_all(b'{"execute": "qmp_cap' + reset + CAPS)
    assert len(errors(events)) >= 1
    assert events[-1] == Message(CAPS_VALUE)


def test_incomplete_value_waits_for_more() -> None:
    splitter = Splitter()
    assert splitter.feed(b'{"execute": "qmp_capabilities"') == []
    assert splitter.feed(b"  ") == []
    assert splitter.feed(b"}") == [Message(CAPS_VALUE)]


# -- Hypothesis ---------------------------------------------------------------------------------
#: text QEMU's parser takes: no Unicode noncharacters (U+FFFE, U+FDD0, ...: category Cn),
#: which it refuses
qmp_text = st.text(st.characters(exclude_categories=["Cs", "Cn"]), max_size=20)
json_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63)
                | st.floats(allow_nan=False, allow_infinity=False) | qmp_text)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(qmp_text, children, max_size=5),
    max_leaves=30,
)
containers = st.lists(json_values, max_size=5) | st.dictionaries(
    qmp_text, json_values, max_size=5)


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(containers, min_size=1, max_size=4),
       indent=st.sampled_from([None, 0, 2]),
       ascii_only=st.booleans(),
       gap=st.sampled_from(["", " ", "\n", "\r\n", "\t"]),
       cuts=st.lists(st.integers(0, 4000), max_size=8))
def test_hypothesis_objects_and_arrays_round_trip(values: list[Any], indent: int | None,
                                                  ascii_only: bool, gap: str,
                                                  cuts: list[int]) -> None:
    text = gap.join(json.dumps(v, indent=indent, ensure_ascii=ascii_only) for v in values)
    events = feed_all(b"", _pieces(text.encode(), cuts))
    assert events == [Message(v) for v in values]


def _only_events(events: list[Event]) -> None:
    assert all(isinstance(e, Message | ParseError) for e in events)
    for e in events:
        if isinstance(e, ParseError):
            assert isinstance(e.desc, str) and e.desc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(st.binary(max_size=64), max_size=10))
def test_hypothesis_random_bytes_never_raise(chunks: list[bytes]) -> None:
    splitter = Splitter()
    for chunk in chunks:
        _only_events(splitter.feed(chunk))
    # and a message sent after a newline and a lone '}' eventually gets through or is pending
    _only_events(splitter.feed(b"\n}\n" + CAPS))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(json_values, max_size=5), junk=st.lists(st.binary(max_size=16), max_size=5),
       cuts=st.lists(st.integers(0, 2000), max_size=6))
def test_hypothesis_json_and_junk_never_raise(values: list[Any], junk: list[bytes],
                                              cuts: list[int]) -> None:
    parts: list[bytes] = []
    for index, value in enumerate(values):
        parts.append(json.dumps(value).encode())
        if index < len(junk):
            parts.append(junk[index])
    data = b" ".join(parts)
    splitter = Splitter()
    for piece in _pieces(data, cuts):
        _only_events(splitter.feed(piece))


# -- encode -------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", SAMPLES, ids=range(len(SAMPLES)))
def test_encode_is_one_line_that_splits_back(value: Any) -> None:
    data = encode(value)
    assert data.endswith(b"\r\n")
    assert b"\n" not in data[:-2] and b"\r" not in data[:-2]
    assert json.loads(data) == value
    assert feed_all(data) == [Message(value)]


def test_encode_of_a_reply_matches_qemu_spacing() -> None:
    assert encode({"return": {}, "id": 1}) == b'{"return": {}, "id": 1}\r\n'


# -- parse_request ------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [[1, 2], 42, "query-version", None, True, 1.5])
def test_request_not_an_object(value: Any) -> None:
    assert parse_request(value) == BadRequest("QMP input must be a JSON object", None, False)


@pytest.mark.parametrize(
    ("value", "desc"),
    [
        ({}, "QMP input lacks member 'execute'"),
        ({"id": 7}, "QMP input lacks member 'execute'"),
        ({"arguments": {}}, "QMP input lacks member 'execute'"),
        ({"execute": 1}, "QMP input member 'execute' must be a string"),
        ({"execute": None}, "QMP input member 'execute' must be a string"),
        ({"execute": ["quit"]}, "QMP input member 'execute' must be a string"),
        ({"execute": "quit", "arguments": []}, "QMP input member 'arguments' must be an object"),
        ({"execute": "quit", "arguments": "x"}, "QMP input member 'arguments' must be an object"),
        ({"execute": "quit", "arguments": None},
         "QMP input member 'arguments' must be an object"),
        ({"execute": "quit", "control": 1}, "QMP input member 'control' is unexpected"),
        ({"execute": "quit", "Execute": "x"}, "QMP input member 'Execute' is unexpected"),
    ],
)
def test_request_errors_are_qemus(value: dict[str, Any], desc: str) -> None:
    result = parse_request(value)
    assert isinstance(result, BadRequest)
    assert result.desc == desc
    assert result.has_id == ("id" in value)
    assert result.id == value.get("id")


@pytest.mark.parametrize("value", [
    {"exec-oob": "query-version"},
    {"exec-oob": "query-version", "id": "x"},
    {"execute": "query-version", "exec-oob": "query-version"},
])
def test_exec_oob_is_refused_without_the_capability(value: dict[str, Any]) -> None:
    result = parse_request(value)
    assert isinstance(result, BadRequest)
    assert result.desc.startswith("QMP input member 'exec-oob' is unexpected")
    assert result.has_id == ("id" in value)


@pytest.mark.parametrize("ident", [0, 1.5, "s", {"a": [1]}, [1, "x"], None, True])
def test_request_keeps_any_id(ident: Any) -> None:
    request = parse_request({"execute": "query-version", "id": ident})
    assert request == Request("query-version", {}, ident, True)
    bad = parse_request({"execute": 5, "id": ident})
    assert isinstance(bad, BadRequest) and bad.id == ident and bad.has_id


def test_request_without_id_or_arguments() -> None:
    assert parse_request({"execute": "quit"}) == Request("quit", {}, None, False)
    assert parse_request({"execute": "x", "arguments": {"a": 1}}) == Request(
        "x", {"a": 1}, None, False)


# -- the argument schema ------------------------------------------------------------------------
SCHEMA: dict[str, Any] = {"device": "str", "*speed": "int", "*force": "bool",
                          "*sync": ("full", "none"), "*opts": "object", "*list": "array",
                          "*rate": "number", "*anything": "any"}


@pytest.mark.parametrize(
    ("arguments", "desc"),
    [
        ({}, "Parameter 'device' is missing"),
        ({"device": "d", "bogus": 1}, "Parameter 'bogus' is unexpected"),
        ({"device": 1}, "Invalid parameter type for 'device', expected: string"),
        ({"device": "d", "speed": "1"}, "Invalid parameter type for 'speed', expected: integer"),
        ({"device": "d", "speed": True}, "Invalid parameter type for 'speed', expected: integer"),
        ({"device": "d", "speed": 1.5}, "Invalid parameter type for 'speed', expected: integer"),
        ({"device": "d", "force": "on"}, "Invalid parameter type for 'force', expected: boolean"),
        ({"device": "d", "force": 1}, "Invalid parameter type for 'force', expected: boolean"),
        ({"device": "d", "sync": "top"}, "Parameter 'sync' does not accept value 'top'"),
        ({"device": "d", "opts": []}, "Invalid parameter type for 'opts', expected: object"),
        ({"device": "d", "list": {}}, "Invalid parameter type for 'list', expected: array"),
        ({"device": "d", "rate": "1"}, "Invalid parameter type for 'rate', expected: number"),
    ],
)
def test_schema_errors_name_the_argument(arguments: dict[str, Any], desc: str) -> None:
    with pytest.raises(GenericError) as info:
        check_arguments(SCHEMA, arguments)
    assert info.value.desc == desc


def test_schema_accepts_good_arguments() -> None:
    check_arguments(SCHEMA, {"device": "d", "speed": 0, "force": False, "sync": "none",
                             "opts": {}, "list": [], "rate": 1, "anything": None})
    check_arguments(SCHEMA, {"device": "d", "rate": 2.5})
    check_arguments(None, {"whatever": object()})


def test_schema_reports_missing_before_unexpected() -> None:
    with pytest.raises(GenericError) as info:
        check_arguments(SCHEMA, {"bogus": 1})
    assert info.value.desc == "Parameter 'device' is missing"


# -- keyval -------------------------------------------------------------------------------------
def test_keyval_dotted_keys_nest() -> None:
    assert parse_keyval(
        "driver=qcow2,node-name=disk0,file.driver=file,file.filename=d.qcow2,"
        "file.x.y.z=deep"
    ) == {"driver": "qcow2", "node-name": "disk0",
          "file": {"driver": "file", "filename": "d.qcow2", "x": {"y": {"z": "deep"}}}}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("file=a,,b", "a,b"),
        ("file=,,", ","),
        ("file=a,,,,b", "a,,b"),
        ("file=,,a,,", ",a,"),
        ("file=a=b", "a=b"),
        ("file=", ""),
        ("file=/tmp/x y", "/tmp/x y"),
    ],
)
def test_keyval_values(text: str, value: str) -> None:
    assert parse_keyval(text) == {"file": value}


def test_keyval_comma_escape_then_more_keys() -> None:
    assert parse_keyval("id=v,file=/a,,b.qcow2,format=qcow2") == {
        "id": "v", "file": "/a,b.qcow2", "format": "qcow2"}


def test_keyval_values_stay_strings() -> None:
    assert parse_keyval("size=1024,writable=on,n.x=1") == {
        "size": "1024", "writable": "on", "n": {"x": "1"}}


def test_keyval_implied_key_for_object() -> None:
    assert parse_keyval("tls-creds-x509,id=tls0,dir=/certs,endpoint=server", "qom-type") == {
        "qom-type": "tls-creds-x509", "id": "tls0", "dir": "/certs", "endpoint": "server"}


def test_keyval_implied_key_only_first() -> None:
    with pytest.raises(KeyvalError):
        parse_keyval("id=tls0,tls-creds-x509", "qom-type")


def test_keyval_implied_key_given_twice_the_last_wins() -> None:
    # As qemu-storage-daemon's keyval: a repeated key is not an error, the last value wins.
    assert parse_keyval("tls-creds-x509,qom-type=other", "qom-type") == {"qom-type": "other"}


@pytest.mark.parametrize("text", ["nokey", "a=1,nokey"])
def test_keyval_element_without_equals_and_nothing_implied(text: str) -> None:
    with pytest.raises(KeyvalError, match="="):
        parse_keyval(text)


@pytest.mark.parametrize(("text", "parsed"), [
    ("a=1,a=2", {"a": "2"}),
    ("a.b=1,a.b=2", {"a": {"b": "2"}}),
    ("x=1,a.b=1,y=2,a.b=3", {"x": "1", "a": {"b": "3"}, "y": "2"}),
])
def test_keyval_repeated_keys_the_last_wins(text: str, parsed: dict[str, object]) -> None:
    assert parse_keyval(text) == parsed


@pytest.mark.parametrize("text", ["a=1,a.b=2", "a.b=2,a=1", "a.b=1,a.b.c=2"])
def test_keyval_key_both_value_and_object(text: str) -> None:
    with pytest.raises(KeyvalError):
        parse_keyval(text)


@pytest.mark.parametrize("text", [",a=1", "=x", "a..b=1", ".a=1", "a.=1"])
def test_keyval_empty_keys(text: str) -> None:
    with pytest.raises(KeyvalError):
        parse_keyval(text)


@pytest.mark.parametrize(("text", "parsed"), [
    ("", {}), ("a=1,", {"a": "1"}), ("a=1,,", {"a": "1,"}),
])
def test_keyval_empty_text_and_a_trailing_comma_are_accepted(
    text: str, parsed: dict[str, object]
) -> None:
    # As qemu-storage-daemon's keyval; "a=1,," is the value "1," (an escaped comma).
    assert parse_keyval(text) == parsed


def test_keyval_json_input() -> None:
    text = '{"driver": "qcow2", "node-name": "d", "file": {"driver": "file", "filename": "x"}, ' \
           '"read-only": true, "cache": {"direct": false}}'
    assert parse_keyval(text) == json.loads(text)
    assert parse_keyval('{"a": 1}', "qom-type") == {"a": 1}
    # Only text starting with "{" is JSON, as in QEMU: with a space first it is key=value.
    with pytest.raises(KeyvalError):
        parse_keyval('  {"a": 1}')


@pytest.mark.parametrize("text", ["{bad", '{"a": }', "{", '{"a": 1} trailing'])
def test_keyval_invalid_json(text: str) -> None:
    with pytest.raises(KeyvalError, match="JSON"):
        parse_keyval(text)


def test_keyval_json_must_be_an_object() -> None:
    # text that starts with '{' is JSON; a JSON array or scalar is never an option string
    with pytest.raises(KeyvalError):
        parse_keyval("[1, 2]")
    with pytest.raises(KeyvalError):
        parse_keyval("{}x")


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(
    st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True),
    st.text(st.characters(codec="utf-8"), max_size=12),
    min_size=1, max_size=6))
def test_hypothesis_keyval_round_trip(options: dict[str, str]) -> None:
    text = ",".join(f"{k}={v.replace(',', ',,')}" for k, v in options.items())
    if text.startswith("{"):
        return
    assert parse_keyval(text) == options


# -- QEMU's JSON errors, word for word ------------------------------------------------------------
#: input, then every error qemu-storage-daemon 7.2 answers for it (taken from the real daemon)
QEMU_JSON_ERRORS: list[tuple[bytes, list[str]]] = [
    (b'{"execute": "query-version", }', ["JSON parse error, expecting value"]),
    (b'{"execute": "query-version", "x": nope}', ["JSON parse error, invalid keyword 'nope'"]),
    (b'{"execute": query-version}', ["JSON parse error, stray '-v'",
                                     "JSON parse error, expecting value"]),
    (b'{"execute" "query-version"}', ["JSON parse error, missing : in object pair"]),
    (b"[}", ["JSON parse error, expecting value"]),
    (b"]\n", ["JSON parse error, expecting value"]),
    (b'{"a": 1, "a": 2}', ["JSON parse error, duplicate key"]),
    (b'{"execute": "x\\u1"}', ['JSON parse error, \\u1" is not a valid Unicode character']),
    (b'{"execute": "\\uFFFE"}', ["JSON parse error, \\uFFFE is not a valid Unicode character"]),
    (b'{"execute": "\xef\xbf\xbe"}', ["JSON parse error, invalid UTF-8 sequence in string"]),
    (b'"ab\x00cd"', ["JSON parse error, stray '\"ab'"]),
    (b'{"a" }', ["JSON parse error, missing : in object pair"]),
    (b"{1: 2}", ["JSON parse error, key is not a string in object"]),
    (b'{"a": 1 "b"}', ["JSON parse error, expected separator in dict"]),
    (b"[1 2]", ["JSON parse error, expected separator in list"]),
    (b"True\n", ["JSON parse error, stray 'T'"]),
    (b'{"a": -}', ["JSON parse error, stray '-}'"]),
    (b'{"a": 01}', ["JSON parse error, stray '01'", "JSON parse error, expecting value"]),
    (b'{"a": 1.}', ["JSON parse error, stray '1.}'"]),
    (b'{"a": "\\x"}', ["JSON parse error, invalid escape sequence in string"]),
    (b'{"a": "\\ud800"}', ["JSON parse error, \\ud800 is not a valid Unicode character"]),
    (b'{"a": "\\ud800\\u0041"}', ["JSON parse error, \\ud800 is not a valid Unicode character"]),
    (b"\xc3\x28\n", ["JSON parse error, stray '\ufffd'"]),
    (b'{"execute": "qmp_cap\x01', ["JSON parse error, stray '\"qmp_cap\x01'"]),
    (b"hello\n", ["JSON parse error, invalid keyword 'hello'"]),
]


@pytest.mark.parametrize(("data", "descs"), QEMU_JSON_ERRORS,
                         ids=[repr(d[:20]) for d, _ in QEMU_JSON_ERRORS])
def test_json_errors_are_qemus_word_for_word(data: bytes, descs: list[str]) -> None:
    events = feed_all(data + b"\n" + CAPS)
    assert events == [*(ParseError(desc) for desc in descs), Message(CAPS_VALUE)]


@pytest.mark.parametrize(("data", "value"), [
    (b"{'execute': 'query-version'}", {"execute": "query-version"}),
    (b"""{'a': "it's", "b": 'say "hi"', 'c': '\\''}""", {"a": "it's", "b": 'say "hi"', "c": "'"}),
    (b'{"id": 99999999999999999999999}', {"id": 1e23}),
    (b'{"id": 18446744073709551615, "n": -9223372036854775808}',
     {"id": 2**64 - 1, "n": -(2**63)}),
    (b'{"s": "\\u00e9\\ud83d\\ude00\xe4\xb8\xad"}', {"s": "\u00e9\U0001f600\u4e2d"}),
    (b'{"s": "\\u0000"}', {"s": "\x00"}),
])
def test_qemu_json_extensions_and_numbers(data: bytes, value: Any) -> None:
    assert feed_all(data) == [Message(value)]
    assert type(messages(feed_all(data))[0].get("id", 0)) is type(value.get("id", 0))


@pytest.mark.parametrize(("text", "desc"), [
    ("{bad", "JSON parse error, invalid keyword 'bad'"),
    ('{"a": 1', "JSON parse error, premature EOI"),
    ('{"a": "x', "JSON parse error, stray '\"x'"),
    ('{"a": 1} {"b": 2}', "Expecting at most one JSON value"),
    ("", "Expecting a JSON value"),
    ("   ", "Expecting a JSON value"),
])
def test_parse_json_errors(text: str, desc: str) -> None:
    with pytest.raises(framing.JSONError) as info:
        framing.parse_json(text)
    assert info.value.desc == desc


def test_parse_json_values() -> None:
    assert framing.parse_json('{"a": [1, 2.5, true, null]}') == {"a": [1, 2.5, True, None]}
    assert framing.parse_json("42") == 42
    assert framing.parse_json("'x'") == "x"
