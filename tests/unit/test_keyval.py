"""QEMU's key=value syntax, its JSON dialect and the typed visit (fleece.keyval). The words are
checked against qemu-storage-daemon itself in tests/interop/test_daemon_cli_words.py."""

from __future__ import annotations

from typing import Any

import pytest

from fleece.daemon_schema import BLOCKDEV, EXPORT, NBD_SERVER
from fleece.keyval import (
    KeyvalError,
    c_integer,
    parse_json_object,
    parse_keyval,
    parse_option,
    visit,
)


@pytest.mark.parametrize(("text", "implied", "expected"), [
    ("file,node-name=f,filename=x", "driver",
     {"driver": "file", "node-name": "f", "filename": "x"}),
    ("driver=qcow2,file.driver=file,file.filename=d.qcow2", "driver",
     {"driver": "qcow2", "file": {"driver": "file", "filename": "d.qcow2"}}),
    ("filename=a,,b,,,x=1", None, {"filename": "a,b,", "x": "1"}),
    ("a,,b,x=1", "driver", {"driver": "a", "x": "1"}),  # fails later: ',' starts a key
    ("b.1=y,b.0=x", None, {"b": ["x", "y"]}),
    ("b.0.node=n,b.0.name=m", None, {"b": [{"node": "n", "name": "m"}]}),
    ("x=1,x=2", None, {"x": "2"}),
    ("x=1,", None, {"x": "1"}),
    ("", "driver", {}),
    ("x=a=b", None, {"x": "a=b"}),
])
def test_parse_keyval(text: str, implied: str | None, expected: dict[str, Any]) -> None:
    if text == "a,,b,x=1":
        with pytest.raises(KeyvalError, match=r"^Invalid parameter ''$"):
            parse_keyval(text, implied)
        return
    assert parse_keyval(text, implied) == expected


@pytest.mark.parametrize(("text", "message"), [
    (",x=1", "Invalid parameter ''"),
    ("a..b=1", "Invalid parameter 'a..b'"),
    ("_x=1", "Invalid parameter '_x'"),
    ("x=1,foo", "Expected '=' after parameter 'foo'"),
    ("a=1,a.b=2", "Parameters 'a.*' used inconsistently"),
    ("a.b=2,a=1", "Parameters 'a.*' used inconsistently"),
    ("a.0=1,a.x=2", "Parameters 'a.*' used inconsistently"),
    ("a.1=1", "Parameter 'a.0' missing"),
    ("help", "Help is not available for this option"),
    ("x." + "b" * 128 + "=1", f"Parameter fragment '{'b' * 128}' is too long"),
])
def test_parse_keyval_errors(text: str, message: str) -> None:
    with pytest.raises(KeyvalError) as info:
        parse_keyval(text)
    assert str(info.value) == message


@pytest.mark.parametrize(("text", "message"), [
    ('{"a":1,}', "JSON parse error, expecting value"),
    ('{"a":1', "JSON parse error, premature EOI"),
    ('{"a": f}', "JSON parse error, invalid keyword 'f'"),
    ('{"a" 1}', "JSON parse error, missing : in object pair"),
    ('{"a":1 "b":2}', "JSON parse error, expected separator in dict"),
    ('{"a":[1 2]}', "JSON parse error, expected separator in array"),
    ('{"a":1} x', "Expecting at most one JSON value"),
    ('{"a":"\\q"}', "JSON parse error, invalid escape sequence in string"),
])
def test_json_errors(text: str, message: str) -> None:
    with pytest.raises(KeyvalError) as info:
        parse_json_object(text)
    assert str(info.value) == message


def test_json_dialect() -> None:
    assert parse_json_object("{'a': 'b\\'c', \"n\": -5, \"f\": 1.5, \"l\": [true, null]}") == {
        "a": "b'c", "n": -5, "f": 1.5, "l": [True, None]}
    assert parse_option('{"driver": "x"}') == ({"driver": "x"}, False)
    assert parse_option(' {"driver": "x"}', "driver") == ({"driver": ' {"driver": "x"}'}, True)


@pytest.mark.parametrize(("text", "unsigned", "value"), [
    ("10", False, 10), ("0x10", False, 16), ("010", False, 8), ("-5", False, -5),
    (" 7", False, 7), ("9223372036854775807", False, 2**63 - 1),
    ("9223372036854775808", False, None), ("1M", False, None), ("", False, None),
    ("-1", True, 2**64 - 1), ("18446744073709551616", True, None), ("0x", False, None),
    ("08", False, None),
])
def test_c_integer(text: str, unsigned: bool, value: int | None) -> None:
    assert c_integer(text, unsigned) == value


def _blockdev(text: str) -> Any:
    tree, keyval = parse_option(text, "driver")
    return visit(BLOCKDEV, tree, keyval=keyval)


def test_visit_converts_keyval_strings() -> None:
    assert _blockdev("raw,node-name=r,read-only=on,offset=0x200,file.driver=file,"
                     "file.filename=x,file.cache.direct=off") == {
        "driver": "raw", "node-name": "r", "read-only": True, "offset": 512,
        "file": {"driver": "file", "filename": "x", "cache": {"direct": False}}}
    assert _blockdev("raw,node-name=r,file=other") == {"driver": "raw", "node-name": "r",
                                                       "file": "other"}
    assert _blockdev('{"driver": "qcow2", "file": "f", "backing": null}') == {
        "driver": "qcow2", "file": "f", "backing": None}


@pytest.mark.parametrize(("text", "message"), [
    ("file", "Parameter 'filename' is missing"),
    ("qcow2,file.driver=file", "Parameter 'file.filename' is missing"),
    ("file,filename=x,read-only=1", "Parameter 'read-only' expects 'on' or 'off'"),
    ("file,filename=x,cache.direct=onn", "Parameter 'cache.direct' expects 'on' or 'off'"),
    ("file,filename=x,bogus=1", "Parameter 'bogus' is unexpected"),
    ("qcow2,file.driver=file,file.filename=x,file.bogus=1", "Parameter 'file.bogus' is unexpected"),
    ("file,filename=x,aio=no", "Parameter 'aio' does not accept value 'no'"),
    ("qcow2,file.driver=file,file.filename=x,file.aio=no",
     "Parameter 'aio' does not accept value 'no'"),  # QEMU names an enum by its own name
    ("file,filename.x=1", "Parameters 'filename.*' are unexpected"),
    ("file,filename=x,cache=on", "Invalid parameter type for 'cache', expected: object"),
    ("raw,file=f,offset=1M", "Parameter 'offset' expects integer"),
    ("blkdebug,image=i,max-transfer=0x80000000", "Parameter 'max-transfer' expects int32_t"),
    ("nosuch", "Parameter 'driver' does not accept value 'nosuch'"),
    ("ssh", "Driver 'ssh' is not supported by fleece (it has blkdebug, copy-before-write, file, "
            "nbd, null-co, qcow2, raw, snapshot-access)"),
    ("nbd,export=e", "Parameter 'server' is missing"),
    ('{"driver": "file", "filename": "x", "read-only": "on"}',
     "Invalid parameter type for 'read-only', expected: boolean"),
    ('{"driver": "raw", "file": 5}', "Invalid parameter type for 'file', expected: BlockdevRef"),
    ('{"driver": "raw", "file": null}', "Invalid parameter type for 'file', expected: BlockdevRef"),
    ('{"driver": "null-co", "size": "1"}', "Invalid parameter type for 'size', expected: integer"),
])
def test_visit_errors(text: str, message: str) -> None:
    with pytest.raises(KeyvalError) as info:
        _blockdev(text)
    assert str(info.value) == message


def test_visit_lists_and_ranges() -> None:
    tree, _ = parse_option("nbd,id=e,node-name=n,bitmaps.0=a,bitmaps.1.node=n,bitmaps.1.name=b",
                           "type")
    assert visit(EXPORT, tree, keyval=True)["bitmaps"] == ["a", {"node": "n", "name": "b"}]
    tree, _ = parse_option('{"type": "nbd", "id": "e", "node-name": "n", "bitmaps": [1]}')
    with pytest.raises(KeyvalError, match=r"^Invalid parameter type for 'bitmaps\[0\]', "
                                          r"expected: BlockDirtyBitmapOrStr$"):
        visit(EXPORT, tree, keyval=False)
    for value, message in (("4294967296", "Parameter 'max-connections' expects uint32_t"),
                           ("-1", "Parameter 'max-connections' expects uint32_t"),
                           ("x", "Parameter 'max-connections' expects integer")):
        tree, _ = parse_option(f"addr.type=unix,addr.path=p,max-connections={value}")
        with pytest.raises(KeyvalError) as info:
            visit(NBD_SERVER, tree, keyval=True)
        assert str(info.value) == message
    tree, _ = parse_option("addr.type=unix,addr.path=p,max-connections=4294967295")
    assert visit(NBD_SERVER, tree, keyval=True)["max-connections"] == 2**32 - 1
    with pytest.raises(KeyvalError, match=r"^Export type 'fuse' is not supported by fleece"):
        visit(EXPORT, parse_keyval("fuse,id=e,node-name=n", "type"), keyval=True)
