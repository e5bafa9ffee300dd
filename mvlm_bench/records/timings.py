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

    from mvlm_bench.records.timings import parse_file, parse_text
    from mvlm_bench.records.llama_bench_output import parse_llama_bench
    rec = parse_file("run.log")
    rec.eval_tps, rec.prompt_tokens, rec.missing, rec.warnings
    rows = parse_llama_bench(open("bench.json").read())   # list of dicts keyed by llama-bench field names
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mvlm_bench.records.llama_bench_output import PER_TEST_FIELDS, BenchParser
from mvlm_bench.records.log_text import NUMBER, LineCleaner, decode, file_chunks, parse_number, split_lines, text_chunks

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



# --- perf lines ---------------------------------------------------------------------------------------------------
# "<function>: <what> time = X ms [/ N runs|tokens|%] [( Y ms per token|run [, Z tokens per second] )]"
# Not anchored: a timestamp/level prefix or a piece of generated text may precede the function name. The name starts
# at a word start (``(?<!\w)``), so a search costs linear time even on a line that is one long word.
_PERF = re.compile(
    r"(?<!\w)(?P<fn>[A-Za-z_]\w*):\s+(?P<what>load|sample|sampling|samplers|prompt eval|eval|predict|total|unaccounted)"
    rf"\s+time\s*=\s*(?P<ms>{NUMBER})\s*ms"
    rf"(?:\s*/\s*(?P<n>{NUMBER})\s*(?P<unit>runs|tokens|%|ms per token))?"
    rf"(?:\s*\(\s*(?P<per>{NUMBER})\s*ms per (?:token|run)(?:\s*,\s*(?P<tps>{NUMBER})\s*tokens per second)?\s*\))?",
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
    n = parse_number(m["n"]) if unit in ("runs", "tokens") else None
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
    return _Entry(i, key, m["fn"], parse_number(m["ms"]), n, parse_number(m["tps"]))


def _complete(block: list[_Entry]) -> bool:
    keys = {e.key for e in block}
    return "total" in keys and ("prompt" in keys or "eval" in keys)


# --- image lines --------------------------------------------------------------------------------------------------
_CLIP = re.compile(
    rf"image encoded in\s+(?P<ms>{NUMBER})\s*ms(?:\s+by CLIP\s*\(\s*(?P<per>{NUMBER})\s*ms per image patch\s*\))?",
    re.IGNORECASE,
)
_EMB_CREATED = re.compile(r"image embedding created:\s*(?P<n>\d+)\s*tokens", re.IGNORECASE)
_SLICE = re.compile(rf"image slice encoded in\s+(?P<ms>{NUMBER})\s*ms", re.IGNORECASE)
_MTMD_BATCH = re.compile(rf"mtmd batch encoding done in\s+(?P<ms>{NUMBER})\s*ms", re.IGNORECASE)
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
                v = parse_number(m["ms"])
                if v is not None and math.isfinite(v):
                    self.encode_sum += v
                    self.encodes += 1
                if rx is _CLIP and m["per"] is not None:
                    p = parse_number(m["per"])
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
_NEGATIVE = "\0negative "  # a warning to merge (see _merge_negatives): one line per record says every negative value


def set_finite(rec: TimingRecord, name: str, value: float | None, what: str) -> None:
    """Store a printed value; inf/nan mean "nothing was measured" (0 ms divided), so store None and say so. A negative
    time, count or rate is no measurement either (a clock that went back, an edited log): None, and a warning."""
    if value is None:
        return
    if not math.isfinite(value):
        rec.warnings.append(f"{what} printed as {value!r} (nothing measured): {name} left empty")
        return
    if value < 0:
        rec.warnings.append(f"{_NEGATIVE}{what} {value:g}")
        return
    setattr(rec, name, int(round(value)) if name in _INT_FIELDS else value)


def _merge_negatives(rec: TimingRecord) -> None:
    """The negative values set_finite left empty, said in one warning line where the first was."""
    found = [w.removeprefix(_NEGATIVE) for w in rec.warnings if w.startswith(_NEGATIVE)]
    if not found:
        return
    first = next(i for i, w in enumerate(rec.warnings) if w.startswith(_NEGATIVE))
    line = (f"{found[0]} is negative: not a measurement; the value is left empty" if len(found) == 1 else
            f"{', '.join(found[:-1])} and {found[-1]} are negative: not a measurement; the values are left empty")
    rest = [w for w in rec.warnings if not w.startswith(_NEGATIVE)]
    rec.warnings = rest[:first] + [line] + rest[first:]


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
        self.cleaner = LineCleaner()
        self.bench = BenchParser()
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
                fill_from_bench(rec, bench_fmt, rows, total)
            elif rec.found_anything:
                rec.source_format = "image-lines-only"
                rec.warnings.append("vision-encoder lines only: no perf block (run interrupted, or log level too low)")
            else:
                rec.warnings.append("no llama.cpp timing lines found")


def parse_lines(raw_lines: Iterable[str]) -> TimingRecord:
    """The record of a stream of raw lines; never raises (a parser bug becomes a warning)."""
    rec = TimingRecord()
    parser = _Parser()
    try:
        parser.feed(raw_lines)
        parser.finish(rec)
    except Exception as e:  # a parser bug must not take a benchmark run down with it
        rec.warnings.append(f"parser error ({type(e).__name__}: {e}); record may be partial")
    _merge_negatives(rec)
    rec.missing = [f for f in FIELDS if getattr(rec, f) is None]
    return rec


def parse_text(text: str | bytes) -> TimingRecord:
    """Parse merged stdout+stderr of a llama.cpp program (or llama-bench output); never raises."""
    if isinstance(text, (bytes, bytearray)):
        text = decode(bytes(text))
    if not isinstance(text, str):
        rec = TimingRecord(warnings=["empty input"])
        rec.missing = list(FIELDS)
        return rec
    return parse_lines(split_lines(text_chunks(text)))


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
        set_finite(rec, "load_ms", e.ms, "load time")
    if e := by_key.get("sample"):
        set_finite(rec, "sample_ms", e.ms, "sample time")
        set_finite(rec, "sample_runs", e.n, "sample count")
        set_finite(rec, "sample_tps", e.tps, "sample tok/s")
    if e := by_key.get("prompt"):
        set_finite(rec, "prompt_eval_ms", e.ms, "prompt eval time")
        set_finite(rec, "prompt_tokens", e.n, "prompt token count")
        set_finite(rec, "prompt_tps", e.tps, "prompt eval tok/s")
    if e := by_key.get("eval"):
        set_finite(rec, "eval_ms", e.ms, "eval time")
        set_finite(rec, "eval_runs", e.n, "eval count")
        set_finite(rec, "eval_tps", e.tps, "eval tok/s")
    if e := by_key.get("total"):
        set_finite(rec, "total_ms", e.ms, "total time")
        set_finite(rec, "total_tokens", e.n, "total token count")
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


def fill_from_bench(rec: TimingRecord, fmt: str | None, rows: list[dict[str, Any]], total: int | None = None) -> None:
    """Map llama-bench rows onto the record: the last configuration's pp row and tg row."""
    rec.source_format = fmt or "llama-bench"

    def config(r: dict[str, Any]) -> str:
        return json.dumps({k: v for k, v in r.items() if k not in PER_TEST_FIELDS}, sort_keys=True, default=str)

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
        set_finite(rec, "prompt_tps", r.get("avg_ts"), "llama-bench pp avg_ts")
        set_finite(rec, "prompt_eval_ms", ms(r, rec.prompt_tokens), "llama-bench pp time")
        used.append(r)
    if tg:
        r = tg[-1]
        rec.eval_runs = int(r["n_gen"])
        set_finite(rec, "eval_tps", r.get("avg_ts"), "llama-bench tg avg_ts")
        set_finite(rec, "eval_ms", ms(r, rec.eval_runs), "llama-bench tg time")
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
            yield from file_chunks(f)
        except OSError as e:
            read_error.append(e)

    with f:
        rec = parse_lines(split_lines(chunks()))
    if read_error:
        e = read_error[0]
        raise MvlmError(f"cannot read {p}: {e.strerror or e}; check the file and the disk it is on") from None
    return rec


