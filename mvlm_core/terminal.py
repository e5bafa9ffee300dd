"""Stored text made safe to print on a terminal.

Labels, device names, cpu_info, model names and metric keys come from files a user imports (llama-bench output,
``mvlm bench --json-file`` reports) or from options. Printed raw, an ESC or OSC sequence in them would drive the
terminal (retitle it, clear it, hide text). :func:`visible` shows every control character as an escape instead
(``\\x1b``, ``\\n``, ``\\u202e``), so what is printed is what is stored, readable. JSON output keeps the exact strings
(JSON escapes control characters anyway); only what goes to a terminal passes through here.
"""

from __future__ import annotations

import re

# C0 controls, DEL, C1 controls (0x9b is a one-byte CSI), and the bidirectional overrides that reorder text on screen
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


_CONTROL_IN_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_MARKUP = re.compile(r"(\\*)(\[[a-z#/@][^[]*?])")


def _escape(m: re.Match[str]) -> str:
    o = ord(m[0])
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def visible(text: object, *, markup: bool = False, lines: bool = False) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``). ``markup=True``: also escape rich
    markup (``[red]``), for strings printed through a rich console or table with markup on. ``lines=True``: line
    breaks and tabs stay as they are (a log's tail)."""
    s = (_CONTROL_IN_LINES if lines else _CONTROL).sub(_escape, str(text))
    if markup:  # rich.markup.escape's rule (mvlm_core does not import rich): a tag-like "[" gets a backslash
        s = _MARKUP.sub(lambda m: f"{m[1]}{m[1]}\\{m[2]}", s)
        if s.endswith("\\") and not s.endswith("\\\\"):
            s += "\\"
    return s
