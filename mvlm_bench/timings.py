"""Read llama.cpp's timing output, from any era, into one record type.

llama.cpp has changed how it prints its timings many times since 2023, and forks keep the old formats alive, so a
benchmark that reads only today's lines silently reports nothing on yesterday's binaries. This module reads the
merged stdout+stderr of main / llama-cli / llama-completion / llava-cli / llama-mtmd-cli (and llama-bench) and
returns what it found, naming what it did not find. It never raises on bad input.

Eras recognised (``TimingRecord.source_format``):

* ``llama_print_timings`` (2023 to mid 2024; forks later): ``ms per run`` then ``tokens per second``, later
  ``total time = ... / N tokens``.
* ``llama_perf`` (Sep 2024 on): ``llama_perf_sampler_print: sampling time`` + ``llama_perf_context_print:``; the
  pinned runtime's sampler line reads ``samplers time = X ms / N runs``.
* ``common_perf_print`` (Nov 2025 on): ``sampling time = X ms`` (wall time, no count), ``samplers time = X ms /
  N tokens`` (the sampler chain, which is what the other eras call sample time), context lines, ``unaccounted``.
* ``main`` (March 2023): ``main: predict time = X ms / Y ms per token``.
* ``llama-bench-md`` / ``-csv`` / ``-json`` / ``-jsonl`` / ``-sql``: llama-bench tables (see :func:`parse_llama_bench`).
* ``image-lines-only``: only vision-encoder lines (a run killed before its perf block).

Handled anywhere in the stream: timestamp/level prefixes (``0.08.700.664 I ``), ANSI colour codes, JSONL log
lines (``--log-jsonl``), decimal commas (pre-``setlocale`` builds), ``inf``/``nan`` (and MSVC ``1.#INF``), lines
of generated text glued in front of a timing line, UTF-16 files (PowerShell redirection), several perf blocks
(the last complete one wins), the vision-encoder lines of llava-cli and mtmd.

One pass, line by line, in linear time and bounded memory (:func:`parse_file` streams the file; a line longer than
``MAX_LINE_CHARS`` keeps its tail; only the blocks, sums and table rows the record needs are kept), so a 200 MB log
of junk around one timing block costs what its size says and a few MB of memory.
:func:`describe_content` says in a few words what a file without timings holds instead (SQL, other JSON, binary
data, ...), for one-line refusals.

Usage::

    from mvlm_bench.timings import parse_file, parse_text, parse_llama_bench
    rec = parse_file("run.log")
    rec.eval_tps, rec.prompt_tokens, rec.missing, rec.warnings
    rows = parse_llama_bench(open("bench.json").read())   # list of dicts keyed by llama-bench field names
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import json
import math
import os
import re
import stat
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

# The measured quantities, in the order reports show them.
FIELDS: tuple[str, ...] = (
    "load_ms",
    "sample_ms",
    "sample_runs",
    "sample_tps",
    "prompt_eval_ms",
    "prompt_tokens",
    "prompt_tps",
    "eval_ms",
    "eval_runs",
    "eval_tps",
    "total_ms",
    "total_tokens",
    "vision_encode_ms",
    "vision_ms_per_token",
    "image_tokens",
)
_INT_FIELDS = {"sample_runs", "prompt_tokens", "eval_runs", "total_tokens", "image_tokens"}


@dataclass
class TimingRecord:
    """One run's timings as llama.cpp printed them (None: not printed and not derivable).

    ``*_ms`` are milliseconds, ``*_tps`` tokens per second, ``*_runs``/``*_tokens`` counts. ``sample_*`` is the
    sampler chain (``sample time`` / ``samplers time``); ``prompt_*`` is batched decoding of the prompt, image
    embeddings included; ``eval_*`` is one-token decoding; ``total_*`` is llama.cpp's own total, which includes
    model loading. ``vision_encode_ms`` sums every image encode; ``vision_ms_per_token`` is the encoder time per
    image token (llava-cli's "ms per image patch"); ``image_tokens`` counts the image embeddings fed to the LM.
    """

    load_ms: float | None = None
    sample_ms: float | None = None
    sample_runs: int | None = None
    sample_tps: float | None = None
    prompt_eval_ms: float | None = None
    prompt_tokens: int | None = None
    prompt_tps: float | None = None
    eval_ms: float | None = None
    eval_runs: int | None = None
    eval_tps: float | None = None
    total_ms: float | None = None
    total_tokens: int | None = None
    vision_encode_ms: float | None = None
    vision_ms_per_token: float | None = None
    image_tokens: int | None = None
    # llama-mtmd-cli with log timestamps (-lv 4): ms from the end of loading (its "main: loading model: ..." line,
    # printed once the LM and the mmproj are loaded) to its perf block; everything after loading (image read and
    # encode, prompt, generation). Not in FIELDS: no other program prints it (see :func:`_after_load`).
    after_load_ms: float | None = None
    source_format: str = "unrecognised"
    missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-safe: no inf/nan, those are None with a warning)."""
        return dataclasses.asdict(self)

    @property
    def found_anything(self) -> bool:
        return any(getattr(self, f) is not None for f in FIELDS)


# --- numbers ------------------------------------------------------------------------------------------------------
# A printf %f number in any locale, or one of the spellings of infinity / not-a-number that C runtimes print.
_NUM = r"[-+]?(?:\d+(?:[.,]\d+)?(?:#(?:INF|QNAN|SNAN|IND)\d*)?|inf(?:inity)?|nan(?:\([^)]*\))?)"


def _num(s: str | None) -> float | None:
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
_READ_CHUNK = 1 << 18
# No pattern below may backtrack over a line (an unterminated OSC sequence is bounded; see also _PERF).
_ANSI = re.compile(r"\x1b(?:\[[0-9;?]{0,64}[ -/]{0,8}[@-~]|\][^\x07\x1b]{0,512}(?:\x07|\x1b\\)|[@-Z\\-_])")
_CTRL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
_LINE_ENDS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")  # what str.splitlines splits on


def _decode(data: bytes) -> str:
    """Bytes → text. UTF-16 with BOM is what Windows PowerShell's ``>`` writes; everything else as UTF-8."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.decode("utf-8", errors="replace")


def _text_chunks(text: str) -> Iterator[str]:
    for i in range(0, len(text), _READ_CHUNK):
        yield text[i : i + _READ_CHUNK]


def _file_chunks(f: IO[bytes]) -> Iterator[str]:
    """Decoded text of a binary stream, chunk by chunk (the encoding chosen from the first bytes, as ``_decode``)."""
    data = f.read(_READ_CHUNK)
    while 0 < len(data) < 3:  # a pipe may give fewer bytes than asked: the BOM needs 2 or 3
        more = f.read(_READ_CHUNK)
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
        data = f.read(_READ_CHUNK)
    yield dec.decode(b"", final=True)


def _split_lines(chunks: Iterable[str], max_chars: int = MAX_LINE_CHARS) -> Iterator[str]:
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
        elif last in _LINE_ENDS:
            pending = ""
        else:
            pending = lines.pop()
        for line in lines:
            yield line if len(line) <= max_chars else line[-max_chars:]
        if len(pending) > max_chars + 1:
            pending = pending[-(max_chars + 1) :]
    for line in pending.splitlines():
        yield line[-max_chars:]


class _Cleaner:
    """Colour codes and control bytes removed; ``--log-jsonl`` records unwrapped into their message lines."""

    def __init__(self) -> None:
        self.nonblank = False  # any non-whitespace in the raw text ("empty input" otherwise)

    def lines(self, raw_lines: Iterable[str]) -> Iterator[str]:
        for raw in raw_lines:
            if not self.nonblank and raw.strip():
                self.nonblank = True
            line = _CTRL.sub("", _ANSI.sub("", raw) if "\x1b" in raw else raw)
            s = line.strip()
            if s.startswith("{") and '"msg"' in s:
                try:
                    obj = json.loads(s)
                except ValueError:
                    obj = None
                if isinstance(obj, dict) and isinstance(obj.get("msg"), str):
                    for x in obj["msg"].splitlines():
                        yield _CTRL.sub("", x)
                    continue
            yield line


# --- perf lines ---------------------------------------------------------------------------------------------------
# "<function>: <what> time = X ms [/ N runs|tokens|%] [( Y ms per token|run [, Z tokens per second] )]"
# Not anchored: a timestamp/level prefix or a piece of generated text may precede the function name. The name starts
# at a word start (``(?<!\w)``), so a search costs linear time even on a line that is one long word.
_PERF = re.compile(
    r"(?<!\w)(?P<fn>[A-Za-z_]\w*):\s+(?P<what>load|sample|sampling|samplers|prompt eval|eval|predict|total|unaccounted)"
    rf"\s+time\s*=\s*(?P<ms>{_NUM})\s*ms"
    rf"(?:\s*/\s*(?P<n>{_NUM})\s*(?P<unit>runs|tokens|%|ms per token))?"
    rf"(?:\s*\(\s*(?P<per>{_NUM})\s*ms per (?:token|run)(?:\s*,\s*(?P<tps>{_NUM})\s*tokens per second)?\s*\))?",
    re.IGNORECASE,
)
_ERA_BY_FN = {
    "llama_print_timings": "llama_print_timings",
    "llama_perf_context_print": "llama_perf",
    "llama_perf_sampler_print": "llama_perf",
    "common_perf_print": "common_perf_print",
    "main": "main",
}


# common/log.cpp's timestamp prefix: minutes.seconds.milliseconds.microseconds since the program started, then a level
_TIMESTAMP = re.compile(r"^\s*(\d+)\.(\d{2})\.(\d{3})\.(\d{3}) [A-Z] ")


@dataclass
class _Entry:
    line: int
    key: str  # load | sample | sample_wall | prompt | eval | total | unaccounted
    fn: str
    ms: float | None
    n: float | None
    tps: float | None


def _perf_entry(i: int, line: str) -> _Entry | None:
    if " time" not in line:
        return None
    m = _PERF.search(line)
    if not m:
        return None
    what = m["what"].lower()
    unit = (m["unit"] or "").lower()
    n = _num(m["n"]) if unit in ("runs", "tokens") else None
    if what in ("sample", "samplers"):
        key = "sample"
    elif what == "sampling":
        # llama_perf_sampler_print's "sampling time = X ms / N runs" is the sampler chain; common_perf_print's
        # count-less "sampling time = X ms" is wall time around it (kept only to tell the eras apart).
        key = "sample" if n is not None else "sample_wall"
    elif what == "prompt eval":
        key = "prompt"
    elif what in ("eval", "predict"):
        key = "eval"
    else:
        key = what
    return _Entry(i, key, m["fn"], _num(m["ms"]), n, _num(m["tps"]))


def _complete(block: list[_Entry]) -> bool:
    keys = {e.key for e in block}
    return "total" in keys and ("prompt" in keys or "eval" in keys)


# --- image lines --------------------------------------------------------------------------------------------------
_CLIP = re.compile(
    rf"image encoded in\s+(?P<ms>{_NUM})\s*ms(?:\s+by CLIP\s*\(\s*(?P<per>{_NUM})\s*ms per image patch\s*\))?",
    re.IGNORECASE,
)
_EMB_CREATED = re.compile(r"image embedding created:\s*(?P<n>\d+)\s*tokens", re.IGNORECASE)
_SLICE = re.compile(rf"image slice encoded in\s+(?P<ms>{_NUM})\s*ms", re.IGNORECASE)
_MTMD_BATCH = re.compile(rf"mtmd batch encoding done in\s+(?P<ms>{_NUM})\s*ms", re.IGNORECASE)
_DECODING = re.compile(r"decoding image batch\s+\d+\s*/\s*\d+\s*,\s*n_tokens_batch\s*=\s*(?P<n>\d+)", re.IGNORECASE)


@dataclass
class _Image:
    """Running sums of the vision-encoder lines of a stretch of the output (never the lines themselves)."""

    encode_sum: float = 0.0
    encodes: int = 0
    per_patch: float | None = None  # the first "ms per image patch" seen
    per_patches: int = 0
    created_sum: int = 0
    created: int = 0
    batch_sum: int = 0
    batches: int = 0

    def add(self, other: _Image) -> None:
        """Append the stretch that follows this one."""
        self.encode_sum += other.encode_sum
        self.encodes += other.encodes
        if self.per_patch is None:
            self.per_patch = other.per_patch
        self.per_patches += other.per_patches
        self.created_sum += other.created_sum
        self.created += other.created
        self.batch_sum += other.batch_sum
        self.batches += other.batches

    def line(self, line: str) -> None:
        for rx in (_CLIP, _SLICE, _MTMD_BATCH):
            m = rx.search(line)
            if m:
                v = _num(m["ms"])
                if v is not None and math.isfinite(v):
                    self.encode_sum += v
                    self.encodes += 1
                if rx is _CLIP and m["per"] is not None:
                    p = _num(m["per"])
                    if p is not None and math.isfinite(p):
                        if self.per_patch is None:
                            self.per_patch = p
                        self.per_patches += 1
                break
        if m := _EMB_CREATED.search(line):
            self.created_sum += int(m["n"])
            self.created += 1
        elif m := _DECODING.search(line):
            self.batch_sum += int(m["n"])
            self.batches += 1


# --- the parser ---------------------------------------------------------------------------------------------------
def _finite(rec: TimingRecord, name: str, value: float | None, what: str) -> None:
    """Store a printed value; inf/nan mean "nothing was measured" (0 ms divided), so store None and say so."""
    if value is None:
        return
    if not math.isfinite(value):
        rec.warnings.append(f"{what} printed as {value!r} (nothing measured): {name} left empty")
        return
    setattr(rec, name, int(round(value)) if name in _INT_FIELDS else value)


def _rate(rec: TimingRecord, tps_name: str, ms_name: str, n_name: str, what: str) -> None:
    """Derive tokens/s from ms and a count when the text lacks it; check it when the text has it."""
    ms, n, tps = getattr(rec, ms_name), getattr(rec, n_name), getattr(rec, tps_name)
    if ms is None or n is None or ms <= 0:
        return
    derived = 1000.0 * n / ms
    if tps is None:
        setattr(rec, tps_name, derived)
    elif ms >= 1.0 and abs(derived - tps) > 0.05 * max(abs(tps), 1e-9):
        rec.warnings.append(f"{what}: printed {tps:.2f} tok/s but {n} / {ms:.2f} ms = {derived:.2f} tok/s")


class _Parser:
    """One pass over the cleaned lines; keeps only what the record needs.

    Perf lines, in order, form blocks; a quantity seen twice starts the next block (other text between perf lines
    does not split a block: merged stdout and stderr interleave freely). The last complete block wins. The image
    lines of a block are those after the previous block's last perf line up to its own last one (to the end of the
    text for the last block: buffered stdout may flush mtmd's lines after the stderr perf block).
    """

    def __init__(self) -> None:
        self.cleaner = _Cleaner()
        self.bench = _BenchParser()
        self.n_lines = 0
        self.cur: list[_Entry] = []  # the block being read (at most one entry per quantity)
        self.closed = 0  # blocks before it
        self.last_complete: tuple[int, list[_Entry], _Image] | None = None  # (index, block, its image lines)
        self.img_block = _Image()  # image lines from the previous block's end up to cur's last perf line
        self.img_pending = _Image()  # image lines after cur's last perf line
        self.loaded_us: int | None = None  # timestamp of llama-mtmd-cli's last "main: loading model:" line
        self.after_load_us: int | None = None  # from it to the last perf line after it

    def feed(self, raw_lines: Iterable[str]) -> None:
        for line in self.cleaner.lines(raw_lines):
            i = self.n_lines
            self.n_lines += 1
            self._after_load(line)
            low = line.lower()
            if "image" in low or "mtmd" in low:
                self.img_pending.line(line)
            e = _perf_entry(i, line)
            if e is not None:
                if any(x.key == e.key for x in self.cur):
                    if _complete(self.cur):
                        self.last_complete = (self.closed, self.cur, self.img_block)
                    self.closed += 1
                    self.cur, self.img_block = [e], self.img_pending
                else:
                    self.cur.append(e)
                    self.img_block.add(self.img_pending)
                self.img_pending = _Image()
            self.bench.feed(line)

    def _after_load(self, line: str) -> None:
        """Track the end of llama-mtmd-cli's loading and its perf lines by their log timestamps (``-lv 4``)."""
        if "main: loading model:" not in line and "llama_perf_context_print:" not in line:
            return
        m = _TIMESTAMP.match(line)
        if m is None:
            return
        t = ((int(m[1]) * 60 + int(m[2])) * 1000 + int(m[3])) * 1000 + int(m[4])
        if "main: loading model:" in line:
            self.loaded_us, self.after_load_us = t, None
        elif self.loaded_us is not None and t >= self.loaded_us:
            self.after_load_us = t - self.loaded_us

    def finish(self, rec: TimingRecord) -> None:
        if self.after_load_us is not None:
            rec.after_load_ms = self.after_load_us / 1000.0
        if not self.cleaner.nonblank:
            rec.warnings.append("empty input")
            return
        n_blocks = self.closed + (1 if self.cur else 0)
        chosen: tuple[int, list[_Entry], _Image] | None = None
        if self.cur:
            last_img = self.img_block
            last_img.add(self.img_pending)
            if _complete(self.cur):
                chosen = (n_blocks - 1, self.cur, last_img)
            elif self.last_complete is not None:
                chosen = self.last_complete
            else:
                chosen = (n_blocks - 1, self.cur, last_img)
                rec.warnings.append("no complete timing block (total plus prompt eval or eval): using the last, "
                                    "partial one")
        if chosen is not None:
            idx, block, img = chosen
            if idx != n_blocks - 1:
                rec.warnings.append(
                    f"{n_blocks - 1 - idx} incomplete timing block(s) after the last complete one were ignored"
                )
            if n_blocks > 1:
                rec.warnings.append(f"{n_blocks} timing blocks found: using block {idx + 1}")
            _fill_from_block(rec, block)
        else:
            img = self.img_pending
        _fill_image(rec, img)
        if chosen is None:
            bench_fmt, rows, total = self.bench.result()
            if rows:
                _fill_from_bench(rec, bench_fmt, rows, total)
            elif rec.found_anything:
                rec.source_format = "image-lines-only"
                rec.warnings.append("vision-encoder lines only: no perf block (run interrupted, or log level too low)")
            else:
                rec.warnings.append("no llama.cpp timing lines found")


def _parse_lines(raw_lines: Iterable[str]) -> TimingRecord:
    """The record of a stream of raw lines; never raises (a parser bug becomes a warning)."""
    rec = TimingRecord()
    parser = _Parser()
    try:
        parser.feed(raw_lines)
        parser.finish(rec)
    except Exception as e:  # a parser bug must not take a benchmark run down with it
        rec.warnings.append(f"parser error ({type(e).__name__}: {e}); record may be partial")
    rec.missing = [f for f in FIELDS if getattr(rec, f) is None]
    return rec


def parse_text(text: str | bytes) -> TimingRecord:
    """Parse merged stdout+stderr of a llama.cpp program (or llama-bench output); never raises."""
    if isinstance(text, (bytes, bytearray)):
        text = _decode(bytes(text))
    if not isinstance(text, str):
        rec = TimingRecord(warnings=["empty input"])
        rec.missing = list(FIELDS)
        return rec
    return _parse_lines(_split_lines(_text_chunks(text)))


def _fill_from_block(rec: TimingRecord, block: list[_Entry]) -> None:
    fns = {e.fn for e in block}
    eras = {_ERA_BY_FN[f] for f in fns if f in _ERA_BY_FN}
    keys = {e.key for e in block}
    if "common_perf_print" in eras:
        rec.source_format = "common_perf_print"
    elif "llama_perf" in eras:
        rec.source_format = "llama_perf"
    elif eras:
        rec.source_format = sorted(eras)[0]
    else:
        rec.source_format = "unknown:" + sorted(fns)[0]
    if "sample_wall" in keys and rec.source_format != "common_perf_print":
        rec.source_format = "common_perf_print"

    by_key = {e.key: e for e in block}
    if e := by_key.get("load"):
        _finite(rec, "load_ms", e.ms, "load time")
    if e := by_key.get("sample"):
        _finite(rec, "sample_ms", e.ms, "sample time")
        _finite(rec, "sample_runs", e.n, "sample count")
        _finite(rec, "sample_tps", e.tps, "sample tok/s")
    if e := by_key.get("prompt"):
        _finite(rec, "prompt_eval_ms", e.ms, "prompt eval time")
        _finite(rec, "prompt_tokens", e.n, "prompt token count")
        _finite(rec, "prompt_tps", e.tps, "prompt eval tok/s")
    if e := by_key.get("eval"):
        _finite(rec, "eval_ms", e.ms, "eval time")
        _finite(rec, "eval_runs", e.n, "eval count")
        _finite(rec, "eval_tps", e.tps, "eval tok/s")
    if e := by_key.get("total"):
        _finite(rec, "total_ms", e.ms, "total time")
        _finite(rec, "total_tokens", e.n, "total token count")
    _rate(rec, "sample_tps", "sample_ms", "sample_runs", "sample")
    _rate(rec, "prompt_tps", "prompt_eval_ms", "prompt_tokens", "prompt eval")
    _rate(rec, "eval_tps", "eval_ms", "eval_runs", "eval")
    if rec.eval_ms == 0 and rec.eval_runs == 1:
        rec.warnings.append("eval time 0 ms / 1 run: no single-token decoding happened (llama.cpp clamps 0 to 1)")
    if rec.sample_ms == 0 and rec.sample_runs == 1:
        rec.warnings.append("sample time 0 ms / 1 run: no sampling happened (llama.cpp clamps 0 to 1)")


def _fill_image(rec: TimingRecord, img: _Image) -> None:
    if img.encodes:
        rec.vision_encode_ms = img.encode_sum
    if img.created:
        rec.image_tokens = img.created_sum
    elif img.batches:
        rec.image_tokens = img.batch_sum
    if img.per_patches == 1 and img.encodes == 1:
        rec.vision_ms_per_token = img.per_patch
    elif rec.vision_encode_ms is not None and rec.image_tokens:
        rec.vision_ms_per_token = rec.vision_encode_ms / rec.image_tokens
    if img.encodes > 1:
        rec.warnings.append(f"{img.encodes} vision encodes: vision_encode_ms is their sum")


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
_PER_TEST = {"n_prompt", "n_gen", "n_depth", "test", "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts",
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
            row["avg_ts"] = _num(parts[0])
            if len(parts) > 1:
                row["stddev_ts"] = _num(parts[1])
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


def _sql_unbalanced(line: str) -> bool:
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
    """The last MAX_BENCH_ROWS rows of one format, and how many there were."""

    def __init__(self) -> None:
        self.rows: deque[dict[str, Any]] = deque(maxlen=MAX_BENCH_ROWS)
        self.count = 0

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.count += 1


class _BenchParser:
    """llama-bench tables (``-o md``, ``csv``, ``json``, ``jsonl``) found line by line; stderr lines around them are fine.

    JSON: an array that starts on a line beginning with ``[`` whose first element is an object; the first such array
    of llama-bench records wins. JSONL: every line that is one llama-bench record. Markdown: rows of a table whose
    header has ``test`` and ``t/s`` (a ``build:`` footer gives the rows above it their build). CSV: the rows under the
    first header naming ``avg_ts`` and ``n_prompt``/``n_gen``, up to the first row that does not fit.
    """

    def __init__(self) -> None:
        self.json_rows: list[dict[str, Any]] | None = None
        self._json_count = 0
        self._js: list[str] | None = None  # lines of the array being collected
        self._js_start = 0  # where its "[" is in the first line
        self._js_len = 0
        self._js_tries = 0
        self._js_need_obj = False  # no non-blank character after the "[" yet
        self.jsonl = _Rows()
        self.md = _Rows()
        self._md_header: list[str] | None = None
        self._md_table = _Rows()  # rows of tables not yet given a build footer
        self.csv = _Rows()
        self._csv_header: list[str] | None = None
        self._csv_done = False
        self.sql = _Rows()

    def feed(self, line: str) -> None:
        s = line.strip()
        if s.startswith("INSERT INTO llama_bench"):
            row = _sql_row(s)
            if row is not None:
                self.sql.add(row)
            return
        if self.json_rows is None:
            self._json(line, s)
        if s.startswith("{") and '"avg_' in s:
            try:
                obj = json.loads(s)
            except ValueError:
                obj = None
            if _is_bench_record(obj):
                self.jsonl.add(obj)
        self._md(s)
        if not self._csv_done:
            self._csv(line)

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
        if self._js_len > MAX_JSON_CHARS:
            self._js = None
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
        except ValueError as e:
            incomplete = getattr(e, "pos", 0) >= len(text.rstrip())
            if not incomplete or self._js_tries >= 64:
                self._js = None
            return
        self._js = None
        if isinstance(obj, list) and obj and all(_is_bench_record(o) for o in obj):
            self.json_rows = obj[-MAX_BENCH_ROWS:]
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
            self._md_table = _Rows()

    def _csv(self, line: str) -> None:
        if self._csv_header is None:
            if "avg_ts" in line and ("n_prompt" in line or "n_gen" in line) and "," in line and "|" not in line:
                cells = self._csv_cells(line.strip())
                if all(_IDENT.fullmatch(c) for c in cells):  # not an SQL INSERT naming the same columns
                    self._csv_header = cells
            return
        values = self._csv_cells(line)
        if len(values) != len(self._csv_header):
            if self.csv.count:
                self._csv_done = True
            return
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
            return "llama-bench-md", rows[-MAX_BENCH_ROWS:], self.md.count + self._md_table.count
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
            text = _decode(bytes(text))
        bench = _BenchParser()
        for line in _Cleaner().lines(_split_lines(_text_chunks(text))):
            bench.feed(line)
        return bench.result()[1]
    except Exception:  # never let a malformed table escape as an exception
        return []


def parse_llama_bench_file(path: str | Path) -> list[dict[str, Any]]:
    """:func:`parse_llama_bench` on a file, streaming; an unreadable file gives ``[]``."""
    try:
        with open(path, "rb") as f:
            bench = _BenchParser()
            for line in _Cleaner().lines(_split_lines(_file_chunks(f))):
                bench.feed(line)
        return bench.result()[1]
    except Exception:  # unreadable or malformed: nothing found
        return []


def _fill_from_bench(rec: TimingRecord, fmt: str | None, rows: list[dict[str, Any]], total: int | None = None) -> None:
    """Map llama-bench rows onto the record: the last configuration's pp row and tg row."""
    rec.source_format = fmt or "llama-bench"

    def config(r: dict[str, Any]) -> str:
        return json.dumps({k: v for k, v in r.items() if k not in _PER_TEST}, sort_keys=True, default=str)

    last = config(rows[-1])
    same = [r for r in rows if config(r) == last]
    pp = [r for r in same if (r.get("n_prompt") or 0) > 0 and not r.get("n_gen")]
    tg = [r for r in same if (r.get("n_gen") or 0) > 0 and not r.get("n_prompt")]

    def ms(r: dict[str, Any], n: int) -> float | None:
        if isinstance(r.get("avg_ns"), (int, float)):
            return r["avg_ns"] / 1e6
        ts = r.get("avg_ts")
        return 1000.0 * n / ts if isinstance(ts, (int, float)) and ts > 0 else None

    used = []
    if pp:
        r = pp[-1]
        rec.prompt_tokens = int(r["n_prompt"])
        _finite(rec, "prompt_tps", r.get("avg_ts"), "llama-bench pp avg_ts")
        _finite(rec, "prompt_eval_ms", ms(r, rec.prompt_tokens), "llama-bench pp time")
        used.append(r)
    if tg:
        r = tg[-1]
        rec.eval_runs = int(r["n_gen"])
        _finite(rec, "eval_tps", r.get("avg_ts"), "llama-bench tg avg_ts")
        _finite(rec, "eval_ms", ms(r, rec.eval_runs), "llama-bench tg time")
        used.append(r)
    total = max(total or 0, len(rows))
    if total > len(used):
        names = ", ".join(str(r.get("test") or f"pp{r.get('n_prompt', 0)}/tg{r.get('n_gen', 0)}") for r in used)
        rec.warnings.append(
            f"llama-bench: {total} rows; the record holds {names or 'none'} of the last configuration "
            "(use parse_llama_bench for every row)"
        )
    if any((r.get("n_depth") or 0) > 0 for r in used):
        rec.warnings.append("llama-bench: the rows used were measured at a non-zero depth (n_depth)")


def parse_file(path: str | Path) -> TimingRecord:
    """Read a saved log and parse it, streaming. An unreadable file is the user's to fix: MvlmError, one line."""
    from mvlm_core.errors import MvlmError

    p = Path(path)
    try:
        st = os.stat(p)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):  # a FIFO or socket would block open() forever
            from mvlm_core.atomic import file_kind

            raise MvlmError(f"{p} is {file_kind(p)}, not a file: pass a saved llama.cpp output file")
        f = open(p, "rb")  # noqa: SIM115 (closed below; read errors are told apart from parser errors)
    except IsADirectoryError:
        raise MvlmError(f"{p} is a directory: pass a saved llama.cpp output file") from None
    except FileNotFoundError:
        raise MvlmError(f"{p} does not exist: pass a saved llama.cpp output file") from None
    except OSError as e:
        raise MvlmError(f"cannot read {p}: {e.strerror or e}; check the path and its permissions") from None
    if stat.S_ISDIR(st.st_mode):
        f.close()
        raise MvlmError(f"{p} is a directory: pass a saved llama.cpp output file")
    read_error: list[OSError] = []

    def chunks() -> Iterator[str]:
        try:
            yield from _file_chunks(f)
        except OSError as e:
            read_error.append(e)

    with f:
        rec = _parse_lines(_split_lines(chunks()))
    if read_error:
        e = read_error[0]
        raise MvlmError(f"cannot read {p}: {e.strerror or e}; check the file and the disk it is on") from None
    return rec


# --- what a file is, when it holds no timings -----------------------------------------------------------------------
_MAGIC = (
    (b"SQLite format 3\x00", "a SQLite database (an mvlm history? `mvlm history --db FILE` reads those)"),
    (b"GGUF", "a GGUF model file"),
    (b"\x1f\x8b", "a gzip archive (unpack it first)"),
    (b"PK\x03\x04", "a zip archive (unpack it first)"),
    (b"\x28\xb5\x2f\xfd", "a zstd archive (unpack it first)"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x7fELF", "an executable (ELF)"),
)
SNIFF_BYTES = 1 << 16


def describe_content(path: str | Path) -> str:
    """A few words on what a file holds (from its first 64 KiB), for "this is not llama.cpp output" messages."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if not head.strip():
        return "an empty file" if not head else "only whitespace"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    text = _decode(head)
    odd = text.count("\ufffd") + len(_CTRL.findall(text.replace("\x1b", "")))
    if odd > 0.05 * len(text):
        return "binary data"
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    for n, x in enumerate(text.splitlines(), 1):
        if _sql_unbalanced(x.strip()):
            return (f"line {n}: an unbalanced quote in a llama-bench INSERT, so not valid SQL (llama-bench does not "
                    "escape quotes in names: rename the model file or use -o json)")
    if any(x.upper().startswith(("CREATE TABLE", "INSERT INTO")) for x in lines):
        return "SQL statements that are not llama-bench rows"
    first = lines[0] if lines else ""
    if first.startswith(("{", "[")):
        try:
            json.loads(_decode(head) if len(head) < SNIFF_BYTES else "x")
            return "JSON that is not llama-bench output"
        except ValueError:
            pass
        if first.startswith("{") and all(x.startswith("{") for x in lines[:-1]):
            return "JSON lines that are not llama-bench records"
    if first.startswith("|"):
        return "a Markdown table without llama-bench's test and t/s columns"
    shown = first[:60] + ("…" if len(first) > 60 else "")
    return f"{len(lines)}{'+' if len(head) == SNIFF_BYTES else ''} line(s) of other text, starting {shown!r}"


# --- what a llama.cpp run says about itself -------------------------------------------------------------------------
_FACT_LINES = {
    "arch": re.compile(r"print_info: arch\s+=\s+(\S+)"),
    "type_name": re.compile(r"print_info: model type\s+=\s+(.+?)\s*$"),
    "ftype": re.compile(r"print_info: file type\s+=\s+(.+?)\s*$"),
    "n_batch": re.compile(r"llama_context: n_batch\s+=\s+(\d+)"),
    "n_ubatch": re.compile(r"llama_context: n_ubatch\s+=\s+(\d+)"),
    "flash_attn": re.compile(r"llama_context: flash_attn\s+=\s+(\w+)"),
    "kv": re.compile(r"llama_kv_cache: size = .*K \((\w+)\).*V \((\w+)\)"),
    "threads": re.compile(r"(?:system_info: n_threads|threadpool init, n_threads) = (\d+)"),
    "system_info": re.compile(r"system_info: n_threads = \d+ .*?\| (.*)$"),
    "device": re.compile(r"using device (\S+) \((.*?)\)(?: \(.*?\))? - \d+ MiB free"),
    "fit": re.compile(r"common_params_fit_impl: .*>= (\d+) MiB"),
    "fit_ran": re.compile(r"common_fit_params: |fitting params to device memory"),
}
_FLASH_ATTN = {"auto": -1, "disabled": 0, "enabled": 1}


def run_facts(text: str) -> dict[str, Any]:
    """The llama-bench fields a llama-completion / llama-mtmd-cli log (``-lv 4``) states about its own run.

    ``model_type`` is llama.cpp's model description (arch, size class, file type: what llama-bench prints), ``n_batch``
    / ``n_ubatch`` / ``flash_attn`` (-1 auto, 0 off, 1 on) / ``type_k`` / ``type_v`` the context's, ``n_threads`` the
    threadpool's, ``backends`` the non-CPU backends in ``system_info`` (else the devices used; "CPU" when none),
    ``gpu_info`` the descriptions of the devices the model was loaded on, ``fit_target`` / ``fit_min_ctx`` whether
    (and with which margin, MiB) the program fitted its parameters to free memory. Keys it cannot find are absent."""
    found: dict[str, Any] = {}
    devices: list[tuple[str, str]] = []
    for raw in text.splitlines():
        line = raw.rstrip()
        for key, rx in _FACT_LINES.items():
            m = rx.search(line)
            if not m:
                continue
            if key == "device":
                devices.append((m[1], m[2]))
            elif key == "kv":
                found["type_k"], found["type_v"] = m[1], m[2]
            elif key == "fit_ran":
                found["fit_ran"] = True
            else:
                found.setdefault(key, m[1])
    out: dict[str, Any] = {}
    if all(k in found for k in ("arch", "type_name", "ftype")):
        out["model_type"] = f"{found['arch']} {found['type_name']} {found['ftype']}"
    for k in ("n_batch", "n_ubatch"):
        if k in found:
            out[k] = int(found[k])
    if "threads" in found:
        out["n_threads"] = int(found["threads"])
    if found.get("flash_attn") in _FLASH_ATTN:
        out["flash_attn"] = _FLASH_ATTN[found["flash_attn"]]
    for k in ("type_k", "type_v"):
        if k in found:
            out[k] = found[k].lower()
    regs = [part.split(" : ", 1)[0].strip() for part in found.get("system_info", "").split(" | ") if " : " in part]
    if regs:
        names = [r for r in regs if r != "CPU"]
    else:
        names = list(dict.fromkeys(re.sub(r"\d+$", "", name) for name, _ in devices))
    if "arch" in found or regs or devices:
        out["backends"] = ",".join(names) if names else "CPU"
        out["gpu_info"] = ", ".join(desc for _, desc in devices)
    if found.get("fit_ran"):
        out["fit_target"] = int(found.get("fit", 1024))
        out["fit_min_ctx"] = 4096  # llama.cpp's default (common.h fit_params_min_ctx); mvlm never passes -fitc
    elif "arch" in found:
        out["fit_target"], out["fit_min_ctx"] = 0, 0
    return out
