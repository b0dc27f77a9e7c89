"""QEMU's dotted ``key=value`` option syntax, and JSON, turned into nested dicts.

``driver=qcow2,node-name=disk0,file.driver=file,file.filename=d.qcow2`` becomes
``{"driver": "qcow2", "node-name": "disk0", "file": {"driver": "file", "filename": "d.qcow2"}}``.
A comma inside a value is written twice (``,,``). Values stay strings, as QEMU's keyval parser
leaves them; the option readers accept ``on``/``off`` and digit strings where they want booleans
and integers. Text starting with ``{`` is JSON.
"""

from __future__ import annotations

import json
from typing import Any


class KeyvalError(ValueError):
    """The text is not a valid option string; the message says where."""


def _split(text: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def parse_keyval(text: str, implied_key: str | None = None) -> dict[str, Any]:
    """Parse ``text``; a first element without ``=`` is the value of ``implied_key``.

    Raises :class:`KeyvalError` for an empty key, a key given twice, a key that is both a value
    and an object, or a first element without ``=`` when nothing is implied.
    """
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise KeyvalError(f"invalid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise KeyvalError("JSON options must be an object")
        return value
    result: dict[str, Any] = {}
    for index, part in enumerate(_split(text)):
        if not part:
            raise KeyvalError(f"empty element in '{text}'")
        if "=" not in part:
            if index == 0 and implied_key is not None:
                key, value = implied_key, part
            else:
                raise KeyvalError(f"no '=' in '{part}' (expected key=value)")
        else:
            key, value = part.split("=", 1)
        _store(result, key, value, text)
    return result


def _store(result: dict[str, Any], key: str, value: str, text: str) -> None:
    names = key.split(".")
    if any(not name for name in names):
        raise KeyvalError(f"invalid key '{key}'")
    node = result
    for name in names[:-1]:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise KeyvalError(f"'{name}' is both a value and an object in '{text}'")
        node = child
    last = names[-1]
    if last in node:
        raise KeyvalError(f"'{key}' given twice")
    node[last] = value
