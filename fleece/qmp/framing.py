"""QMP framing, sans-I/O: bytes in, parsed messages (or parse errors) out, as QEMU 7.2 reads them.

QEMU's monitor reads a stream of JSON values with no framing at all. Its reader is three layers,
and this module has the same three, so that every error reads word for word as QEMU's:

- a **lexer** (a state table, QEMU's ``json-lexer.c``) turns bytes into tokens. A byte that
  cannot continue a token is a lexical error ("JSON parse error, stray '...'"), after which the
  lexer skips to a promising point: a structural character, a line ending, another control
  character or a 0xFE/0xFF byte (the QMP spec's way for a client to resynchronise);
- a **streamer** (``json-streamer.c``) counts braces and brackets and hands the tokens of one
  value to the parser as soon as the counts come back to zero (or below);
- a **parser** (``json-parser.c``) builds the value or reports the first syntax error ("JSON
  parse error, expecting value", "... missing : in object pair", "... duplicate key", ...).

Deliberate differences: a value over :data:`MAX_MESSAGE` bytes of tokens or nested deeper than
:data:`MAX_DEPTH` is reported once ("JSON token size limit exceeded", "JSON nesting depth limit
exceeded"), then the rest of that value is skipped; QEMU parses its tail as new values, one error
per stray bracket, and would execute a command smuggled inside. The size limit is 16 MiB, QEMU's
64 MiB.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

#: the most token bytes one value may hold; beyond it the value is refused and skipped
MAX_MESSAGE = 16 << 20
#: QEMU's limit on the tokens of one value
MAX_TOKENS = 2 << 20
#: QEMU's nesting limit (braces plus brackets open at once)
MAX_DEPTH = 1024


@dataclass(frozen=True)
class Message:
    """One complete JSON value received."""

    value: Any


@dataclass(frozen=True)
class ParseError:
    """Input that is not a JSON value; ``desc`` is QEMU's text for the ``GenericError``."""

    desc: str


Event = Message | ParseError


class JSONError(ValueError):
    """Text that is not one JSON value; ``desc`` is QEMU's words ("JSON parse error, ...")."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


# -- the lexer's table ----------------------------------------------------------------------------
# States below _TOKEN are lexer states; _TOKEN and up are the token types it emits. _LOOKAHEAD
# marks a transition that does not consume the byte (it is fed again in the next state).
(_ERROR, _RECOVERY, _DQ_ESCAPE, _DQ, _SQ_ESCAPE, _SQ, _ZERO, _EXP_DIGITS, _EXP_SIGN, _EXP_E,
 _MANTISSA, _MANTISSA_DIGITS, _DIGITS, _SIGN, _KEYWORD_STATE, _START) = range(16)
_TOKEN = 0x40
(LCURLY, RCURLY, LSQUARE, RSQUARE, COLON, COMMA, INTEGER, FLOAT, KEYWORD, STRING) = range(
    _TOKEN, _TOKEN + 10)
_LOOKAHEAD = 0x80


def _build_table() -> list[bytes]:
    table = [bytearray(256) for _ in range(_START + 1)]  # every byte defaults to _ERROR

    def fill(state: int, chars: bytes | range, target: int) -> None:
        for char in chars:
            table[state][char] = target

    def terminal(state: int, token: int) -> None:
        fill(state, range(256), token | _LOOKAHEAD)

    fill(_RECOVERY, range(0x20, 0xFE), _RECOVERY)
    fill(_RECOVERY, range(0x20), _START | _LOOKAHEAD)
    fill(_RECOVERY, b"\xfe\xff[]{}:,", _START | _LOOKAHEAD)
    fill(_RECOVERY, b"\t", _RECOVERY)
    for escape, string, quote in ((_DQ_ESCAPE, _DQ, b'"'), (_SQ_ESCAPE, _SQ, b"'")):
        fill(escape, range(0x20, 0xFE), string)
        fill(string, range(0x20, 0xFE), string)
        fill(string, b"\\", escape)
        fill(string, quote, STRING)
    terminal(_ZERO, INTEGER)
    fill(_ZERO, b"0123456789", _ERROR)
    fill(_ZERO, b".", _MANTISSA)
    terminal(_EXP_DIGITS, FLOAT)
    fill(_EXP_DIGITS, b"0123456789", _EXP_DIGITS)
    fill(_EXP_SIGN, b"0123456789", _EXP_DIGITS)
    fill(_EXP_E, b"-+", _EXP_SIGN)
    fill(_EXP_E, b"0123456789", _EXP_DIGITS)
    terminal(_MANTISSA_DIGITS, FLOAT)
    fill(_MANTISSA_DIGITS, b"0123456789", _MANTISSA_DIGITS)
    fill(_MANTISSA_DIGITS, b"eE", _EXP_E)
    fill(_MANTISSA, b"0123456789", _MANTISSA_DIGITS)
    terminal(_DIGITS, INTEGER)
    fill(_DIGITS, b"0123456789", _DIGITS)
    fill(_DIGITS, b"eE", _EXP_E)
    fill(_DIGITS, b".", _MANTISSA)
    fill(_SIGN, b"0", _ZERO)
    fill(_SIGN, b"123456789", _DIGITS)
    terminal(_KEYWORD_STATE, KEYWORD)
    fill(_KEYWORD_STATE, bytes(range(ord("a"), ord("z") + 1)), _KEYWORD_STATE)
    for char, target in ((b'"', _DQ), (b"'", _SQ), (b"0", _ZERO), (b"-", _SIGN), (b"{", LCURLY),
                         (b"}", RCURLY), (b"[", LSQUARE), (b"]", RSQUARE), (b",", COMMA),
                         (b":", COLON), (b" \t\r\n", _START)):
        fill(_START, char, target)
    fill(_START, b"123456789", _DIGITS)
    fill(_START, bytes(range(ord("a"), ord("z") + 1)), _KEYWORD_STATE)
    return [bytes(row) for row in table]


_TABLE = _build_table()
#: a run of bytes that continues a string (anything but its quote, a backslash, a control
#: character, 0xFE or 0xFF)
_DQ_RUN = re.compile(rb'[^\x00-\x1f"\\\xfe\xff]+')
_SQ_RUN = re.compile(rb"[^\x00-\x1f'\\\xfe\xff]+")
_RECOVERY_RUN = re.compile(rb"[^\x00-\x08\x0a-\x1f\xfe\xff\[\]{}:,]+")


@dataclass(frozen=True)
class _Token:
    type: int
    text: bytes


class Splitter:
    """Feed bytes with :meth:`feed`; it returns the messages (and errors) they complete."""

    def __init__(self) -> None:
        self._state = _START
        self._text = bytearray()  # the token being lexed
        self._tokens: list[_Token] = []
        self._size = 0  # bytes of the tokens held
        self._braces = 0
        self._brackets = 0
        self._skipping = False  # a value over a limit: its tokens are dropped to its end
        self._events: list[Event] = []

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        self._events = events
        view = bytes(data)
        index, end = 0, len(view)
        while index < end:
            state = self._state
            if state in (_DQ, _SQ, _RECOVERY):  # skip whole runs, not byte by byte
                run = (_DQ_RUN if state == _DQ else _SQ_RUN if state == _SQ
                       else _RECOVERY_RUN).match(view, index)
                if run is not None:
                    if state != _RECOVERY and not self._skipping:
                        self._text += run.group()
                        if self._size + len(self._text) + 1 > MAX_MESSAGE:
                            self._limit("JSON token size limit exceeded", in_token=True)
                    index = run.end()
                    continue
            self._lex(view[index])
            index += 1
        self._events = []
        return events

    @property
    def pending(self) -> int:
        """Bytes held for the value being read (its tokens so far)."""
        return self._size + len(self._text)

    def flush(self) -> list[Event]:
        """The end of the input (QEMU's ``json_message_parser_flush``): a pending token ends,
        and the tokens held are parsed as they are."""
        events: list[Event] = []
        self._events = events
        while self._state != _START:
            target = _TABLE[self._state][0] & ~_LOOKAHEAD
            self._step(target)
        if self._tokens and not self._skipping:
            self._parse()
        self._events = []
        return events

    # -- the lexer ---------------------------------------------------------------------------
    def _lex(self, char: int) -> None:
        while True:
            target = _TABLE[self._state][char]
            consumed = not target & _LOOKAHEAD
            target &= ~_LOOKAHEAD
            if consumed and not (self._skipping and target in (_DQ, _SQ)):
                self._text.append(char)
            self._step(target)
            if consumed:
                return

    def _step(self, target: int) -> None:
        if target >= _TOKEN:
            self._token(target, bytes(self._text))
            self._text.clear()
            self._state = _START
        elif target == _START:
            self._text.clear()
            self._state = _START
        elif target == _ERROR:
            self._stray(bytes(self._text))
            self._text.clear()
            self._state = _RECOVERY
        else:
            if target == _RECOVERY:
                self._text.clear()
            self._state = target

    # -- the streamer ------------------------------------------------------------------------
    def _stray(self, text: bytes) -> None:
        text = text.split(b"\0", 1)[0]  # QEMU prints the token as a C string
        self._emit(ParseError(f"JSON parse error, stray '{text.decode('utf-8', 'replace')}'"))

    def _emit(self, event: Event) -> None:
        self._tokens = []
        self._size = 0
        self._braces = self._brackets = 0
        self._skipping = False
        self._events.append(event)

    def _limit(self, desc: str, *, in_token: bool = False) -> None:
        """Refuse the value being read (``in_token``: in the middle of one of its tokens) and
        skip the rest of it."""
        braces, brackets = self._braces, self._brackets
        self._emit(ParseError(desc))
        self._braces, self._brackets = braces, brackets
        self._skipping = in_token or braces > 0 or brackets > 0
        self._text.clear()

    def _token(self, kind: int, text: bytes) -> None:
        if kind == LCURLY:
            self._braces += 1
        elif kind == RCURLY:
            self._braces -= 1
        elif kind == LSQUARE:
            self._brackets += 1
        elif kind == RSQUARE:
            self._brackets -= 1
        if self._skipping:
            if not (self._braces > 0 or self._brackets > 0):
                self._braces = self._brackets = 0
                self._skipping = False
            return
        if self._size + len(text) + 1 > MAX_MESSAGE:
            self._limit("JSON token size limit exceeded")
            return
        if len(self._tokens) + 1 > MAX_TOKENS:
            self._limit("JSON token count limit exceeded")
            return
        if self._braces + self._brackets > MAX_DEPTH:
            self._limit("JSON nesting depth limit exceeded")
            return
        self._tokens.append(_Token(kind, text))
        self._size += len(text)
        if (self._braces > 0 or self._brackets > 0) and self._braces >= 0 and self._brackets >= 0:
            return
        self._parse()

    def _parse(self) -> None:
        try:
            event: Event = Message(_parse(self._tokens))
        except JSONError as exc:
            event = ParseError(exc.desc)
        self._emit(event)


# -- the parser -----------------------------------------------------------------------------------
_KEYWORDS: dict[bytes, Any] = {b"true": True, b"false": False, b"null": None}


def _error(message: str) -> JSONError:
    return JSONError(f"JSON parse error, {message}")


def _parse(tokens: list[_Token]) -> Any:
    """The value ``tokens`` spell, or ``JSONError`` with the first syntax error QEMU's recursive
    parser reports. Iterative: nesting goes to :data:`MAX_DEPTH` levels, deeper than Python's
    recursion allows."""
    position = 0
    # the open containers: [list] or [dict, the key read (None while the key is awaited)]
    stack: list[list[Any]] = []

    def pop() -> _Token:
        nonlocal position
        if position >= len(tokens):
            raise _error("premature EOI")
        position += 1
        return tokens[position - 1]

    while True:
        token = pop()  # a value: a scalar, an empty container, or one that opens
        value: Any
        if token.type in (LCURLY, LSQUARE):
            closer = RCURLY if token.type == LCURLY else RSQUARE
            if position >= len(tokens):
                raise _error("premature EOI")
            if tokens[position].type != closer:
                stack.append([{}, None] if token.type == LCURLY else [[]])
                continue
            position += 1
            value = {} if token.type == LCURLY else []
        elif token.type == STRING:
            value = _string(token.text)
        elif token.type == INTEGER:
            value = _integer(token.text)
        elif token.type == FLOAT:
            value = float(token.text)
        elif token.type == KEYWORD:
            if token.text not in _KEYWORDS:
                raise _error(f"invalid keyword '{token.text.decode()}'")
            value = _KEYWORDS[token.text]
        else:
            raise _error("expecting value")
        while stack:  # hand the value to its container; close those it completes
            frame = stack[-1]
            container = frame[0]
            if isinstance(container, list):
                container.append(value)
                token = pop()
                if token.type == COMMA:
                    break
                if token.type != RSQUARE:
                    raise _error("expected separator in list")
            elif frame[1] is None:
                if not isinstance(value, str):
                    raise _error("key is not a string in object")
                if pop().type != COLON:
                    raise _error("missing : in object pair")
                frame[1] = value
                break
            else:
                if frame[1] in container:
                    raise _error("duplicate key")
                container[frame[1]] = value
                frame[1] = None
                token = pop()
                if token.type == COMMA:
                    break
                if token.type != RCURLY:
                    raise _error("expected separator in dict")
            stack.pop()
            value = container
        else:
            return value


def _integer(text: bytes) -> int | float:
    """QEMU keeps an integer as int64 or uint64 if it fits, else as a double."""
    number = int(text)
    if -(1 << 63) <= number < (1 << 64):
        return number
    return float(text)


def _valid_codepoint(cp: int) -> bool:
    """QEMU's test: in Unicode's range, not a surrogate, not a noncharacter."""
    return (0 <= cp <= 0x10FFFF and not 0xD800 <= cp <= 0xDFFF and not 0xFDD0 <= cp <= 0xFDEF
            and (cp & 0xFFFE) != 0xFFFE)


_MIN_CODEPOINT = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)
_ESCAPES = {ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/", ord("b"): "\b",
            ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t"}
#: runs of bytes a string holds as they are (printable ASCII but its quote and the backslash)
_PLAIN_DQ = re.compile(rb"[\x20\x21\x23-\x5b\x5d-\x7f]+")
_PLAIN_SQ = re.compile(rb"[\x20-\x26\x28-\x5b\x5d-\x7f]+")


def _hex4(text: bytes, at: int) -> int:
    digits = text[at:at + 4]
    if len(digits) < 4 or not all(chr(d) in "0123456789abcdefABCDEF" for d in digits):
        return -1
    return int(digits, 16)


def _utf8(text: bytes, at: int) -> tuple[int, int]:
    """QEMU's ``mod_utf8_codepoint``: the code point at ``at`` (-1 if invalid) and where the
    next one starts. ``\\xC0\\x80`` is U+0000, every other overlong form is invalid."""
    byte = text[at]
    at += 1
    if byte < 0x80:
        return byte, at
    if byte >= 0xFE or not byte & 0x40:
        return -1, at
    length, mask = 0, 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    for _ in range(1, length):
        following = text[at] if at < len(text) else 0
        if following & 0xC0 != 0x80:
            return -1, at
        at += 1
        cp = cp << 6 | following & 0x3F
    if not _valid_codepoint(cp) or (cp < _MIN_CODEPOINT[length - 2]
                                    and not (cp == 0 and length == 2)):
        return -1, at
    return cp, at


def _string(token: bytes) -> str:
    """A string token (quotes included) decoded as QEMU's ``parse_string`` does."""
    quote = token[0]
    out: list[str] = []
    at = 1
    plain_run = _PLAIN_DQ if quote == 0x22 else _PLAIN_SQ
    while token[at] != quote:
        plain = plain_run.match(token, at)
        if plain is not None:
            out.append(plain.group().decode("ascii"))
            at = plain.end()
            continue
        byte = token[at]
        if byte == 0x5C:  # backslash
            begin = at
            escape = token[at + 1]
            at += 2
            if escape in _ESCAPES:
                out.append(_ESCAPES[escape])
                continue
            if escape != ord("u"):
                raise _error("invalid escape sequence in string")
            cp = _hex4(token, at)
            at += 4
            if 0xD800 <= cp <= 0xDBFF and token[at:at + 2] == b"\\u":
                trailing = _hex4(token, at + 2)
                if 0xDC00 <= trailing <= 0xDFFF:
                    cp = 0x10000 + ((cp & 0x3FF) << 10) | (trailing & 0x3FF)
                    at += 6
                else:
                    cp = -1
            if not _valid_codepoint(cp):
                shown = token[begin:at].split(b"\0", 1)[0].decode("utf-8", "replace")
                raise _error(f"{shown} is not a valid Unicode character")
            out.append(chr(cp))
            continue
        cp, at = _utf8(token, at)
        if cp < 0:
            raise _error("invalid UTF-8 sequence in string")
        out.append(chr(cp))
    return "".join(out)


def parse_json(text: str | bytes) -> Any:
    """One JSON value, read as QEMU reads a JSON option string (``qobject_from_json``, single
    quotes allowed); ``JSONError`` with QEMU's words when ``text`` is anything else."""
    splitter = Splitter()
    data = text.encode() if isinstance(text, str) else text
    events = splitter.feed(data.split(b"\0", 1)[0]) + splitter.flush()
    if not events:
        raise JSONError("Expecting a JSON value")
    first = events[0]
    if isinstance(first, ParseError):
        raise JSONError(first.desc)
    if len(events) > 1:
        raise JSONError("Expecting at most one JSON value")
    return first.value


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
