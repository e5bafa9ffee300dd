"""Reading llama.cpp output as text: decoding (UTF-8, PowerShell's UTF-16), chunked streaming, line splitting with a
length cap, colour codes and control bytes removed, ``--log-jsonl`` records unwrapped; printf numbers in any locale.

The parsers (:mod:`mvlm_bench.records.timings`, :mod:`mvlm_bench.records.llama_bench_output`) stream: a file is read
in chunks and split into lines, and only what a parser needs is kept, so time grows linearly with the input and memory
does not grow with it at all.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Iterator
from typing import IO

# --- numbers ------------------------------------------------------------------------------------------------------
# A printf %f number in any locale, or one of the spellings of infinity / not-a-number that C runtimes print.
NUMBER = r"[-+]?(?:\d+(?:[.,]\d+)?(?:#(?:INF|QNAN|SNAN|IND)\d*)?|inf(?:inity)?|nan(?:\([^)]*\))?)"


def parse_number(s: str | None) -> float | None:
    """printf text → float; inf/nan come back as float('inf')/float('nan'); garbage → None."""
    if s is None:
        return None
    t = s.strip().lower()
    if "#" in t:  # MSVC: 1.#INF, 1.#QNAN, -1.#IND
        return float("-inf" if t.startswith("-") and "inf" in t else "inf") if "inf" in t else float("nan")
    if t.startswith(("nan", "-nan", "+nan")):
        return float("nan")
    try:
        return float(t.replace(",", "."))
    except ValueError:
        return None


# --- reading and line cleaning ----------------------------------------------------------------------------------
# The parser streams: a file is read in chunks and split into lines, and only what the parser needs is kept (the
# current and the last complete perf block, running sums of the image lines, bounded llama-bench candidates), so
# time grows linearly with the input and memory does not grow with it at all.
MAX_LINE_CHARS = 1 << 16  # a longer line keeps its last 64 Ki characters (where a glued timing line would be)
MAX_JSON_CHARS = 8 << 20  # a llama-bench -o json array larger than this is not looked for
MAX_BENCH_ROWS = 4096  # llama-bench rows kept per format (the last ones; the count is kept too)
READ_CHUNK = 1 << 18
# No pattern below may backtrack over a line (an unterminated OSC sequence is bounded; see also _PERF).
ANSI_CODES = re.compile(r"\x1b(?:\[[0-9;?]{0,64}[ -/]{0,8}[@-~]|\][^\x07\x1b]{0,512}(?:\x07|\x1b\\)|[@-Z\\-_])")
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
LINE_ENDS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")  # what str.splitlines splits on


def decode(data: bytes) -> str:
    """Bytes → text. UTF-16 with BOM is what Windows PowerShell's ``>`` writes; everything else as UTF-8."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.decode("utf-8", errors="replace")


def text_chunks(text: str) -> Iterator[str]:
    for i in range(0, len(text), READ_CHUNK):
        yield text[i : i + READ_CHUNK]


def file_chunks(f: IO[bytes]) -> Iterator[str]:
    """Decoded text of a binary stream, chunk by chunk (the encoding chosen from the first bytes, as ``decode``)."""
    data = f.read(READ_CHUNK)
    while 0 < len(data) < 3:  # a pipe may give fewer bytes than asked: the BOM needs 2 or 3
        more = f.read(READ_CHUNK)
        if not more:
            break
        data += more
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        enc = "utf-16"
    elif data.startswith(b"\xef\xbb\xbf"):
        enc, data = "utf-8", data[3:]
    else:
        enc = "utf-8"
    dec = codecs.getincrementaldecoder(enc)(errors="replace")
    while data:
        yield dec.decode(data)
        data = f.read(READ_CHUNK)
    yield dec.decode(b"", final=True)


def split_lines(chunks: Iterable[str], max_chars: int = MAX_LINE_CHARS) -> Iterator[str]:
    """The lines of the text (split as ``str.splitlines`` splits), each cut to its last ``max_chars`` characters."""
    pending = ""
    for chunk in chunks:
        buf = pending + chunk
        if not buf:
            continue
        lines = buf.splitlines()
        last = buf[-1]
        if last == "\r":  # maybe the first half of a CRLF: wait for the next chunk
            pending = (lines.pop() if lines else "") + "\r"
        elif last in LINE_ENDS:
            pending = ""
        else:
            pending = lines.pop()
        for line in lines:
            yield line if len(line) <= max_chars else line[-max_chars:]
        if len(pending) > max_chars + 1:
            pending = pending[-(max_chars + 1) :]
    for line in pending.splitlines():
        yield line[-max_chars:]


class LineCleaner:
    """Colour codes and control bytes removed; ``--log-jsonl`` records unwrapped into their message lines."""

    def __init__(self) -> None:
        self.nonblank = False  # any non-whitespace in the raw text ("empty input" otherwise)

    def lines(self, raw_lines: Iterable[str]) -> Iterator[str]:
        for raw in raw_lines:
            if not self.nonblank and raw.strip():
                self.nonblank = True
            line = CONTROL_CHARS.sub("", ANSI_CODES.sub("", raw) if "\x1b" in raw else raw)
            s = line.strip()
            if s.startswith("{") and '"msg"' in s:
                try:
                    obj = json.loads(s)
                except ValueError:
                    obj = None
                if isinstance(obj, dict) and isinstance(obj.get("msg"), str):
                    for x in obj["msg"].splitlines():
                        yield CONTROL_CHARS.sub("", x)
                    continue
            yield line


