"""llama-bench's output in every format it writes (md, csv, json, jsonl, sql), one dict per test row keyed by its JSON
field names (:func:`parse_llama_bench`); streamed, bounded (the last ``MAX_BENCH_ROWS`` rows of a table are kept for
display; an import reads every row, up to ``IMPORT_MAX_ROWS``, and is told how many there were)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
from collections import deque
from pathlib import Path
from typing import Any

from mvlm_bench.records.log_text import (
    LineCleaner,
    decode,
    file_chunks,
    parse_number,
    split_lines,
    text_chunks,
)

MAX_JSON_CHARS = 8 << 20  # a llama-bench -o json array larger than this is not looked for
MAX_BENCH_ROWS = 4096  # llama-bench rows kept per format for display (the last ones; the count is kept too)
IMPORT_MAX_ROWS = 100_000  # rows one import stores; a file with more is refused, never cut
IMPORT_MAX_JSON_CHARS = 256 << 20

# --- llama-bench --------------------------------------------------------------------------------------------------
# Markdown column titles → llama-bench's JSON/CSV field names (llama-bench abbreviates some in its md printer).
_MD_NAMES = {
    "model": "model_type",
    "size": "model_size",
    "params": "model_n_params",
    "backend": "backends",
    "ngl": "n_gpu_layers",
    "threads": "n_threads",
    "sm": "split_mode",
    "nkvo": "no_kv_offload",
    "fa": "flash_attn",
    "lm": "load_mode",
    "mmap": "use_mmap",
    "embd": "embeddings",
    "nopo": "no_op_offload",
    "noh": "no_host",
    "rpk": "repack",
    "dev": "devices",
    "ts": "tensor_split",
    "ot": "tensor_buft_overrides",
    "fitt": "fit_target",
    "fitc": "fit_min_ctx",
}
_UNITS = {"b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "k": 1e3, "m": 1e6, "g": 1e9}
PER_TEST_FIELDS = {"n_prompt", "n_gen", "n_depth", "test", "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts",
             "samples_ns", "samples_ts"}  # fmt: skip
_TEST_RE = re.compile(r"^\s*(?:pp\s*(?P<pp>\d+))?\s*\+?\s*(?:tg\s*(?P<tg>\d+))?\s*(?:@\s*d\s*(?P<d>\d+))?\s*$", re.I)


def _scalar(s: str) -> Any:
    """A table cell → int / float / bool / str, the way llama-bench's JSON would type it."""
    t = s.strip()
    if re.fullmatch(r"[-+]?\d+", t):
        return int(t)
    if re.fullmatch(r"[-+]?\d*\.\d+(?:[eE][-+]?\d+)?", t):
        return float(t)
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    return t


def _md_size(cell: str, units: str) -> Any:
    """'11.27 GiB' → bytes, '20.91 B' (params) → count; left as text when it does not look like that."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]+)\s*", cell)
    if not m:
        return cell.strip()
    unit = m[2].lower()
    if units == "params":
        mult = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}.get(unit)
    else:
        mult = _UNITS.get(unit)
    if mult is None:
        return cell.strip()
    return int(round(float(m[1]) * mult))


def _test_counts(test: str) -> dict[str, int]:
    m = _TEST_RE.match(test) if len(test) <= 64 else None
    if not m or not (m["pp"] or m["tg"]):
        return {}
    return {"n_prompt": int(m["pp"] or 0), "n_gen": int(m["tg"] or 0), "n_depth": int(m["d"] or 0)}


def _split_md(line: str) -> list[str]:
    s = line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|"):
        s = s[:-1]
    return [c.strip() for c in s.split("|")]


def _md_row(header: list[str], cells: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for name, cell in zip(header, cells, strict=True):
        key = _MD_NAMES.get(name, name)
        if name in ("size", "params"):
            row[key] = _md_size(cell, name)
        elif name == "t/s":
            parts = [x.strip() for x in _PLUS_MINUS.split(cell)]
            row["avg_ts"] = parse_number(parts[0])
            if len(parts) > 1:
                row["stddev_ts"] = parse_number(parts[1])
        elif name == "test":
            row["test"] = cell
            row.update(_test_counts(cell))
        else:
            row[key] = _scalar(cell)
    return row


_PLUS_MINUS = re.compile(r"±|\+-|\+/-|Â±")
_MD_RULE = re.compile(r":?-+:?")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BUILD = re.compile(r"build:\s*(?P<c>[0-9a-fA-F]+|unknown)\s*\((?P<n>\d+)\)")


_SQL_INSERT = re.compile(r"INSERT INTO llama_bench \(([A-Za-z0-9_, ]+)\) VALUES \((.*)\);?\s*$")
_SQL_VALUE = re.compile(r"\s*'((?:[^']|'')*)'\s*(?:,|$)")
# llama-bench's BOOL fields: 0/1 in its SQL, true/false in its JSON (tools/llama-bench/llama-bench.cpp get_field_type)
_BENCH_BOOLS = {"cpu_strict", "no_kv_offload", "embeddings", "no_host", "repack", "use_mmap", "f16_kv"}
_BENCH_TEXTS = {"build_commit", "cpu_info", "gpu_info", "backends", "model_filename", "model_type", "cpu_mask",
                "type_k", "type_v", "split_mode", "devices", "tensor_split", "tensor_buft_overrides", "load_mode",
                "lazy_mode", "test_time"}  # fmt: skip


def _sql_row(line: str) -> dict[str, Any] | None:
    """One ``INSERT INTO llama_bench (...) VALUES ('...', ...);`` line of ``llama-bench -o sql`` as a JSON-like row
    (typed as llama-bench's JSON would be); None when the line is not exactly that. Nothing is executed."""
    m = _SQL_INSERT.match(line)
    if not m:
        return None
    cols = [c.strip() for c in m[1].split(",")]
    vals, pos, text = [], 0, m[2]
    while pos < len(text):
        v = _SQL_VALUE.match(text, pos)
        if not v:
            return None
        vals.append(v[1].replace("''", "'"))
        pos = v.end()
    if len(vals) != len(cols) or not all(_IDENT.fullmatch(c) for c in cols):
        return None
    row: dict[str, Any] = {}
    for c, v in zip(cols, vals, strict=True):
        row[c] = (v not in ("0", "false")) if c in _BENCH_BOOLS else v if c in _BENCH_TEXTS else _scalar(v)
    return row if _is_bench_record(row) else None


def sql_unbalanced(line: str) -> bool:
    """A llama-bench ``INSERT`` line whose values do not split into quoted fields: a name with a ``'`` in it
    (llama-bench writes values between quotes without escaping them, tools/llama-bench/llama-bench.cpp sql_printer)."""
    m = _SQL_INSERT.match(line)
    if not m:
        return False
    pos, text = 0, m[2]
    while pos < len(text):
        v = _SQL_VALUE.match(text, pos)
        if not v:
            return True
        pos = v.end()
    return False


def _is_bench_record(obj: Any) -> bool:
    return isinstance(obj, dict) and ("avg_ts" in obj or "avg_ns" in obj) and ("n_prompt" in obj or "n_gen" in obj)


class _Rows:
    """The last ``limit`` rows of one format, and how many there were."""

    def __init__(self, limit: int = MAX_BENCH_ROWS) -> None:
        self.rows: deque[dict[str, Any]] = deque(maxlen=limit)
        self.count = 0

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.count += 1


class BenchParser:
    """llama-bench tables (``-o md``, ``csv``, ``json``, ``jsonl``) found line by line; stderr lines around them are fine.

    JSON: an array that starts on a line beginning with ``[`` whose first element is an object; the first such array
    of llama-bench records wins. JSONL: every line that is one llama-bench record. Markdown: rows of a table whose
    header has ``test`` and ``t/s`` (a ``build:`` footer gives the rows above it their build). CSV: the rows under the
    first header naming ``avg_ts`` and ``n_prompt``/``n_gen`` (other lines between them are skipped).

    ``rejected`` is the first line that looks like a row and is not one: a CSV row of another number of columns, a JSON
    line cut short (after rows), a row that repeats an earlier line exactly (jsonl, csv: llama-bench writes each test
    once, with its own time), an mvlm bench record among llama-bench rows or the other way round.
    """

    def __init__(self, max_rows: int = MAX_BENCH_ROWS, max_json_chars: int = MAX_JSON_CHARS) -> None:
        self.max_rows, self.max_json_chars = max_rows, max_json_chars
        self.line_no = 0
        self.rejected: tuple[int, str] | None = None  # the first line that looked like a row and was not one
        self.json_too_big = False  # an array longer than max_json_chars was given up on
        self.json_rows: list[dict[str, Any]] | None = None
        self._json_count = 0
        self._js: list[str] | None = None  # lines of the array being collected
        self._js_start = 0  # where its "[" is in the first line
        self._js_len = 0
        self._js_tries = 0
        self._js_need_obj = False  # no non-blank character after the "[" yet
        self.jsonl = _Rows(max_rows)
        self.md = _Rows(max_rows)
        self._md_header: list[str] | None = None
        self._md_table = _Rows(max_rows)  # rows of tables not yet given a build footer
        self.csv = _Rows(max_rows)
        self._csv_header: list[str] | None = None
        self.sql = _Rows(max_rows)
        self._seen: dict[bytes, int] = {}  # digest of a row's line -> its line number (a row given twice is refused)
        self._jsonl_kind: dict[bool, int] = {}  # mvlm record (has "runs")? -> the first such line

    def feed(self, line: str) -> None:
        self.line_no += 1
        s = line.strip()
        if s.startswith("INSERT INTO llama_bench"):
            row = _sql_row(s)
            if row is not None:
                self.sql.add(row)
            else:
                self._reject("an INSERT that is not one of llama-bench's rows")
            return
        if self.jsonl.count and s.startswith("["):  # JSON lines hold one object a line: an array among them is damage
            self._reject("a JSON line that is not one of llama-bench's rows (an array)")
            return
        if self.json_rows is None:
            self._json(line, s)
        if s.startswith("{") and ('"avg_' in s or (self.jsonl.count and self._js is None)):
            try:
                obj = json.loads(s)
            except (ValueError, RecursionError):
                obj = None
            if _is_bench_record(obj):
                self._jsonl_row(obj, s)
            else:
                self._reject("a JSON line that is not one of llama-bench's rows" if obj is not None else
                             "a JSON line that is not valid JSON")
        self._md(s)
        self._csv(line)

    def _reject(self, what: str) -> None:
        if self.rejected is None:
            self.rejected = (self.line_no, what)

    def _repeat(self, s: str) -> bool:
        """The row on this line repeats an earlier line exactly (rejected: llama-bench writes each test once, at its
        own time, so a copy would count its samples twice)."""
        key = hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        first = self._seen.setdefault(key, self.line_no)
        if first != self.line_no:
            self._reject(f"a repeat of line {first}")
            return True
        return False

    def _jsonl_row(self, obj: dict[str, Any], s: str) -> None:
        mvlm = "runs" in obj  # an `mvlm bench --jsonl` record: read by the mvlm import, never mixed with llama-bench's
        self._jsonl_kind.setdefault(mvlm, self.line_no)
        if len(self._jsonl_kind) > 1:
            self._reject(f"{'an mvlm bench record' if mvlm else 'a llama-bench row'} in a file of "
                         f"{'llama-bench rows' if mvlm else 'mvlm bench records'} (a file holds one kind or the other)")
        elif not self._repeat(s):
            self.jsonl.add(obj)

    # JSON: collected from a "[" line, decoded when a line closes it; given up on at the first sign it is not one
    def _json(self, line: str, s: str) -> None:
        if s.startswith("["):
            self._js, self._js_start, self._js_len, self._js_tries = [line], line.index("["), len(line), 0
            rest = s[1:].lstrip()
            self._js_need_obj = not rest
            if rest and not rest.startswith("{"):
                self._js = None
            elif rest and (s.endswith("]") or s.endswith("] ,")):
                self._json_try()
            return
        if self._js is None:
            return
        self._js.append(line)
        self._js_len += len(line) + 1
        if self._js_len > self.max_json_chars:
            self._js, self.json_too_big = None, True
            return
        if self._js_need_obj and s:
            self._js_need_obj = False
            if not s.startswith("{"):
                self._js = None
                return
        if s.startswith("]") or s.endswith("}]") or s.endswith("} ]"):
            self._json_try()

    def _json_try(self) -> None:
        assert self._js is not None
        self._js_tries += 1
        text = "\n".join(self._js)
        try:
            obj, _ = json.JSONDecoder().raw_decode(text, self._js_start)
        except RecursionError:
            self._js = None
            return
        except ValueError as e:
            incomplete = getattr(e, "pos", 0) >= len(text.rstrip())
            if not incomplete or self._js_tries >= 64:
                self._js = None
            return
        self._js = None
        if isinstance(obj, list) and obj and all(_is_bench_record(o) for o in obj):
            self.json_rows = obj[-self.max_rows:]
            self._json_count = len(obj)

    def _md(self, s: str) -> None:
        if s.startswith("|") and s.count("|") >= 3:
            cells = _split_md(s)
            if self._md_header is None:
                if "t/s" in cells and "test" in cells:
                    self._md_header = cells
                return
            if all(_MD_RULE.fullmatch(c) for c in cells if c):
                return
            if len(cells) != len(self._md_header):
                return
            row = _md_row(self._md_header, cells)
            if isinstance(row.get("avg_ts"), float):  # a row without a rate is a repeated header or junk
                self._md_table.add(row)
            return
        if not s.startswith("|"):
            self._md_header = None
        if s.startswith("build:") and (m := _BUILD.match(s)):
            for r in self._md_table.rows:
                r.setdefault("build_commit", m["c"])
                r.setdefault("build_number", int(m["n"]))
            for r in self._md_table.rows:
                self.md.add(r)
            self.md.count += self._md_table.count - len(self._md_table.rows)
            self._md_table = _Rows(self.max_rows)

    def _csv(self, line: str) -> None:
        if self._csv_header is None:
            if "avg_ts" in line and ("n_prompt" in line or "n_gen" in line) and "," in line and "|" not in line:
                cells = self._csv_cells(line.strip())
                if all(_IDENT.fullmatch(c) for c in cells):  # not an SQL INSERT naming the same columns
                    self._csv_header = cells
            return
        values = self._csv_cells(line)
        if values == self._csv_header:  # the header again (two runs appended to one file)
            return
        if len(values) != len(self._csv_header):
            s = line.strip()
            if s.startswith('"') or (len(values) >= 3 and "|" not in s):  # a row (llama-bench quotes every value)
                self._reject(f"a CSV row of {len(values)} columns under a header of {len(self._csv_header)}")
            return  # another line (stderr) between the rows
        if not self._repeat(line.strip()):
            self.csv.add({k: _scalar(v) for k, v in zip(self._csv_header, values, strict=True)})

    @staticmethod
    def _csv_cells(line: str) -> list[str]:
        try:
            return next(csv.reader([line]), [])
        except csv.Error:
            return []

    def result(self) -> tuple[str | None, list[dict[str, Any]], int]:
        """(format, rows, how many rows there were): JSON first, then JSONL, Markdown, CSV."""
        if self.json_rows:
            return "llama-bench-json", list(self.json_rows), self._json_count
        if self.jsonl.count:
            return "llama-bench-jsonl", list(self.jsonl.rows), self.jsonl.count
        if self.md.count or self._md_table.count:
            rows = list(self.md.rows) + list(self._md_table.rows)
            return "llama-bench-md", rows[-self.max_rows:], self.md.count + self._md_table.count
        if self.csv.count:
            return "llama-bench-csv", list(self.csv.rows), self.csv.count
        if self.sql.count:
            return "llama-bench-sql", list(self.sql.rows), self.sql.count
        return None, [], 0


def parse_llama_bench(text: str | bytes) -> list[dict[str, Any]]:
    """llama-bench output (md, csv, json or jsonl; stderr lines around it are fine) → one dict per test.

    Keys are llama-bench's JSON field names (``n_prompt``, ``n_gen``, ``n_depth``, ``avg_ts``, ``stddev_ts``,
    ``model_type``, ``n_threads``, ...). Markdown rows also keep ``test`` (``pp512``, old ``pp 512``,
    ``pp512+tg128``, ``tg32 @ d512``) and get ``build_commit``/``build_number`` from the ``build:`` footer.
    Whatever columns a version prints are kept; none is required. Never raises: garbage gives ``[]``. At most the
    last MAX_BENCH_ROWS rows of a table are returned.
    """
    try:
        if isinstance(text, (bytes, bytearray)):
            text = decode(bytes(text))
        bench = BenchParser()
        for line in LineCleaner().lines(split_lines(text_chunks(text))):
            bench.feed(line)
        return bench.result()[1]
    except Exception:  # never let a malformed table escape as an exception
        return []


def parse_llama_bench_file(path: str | Path) -> list[dict[str, Any]]:
    """:func:`parse_llama_bench` on a file, streaming; an unreadable file gives ``[]``."""
    try:
        return read_bench_rows(path).rows
    except Exception:  # unreadable or malformed: nothing found
        return []


@dataclasses.dataclass
class BenchRows:
    """What a file holds of llama-bench's output: its format, the rows read (the last ``max_rows``), how many there
    were, whether a JSON array was given up on for its size, and the first line that looked like a row and was not
    one (line number, what it was)."""

    source_format: str | None
    rows: list[dict[str, Any]]
    count: int
    json_too_big: bool
    rejected: tuple[int, str] | None = None


def read_bench_rows(path: str | Path, max_rows: int = MAX_BENCH_ROWS, max_json_chars: int = MAX_JSON_CHARS,
                    max_line_chars: int | None = None) -> BenchRows:
    """Every llama-bench row of a file, streamed (OSError when it cannot be read). ``max_line_chars``: how long a
    line may be before only its end is read (an import reads whole rows of many samples)."""
    with open(path, "rb") as f:
        bench = BenchParser(max_rows, max_json_chars)
        lines = split_lines(file_chunks(f)) if max_line_chars is None else split_lines(file_chunks(f), max_line_chars)
        for line in LineCleaner().lines(lines):
            bench.feed(line)
    fmt, rows, count = bench.result()
    return BenchRows(fmt, rows, count, bench.json_too_big, bench.rejected)


