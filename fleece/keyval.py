"""QEMU's option syntax (``key=value,...`` and JSON) and its schema check, in QEMU's words.

Two steps, as in qemu-storage-daemon:

1. **Syntax.** :func:`parse_keyval` is QEMU's ``keyval_parse``: ``driver=qcow2,file.driver=file``
   becomes ``{"driver": "qcow2", "file": {"driver": "file"}}``; a first element without ``=`` is
   the value of the implied key (``--blockdev file,...`` means ``driver=file``); ``,,`` is a
   comma inside a value; numeric key fragments make lists (``bitmaps.0=a,bitmaps.1=b``); a key
   given twice keeps its last value. Leaves are strings. Text whose first character is ``{`` is
   JSON instead (:func:`parse_json_object`, QEMU's dialect: single-quoted strings too).
2. **Types.** :func:`visit` walks a value against a QAPI-like type (:class:`Struct`,
   :class:`Union`, :class:`Enum`, :class:`Alternate`, :class:`ListOf`, scalars) and returns it
   typed. From key=value text it converts strings the way QEMU's keyval visitor does (booleans
   only ``on``/``off`` and their aliases, integers in C syntax with range checks); from JSON it
   demands JSON types. Unknown and missing members are refused.

Every error is a :class:`KeyvalError` whose message is the one qemu-storage-daemon 7.2 prints
for the same input (``Parameter 'writable' expects 'on' or 'off'``, ``Parameter 'file.filename'
is missing``, ``Parameters 'a.*' used inconsistently``, ``JSON parse error, expecting value``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class KeyvalError(ValueError):
    """The option text is malformed or does not fit the schema; ``str()`` is QEMU's message."""


# -- key=value syntax ------------------------------------------------------------------------

_QAPI_NAME = re.compile(r"(?:__[A-Za-z0-9.-]+_)?[A-Za-z][A-Za-z0-9_-]*")
_HELP = ("help", "?")
_MAX_FRAGMENT = 127


def _fragment_length(text: str, start: int, first: bool) -> int:
    """Length of the key fragment at ``start``: a list index (not first) or a QAPI name."""
    if not first and start < len(text) and text[start].isdigit():
        end = start
        while end < len(text) and text[end] in "0123456789":
            end += 1
        return end - start
    match = _QAPI_NAME.match(text, start)
    return 0 if match is None else match.end() - start


def _put(cur: dict[str, Any], name: str, value: str | None, key: str, upto: int) -> Any:
    old = cur.get(name)
    if old is not None:
        if isinstance(old, str) != (value is not None):
            raise KeyvalError(f"Parameters '{key[:upto]}.*' used inconsistently")
        if value is None:
            return old
    new: Any = {} if value is None else value
    cur[name] = new
    return new


def _parse_one(result: dict[str, Any], params: str, pos: int,
               implied_key: str | None) -> int:
    """Parse one ``key=value`` at ``pos``; returns the position of the next one."""
    length = 0
    while pos + length < len(params) and params[pos + length] not in "=,":
        length += 1
    key, key_end = params[pos:pos + length], length
    implied_value: str | None = None
    if length and (pos + length == len(params) or params[pos + length] != "="):
        if key in _HELP:
            raise KeyvalError("Help is not available for this option")
        if implied_key is not None:
            implied_value = key
            key, key_end = implied_key, len(implied_key)
    if implied_value is None:
        key = params[pos:]
    cur = result
    start = 0
    previous: str | None = None
    while True:
        size = _fragment_length(key, start, start == 0)
        size = min(size, key_end - start)
        if not size or (start + size < key_end and key[start + size] != "."):
            raise KeyvalError(f"Invalid parameter '{key[:key_end]}'")
        if size > _MAX_FRAGMENT:
            whole = start == 0 and start + size == key_end
            raise KeyvalError(f"Parameter{'' if whole else ' fragment'} "
                              f"'{key[start:start + size]}' is too long")
        if previous is not None:
            cur = _put(cur, previous, None, key, start - 1)
        previous = key[start:start + size]
        start += size
        if start >= key_end or key[start] != ".":
            break
        start += 1
    assert previous is not None
    if implied_value is not None:
        _put(cur, previous, implied_value, key, key_end)
        end = pos + length
        return end + 1 if end < len(params) and params[end] == "," else end
    if start >= len(key) or key[start] != "=":
        raise KeyvalError(f"Expected '=' after parameter '{key[:start]}'")
    i = pos + start + 1
    value: list[str] = []
    while i < len(params):
        ch = params[i]
        if ch == ",":
            i += 1
            if i >= len(params) or params[i] != ",":
                break
        value.append(params[i])
        i += 1
    _put(cur, previous, "".join(value), key, key_end)
    return i


def _listify(cur: dict[str, Any], path: list[str]) -> Any:
    has_index = has_member = False
    for name, value in list(cur.items()):
        if name[:1].isdigit():
            has_index = True
        else:
            has_member = True
        if isinstance(value, dict):
            cur[name] = _listify(value, [*path, name])
    prefix = "".join(f"{part}." for part in path)
    if has_index and has_member:
        raise KeyvalError(f"Parameters '{prefix}*' used inconsistently")
    if not has_index:
        return cur
    by_index: dict[int, Any] = {}
    for name, value in cur.items():
        by_index.setdefault(min(int(name), 2**31 - 1), value)
    for index in range(max(by_index) + 1):
        if index not in by_index:
            raise KeyvalError(f"Parameter '{prefix}{index}' missing")
    return [by_index[index] for index in range(len(by_index))]


def parse_keyval(text: str, implied_key: str | None = None) -> dict[str, Any]:
    """QEMU's ``keyval_parse``: nested dicts (and lists) of strings; text whose first character
    is ``{`` is read as JSON instead (typed values, see :func:`parse_option`).
    Raises :class:`KeyvalError`."""
    if text.startswith("{"):
        return parse_json_object(text)
    result: dict[str, Any] = {}
    pos = 0
    while pos < len(text):
        pos = _parse_one(result, text, pos, implied_key)
        implied_key = None
    _listify(result, [])
    return result


# -- QEMU's JSON dialect -----------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<space>[ \t\n\r]+)
  | (?P<op>[{}\[\]:,])
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<num>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
""", re.VERBOSE)
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n",
            "r": "\r", "t": "\t"}


class _JSON:
    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if match is None:
                if text[pos] in "\"'":
                    raise KeyvalError("JSON parse error, premature EOI")
                raise KeyvalError("JSON parse error, invalid input")
            kind = match.lastgroup
            assert kind is not None
            if kind != "space":
                self.tokens.append((kind, match.group()))
            pos = match.end()
        self.pos = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise KeyvalError("JSON parse error, premature EOI")
        self.pos += 1
        return token

    def value(self) -> Any:
        kind, text = self.take()
        if kind == "op" and text == "{":
            return self.obj()
        if kind == "op" and text == "[":
            return self.array()
        if kind == "str":
            return _unescape(text)
        if kind == "num":
            return float(text) if any(c in text for c in ".eE") else int(text)
        if kind == "word":
            keywords: dict[str, Any] = {"true": True, "false": False, "null": None}
            if text in keywords:
                return keywords[text]
            raise KeyvalError(f"JSON parse error, invalid keyword '{text}'")
        raise KeyvalError("JSON parse error, expecting value")

    def obj(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        if self.peek() == ("op", "}"):
            self.pos += 1
            return result
        while True:
            kind, text = self.take()
            if kind != "str":
                if kind == "op" and text in ",}]:":
                    raise KeyvalError("JSON parse error, expecting value")
                raise KeyvalError("JSON parse error, key is not a string in object")
            if self.take() != ("op", ":"):
                raise KeyvalError("JSON parse error, missing : in object pair")
            result[_unescape(text)] = self.value()
            token = self.take()
            if token == ("op", "}"):
                return result
            if token != ("op", ","):
                raise KeyvalError("JSON parse error, expected separator in dict")

    def array(self) -> list[Any]:
        result: list[Any] = []
        if self.peek() == ("op", "]"):
            self.pos += 1
            return result
        while True:
            result.append(self.value())
            token = self.take()
            if token == ("op", "]"):
                return result
            if token != ("op", ","):
                raise KeyvalError("JSON parse error, expected separator in array")


def _unescape(token: str) -> str:
    out: list[str] = []
    i = 1
    while i < len(token) - 1:
        ch = token[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        code = token[i + 1]
        if code == "u":
            digits = token[i + 2:i + 6]
            if len(digits) != 4 or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise KeyvalError("JSON parse error, invalid hex escape sequence in string")
            out.append(chr(int(digits, 16)))
            i += 6
        elif code in _ESCAPES:
            out.append(_ESCAPES[code])
            i += 2
        else:
            raise KeyvalError("JSON parse error, invalid escape sequence in string")
    return "".join(out)


def parse_json_object(text: str) -> dict[str, Any]:
    """One JSON object in QEMU's dialect; :class:`KeyvalError` with QEMU's parse errors."""
    parser = _JSON(text)
    value = parser.value()
    if parser.peek() is not None:
        raise KeyvalError("Expecting at most one JSON value")
    if not isinstance(value, dict):
        raise KeyvalError("JSON parse error, expecting value")
    return value


def parse_option(text: str, implied_key: str | None = None) -> tuple[dict[str, Any], bool]:
    """QEMU's ``qobject_input_visitor_new_str``: ``(tree, from_keyval)``; JSON when the text
    starts with ``{``, else key=value."""
    if text.startswith("{"):
        return parse_json_object(text), False
    return parse_keyval(text, implied_key), True


# -- types -----------------------------------------------------------------------------------

class QType:
    """A QAPI type that :func:`visit` checks a value against."""


@dataclass(frozen=True)
class Scalar(QType):
    """``str``, ``bool``, ``number``, ``any``, or an integer: ``int`` (int64), ``uint64`` or a
    sized ``int8``..``uint32`` (range-checked as QEMU's ``visit_type_intN``)."""

    kind: str


@dataclass(frozen=True)
class Enum(QType):
    values: tuple[str, ...]


@dataclass(frozen=True)
class ListOf(QType):
    element: QType


@dataclass(frozen=True)
class Member:
    name: str
    type: QType
    optional: bool = False


@dataclass(frozen=True)
class Struct(QType):
    members: tuple[Member, ...]


@dataclass(frozen=True)
class Union(QType):
    """A flat union: ``base`` members (one of them the ``discriminator`` enum), then the
    members of the branch the discriminator picks. A value in ``unsupported`` is valid for
    QEMU but not here: visiting it raises ``KeyvalError(unsupported[value])``."""

    base: tuple[Member, ...]
    discriminator: str
    branches: Mapping[str, tuple[Member, ...]]
    unsupported: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Alternate(QType):
    """A string (a reference), an object of type ``struct``, or (``null_ok``) JSON null."""

    name: str
    struct: QType
    null_ok: bool = False


STR, BOOL, INT, UINT64, NUMBER, ANY = (Scalar(k) for k in
                                       ("str", "bool", "int", "uint64", "number", "any"))
_SIZED = {"int8": (-2**7, 2**7 - 1, "int8_t"), "int16": (-2**15, 2**15 - 1, "int16_t"),
          "int32": (-2**31, 2**31 - 1, "int32_t"), "uint8": (0, 2**8 - 1, "uint8_t"),
          "uint16": (0, 2**16 - 1, "uint16_t"), "uint32": (0, 2**32 - 1, "uint32_t")}
_TRUE, _FALSE = ("on", "yes", "true", "y"), ("off", "no", "false", "n")


def c_integer(text: str, unsigned: bool) -> int | None:
    """``qemu_strtoi64`` / ``qemu_strtou64`` with base 0 and nothing after the number: the
    value (an unsigned negative wraps, as ``strtoull`` does), or None when invalid or out of
    range."""
    body = text.lstrip(" \t\n\v\f\r")
    negative = body[:1] == "-"
    if body[:1] in "+-" and body:
        body = body[1:]
    if body[:2].lower() == "0x" and len(body) > 2:
        digits, base = body[2:], 16
    elif body[:1] == "0" and len(body) > 1:
        digits, base = body[1:], 8
    else:
        digits, base = body, 10
    allowed = "0123456789abcdefABCDEF"[:base + (6 if base == 16 else 0)]
    if not digits or any(c not in allowed for c in digits):
        return None
    value = int(digits, base)
    if unsigned:
        if value > 2**64 - 1:
            return None
        return (2**64 - value) % 2**64 if negative else value
    value = -value if negative else value
    return value if -2**63 <= value < 2**63 else None


class _Path:
    """Where the visitor is, for QEMU's full parameter names (``file.filename``, ``a.0`` from
    key=value text, ``a[0]`` from JSON)."""

    def __init__(self, keyval: bool) -> None:
        self.keyval = keyval
        self.parts: list[str | int] = []

    def full(self, name: str | int | None = None) -> str:
        text = ""
        for part in [*self.parts, *([] if name is None else [name])]:
            if isinstance(part, int):
                text += f".{part}" if self.keyval else f"[{part}]"
            else:
                text += f".{part}" if text else part
        return text or "<anonymous>"


def visit(qtype: QType, value: Any, *, keyval: bool) -> Any:
    """Check ``value`` (from :func:`parse_option`) against ``qtype``; returns it typed.
    Raises :class:`KeyvalError` with QEMU's message for the first problem QEMU would find."""
    return _visit(qtype, value, None, _Path(keyval))


def _visit(qtype: QType, value: Any, name: str | int | None, path: _Path) -> Any:
    full = path.full(name)
    plain = name if isinstance(name, str) else "null"
    if isinstance(qtype, Struct | Union):
        if not isinstance(value, dict):
            raise KeyvalError(f"Invalid parameter type for '{full}', expected: object")
        return _visit_struct(qtype, value, name, path)
    if isinstance(qtype, ListOf):
        if not isinstance(value, list):
            raise KeyvalError(f"Invalid parameter type for '{full}', expected: array")
        if name is not None:
            path.parts.append(name)
        try:
            return [_visit(qtype.element, item, index, path) for index, item in enumerate(value)]
        finally:
            if name is not None:
                path.parts.pop()
    if isinstance(qtype, Alternate):
        if isinstance(value, str):
            return value
        if isinstance(value, dict):
            return _visit(qtype.struct, value, name, path)
        if value is None and qtype.null_ok and not path.keyval:
            return None
        raise KeyvalError(f"Invalid parameter type for '{full}', expected: {qtype.name}")
    if path.keyval and isinstance(value, dict | list):
        raise KeyvalError(f"Parameters '{full}.*' are unexpected")
    if isinstance(qtype, Enum):
        if not isinstance(value, str):
            raise KeyvalError(f"Invalid parameter type for '{full}', expected: string")
        if value not in qtype.values:
            raise KeyvalError(f"Parameter '{plain}' does not accept value '{value}'")
        return value
    assert isinstance(qtype, Scalar)
    return _visit_scalar(qtype.kind, value, full, plain, path.keyval)


def _visit_scalar(kind: str, value: Any, full: str, plain: str, keyval: bool) -> Any:
    if kind == "any":
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise KeyvalError(f"Invalid parameter type for '{full}', expected: string")
        return value
    if kind == "bool":
        if keyval:
            if value in _TRUE or value in _FALSE:
                return value in _TRUE
            raise KeyvalError(f"Parameter '{full}' expects 'on' or 'off'")
        if not isinstance(value, bool):
            raise KeyvalError(f"Invalid parameter type for '{full}', expected: boolean")
        return value
    if kind == "number":
        if keyval:
            try:
                return float(value)
            except ValueError:
                raise KeyvalError(f"Parameter '{full}' expects number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise KeyvalError(f"Invalid parameter type for '{full}', expected: number")
        return value
    unsigned = kind.startswith("u")
    number: int | None
    if keyval:
        number = c_integer(value, unsigned)
        if number is None:
            raise KeyvalError(f"Parameter '{full}' expects integer")
    else:
        number = value if isinstance(value, int) and not isinstance(value, bool) else None
        if unsigned:
            if number is None or not -2**63 <= number < 2**64:
                raise KeyvalError(f"Parameter '{full}' expects uint64")
            number %= 2**64
        elif number is None or not -2**63 <= number < 2**63:
            raise KeyvalError(f"Invalid parameter type for '{full}', expected: integer")
    if kind in _SIZED:
        low, high, c_name = _SIZED[kind]
        if not low <= number <= high:
            raise KeyvalError(f"Parameter '{plain}' expects {c_name}")
    return number


def _visit_members(members: tuple[Member, ...], value: dict[str, Any], out: dict[str, Any],
                   path: _Path) -> None:
    for member in members:
        if member.name not in value:
            if not member.optional:
                raise KeyvalError(f"Parameter '{path.full(member.name)}' is missing")
            continue
        out[member.name] = _visit(member.type, value[member.name], member.name, path)


def _visit_struct(qtype: Struct | Union, value: dict[str, Any], name: str | int | None,
                  path: _Path) -> dict[str, Any]:
    if name is not None:
        path.parts.append(name)
    try:
        out: dict[str, Any] = {}
        if isinstance(qtype, Struct):
            _visit_members(qtype.members, value, out, path)
        else:
            _visit_members(qtype.base, value, out, path)
            branch = out[qtype.discriminator]
            if branch in qtype.unsupported:
                raise KeyvalError(qtype.unsupported[branch])
            _visit_members(qtype.branches.get(branch, ()), value, out, path)
        for key in value:
            if key not in out:
                raise KeyvalError(f"Parameter '{path.full(key)}' is unexpected")
        return out
    finally:
        if name is not None:
            path.parts.pop()
