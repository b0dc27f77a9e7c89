"""QMP framing, sans-I/O: bytes in, parsed messages (or parse errors) out.

QEMU's monitor reads a stream of JSON values with no framing at all: a value ends where its
outermost brace or bracket closes, whitespace and newlines between values are ignored. This
splitter does the same with a small scanner that tracks nesting and strings, so it never waits
for a newline and never needs the whole stream. A value that is not JSON, and stray bytes between
values, become :class:`ParseError` events; the stream goes on after them, as QEMU's does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

#: the largest message accepted; larger input is dropped with an error (QEMU caps it too)
MAX_MESSAGE = 16 << 20
#: deeper nesting than this is refused (QEMU's limit is 1024; json.loads recurses per level and
#: Python's default recursion limit is 1000, so fleece stays well below it)
MAX_DEPTH = 512


@dataclass(frozen=True)
class Message:
    """One complete JSON value received."""

    value: Any


@dataclass(frozen=True)
class ParseError:
    """Input that is not a JSON value; ``desc`` is QEMU-style text for a ``GenericError``."""

    desc: str


Event = Message | ParseError

_WHITESPACE = b" \t\r\n"


class Splitter:
    """Feed bytes with :meth:`feed`; it returns the messages (and errors) they complete."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._overflow = False
        self._recovering = False

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        for byte in data:
            self._step(byte, events)
        return events

    def _step(self, byte: int, events: list[Event]) -> None:
        invalid = (byte < 0x20 and byte not in _WHITESPACE) or byte >= 0xFE
        if self._recovering:
            # After a stray byte, skip to a promising point, as QEMU's lexer does: a bracket
            # or brace, or another byte that can never be JSON.
            if not invalid and byte not in b"[]{}":
                return
            self._recovering = False
        if invalid:
            # Never valid in JSON text: the QMP spec's way to force the parser back into a
            # known-good state (a client recovering from half a command sends one).
            self._reset()
            self._overflow = False
            self._recovering = True
            events.append(ParseError("JSON parse error, stray character"))
            return
        if self._overflow:
            # Skip to the end of the oversized value, then resume.
            self._track(byte)
            if self._depth == 0 and not self._in_string:
                self._overflow = False
            return
        if self._depth == 0 and not self._in_string and not self._buf:
            if byte in _WHITESPACE:
                return
            if byte not in b'{["':
                self._buf.append(byte)
                self._depth = -1  # a bare token: it runs to the next whitespace or bracket
                return
        if self._depth == -1:
            if byte in _WHITESPACE or byte in b"{[":
                events.append(self._bare_token())
                if byte in b"{[":
                    self._step(byte, events)
                return
            self._buf.append(byte)
            if len(self._buf) > 1024:
                events.append(self._bare_token())
            return
        self._buf.append(byte)
        self._track(byte)
        if len(self._buf) > MAX_MESSAGE or self._depth > MAX_DEPTH:
            desc = "message too long" if len(self._buf) > MAX_MESSAGE else "nesting too deep"
            self._buf = bytearray()  # keep the depth and string state: skip to the value's end
            self._overflow = self._depth > 0 or self._in_string
            events.append(ParseError(f"JSON parse error, {desc}"))
            return
        if self._depth == 0 and not self._in_string:
            events.append(self._decode(bytes(self._buf)))
            self._reset()

    def _track(self, byte: int) -> None:
        if self._in_string:
            if self._escape:
                self._escape = False
            elif byte == 0x5C:  # backslash
                self._escape = True
            elif byte == 0x22:  # quote
                self._in_string = False
            return
        if byte == 0x22:
            self._in_string = True
        elif byte in b"{[":
            self._depth += 1
        elif byte in b"}]":
            self._depth -= 1

    def _reset(self) -> None:
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False

    def _bare_token(self) -> Event:
        text = bytes(self._buf)
        self._reset()
        return self._decode(text)

    @staticmethod
    def _decode(text: bytes) -> Event:
        try:
            return Message(json.loads(text.decode("utf-8")))
        except UnicodeDecodeError:
            return ParseError("JSON parse error, invalid UTF-8 sequence in string")
        except (ValueError, RecursionError) as exc:
            token = text[:32].decode("utf-8", "replace")
            return ParseError(f"JSON parse error, {_describe(exc)} near '{token}'")


def _describe(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return exc.msg.lower()
    return "invalid input"


def encode(value: Any) -> bytes:
    """One QMP message as QEMU sends it: compact JSON and a CRLF."""
    return json.dumps(value, separators=(", ", ": ")).encode() + b"\r\n"


@dataclass(frozen=True)
class Request:
    """A well-formed command: ``execute``, its ``arguments`` and the ``id`` to echo."""

    command: str
    arguments: dict[str, Any]
    id: Any
    has_id: bool


@dataclass(frozen=True)
class BadRequest:
    """A JSON value that is not a QMP command; answered with ``GenericError`` and ``id``."""

    desc: str
    id: Any
    has_id: bool


def parse_request(value: Any) -> Request | BadRequest:
    """Check a received value the way QEMU's dispatcher does."""
    if not isinstance(value, dict):
        return BadRequest("QMP input must be a JSON object", None, False)
    has_id = "id" in value
    ident = value.get("id")
    for key in value:
        if key not in ("execute", "exec-oob", "arguments", "id"):
            return BadRequest(f"QMP input member '{key}' is unexpected", ident, has_id)
    if "exec-oob" in value:
        return BadRequest("QMP input member 'exec-oob' is unexpected: out-of-band execution "
                          "was not negotiated", ident, has_id)
    if "execute" not in value:
        return BadRequest("QMP input lacks member 'execute'", ident, has_id)
    command = value["execute"]
    if not isinstance(command, str):
        return BadRequest("QMP input member 'execute' must be a string", ident, has_id)
    arguments = value.get("arguments", {})
    if not isinstance(arguments, dict):
        return BadRequest("QMP input member 'arguments' must be an object", ident, has_id)
    return Request(command, arguments, ident, has_id)
