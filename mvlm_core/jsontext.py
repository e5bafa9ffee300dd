"""JSON from files and devices that mvlm did not necessarily write, read so that nothing in it can raise later.

``json.loads`` accepts text that later breaks whoever uses the result: nesting a few thousand levels deep (a
RecursionError in the parser or in any recursive walk), a lone surrogate escape (``"\\ud800"``: valid JSON, but no
UTF-8 encoding exists, so SQLite, a terminal or a file write fails on it), integers beyond 64 bits (SQLite's INTEGER
overflows, ``float()`` of one raises OverflowError) and ``NaN``/``Infinity`` (not JSON; Python reads them anyway).
:func:`loads` refuses each with a :class:`JsonError` whose message says what is wrong.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 200  # an mvlm report nests ~6 levels, a llama-bench row 2
INT_LIMIT = 1 << 63  # SQLite's INTEGER range
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class JsonError(ValueError):
    """Text that is not JSON, or JSON mvlm refuses to keep; the message says which."""


class NotJson(JsonError):
    """Text that does not parse as (one) JSON value."""


def _int(text: str) -> int:
    n = int(text)
    if not -INT_LIMIT <= n < INT_LIMIT:
        raise JsonError(f"it holds the integer {text[:24]}{'...' if len(text) > 24 else ''}, beyond 64 bits")
    return n


def _float(text: str) -> float:
    f = float(text)
    if f in (float("inf"), float("-inf")):
        raise JsonError(f"it holds the number {text[:24]}, beyond any float (read as infinity)")
    return f


def _constant(name: str) -> float:
    raise JsonError(f"it holds {name}, which is not JSON (mvlm writes null for a value it lacks)")


def loads(data: str | bytes) -> Any:
    """``data`` parsed as JSON, or JsonError: not JSON, nested deeper than MAX_DEPTH, a lone surrogate, an integer
    beyond 64 bits, NaN or Infinity."""
    try:
        obj = json.loads(data, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise JsonError(f"it nests deeper than {MAX_DEPTH} levels") from None
    except JsonError:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise NotJson(f"it is not JSON ({e})") from None
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    stack: list[tuple[Any, int]] = [(obj, 1)]
    check_text = bool(_SURROGATE_ESCAPE.search(raw))
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise JsonError(f"it nests deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            if check_text:
                for k in node:
                    _text(k)
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, (dict, list, str)))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, (dict, list, str)))
        elif check_text:
            _text(node)
    return obj


def _text(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise JsonError(f"it holds text that is not valid Unicode (a lone surrogate in {s[:30]!r})") from None
