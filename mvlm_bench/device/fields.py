"""Checks shared by the device profile fields of every kind: a table's keys and types, a number's range."""

from __future__ import annotations

from typing import Any

from mvlm_core.errors import MvlmError

TYPE_WORDS = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "a table"}


def bounded(where: str, name: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        shown = str(value) if abs(value) < 10**24 else f"a {value.bit_length()}-bit number"
        raise MvlmError(f"{where}: field '{name}' = {shown} is out of range: give a whole number from {lo} to {hi}")


def check_table(data: dict[str, Any], schema: dict[str, type], where: str, prefix: str) -> None:
    for key, value in data.items():
        if key not in schema:
            raise MvlmError(f"{where}: unknown field '{prefix}{key}'; known fields: {', '.join(schema)}")
        want = schema[key]
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if not ok:
            raise MvlmError(f"{where}: field '{prefix}{key}' must be {TYPE_WORDS[want]}, not {value!r}")
