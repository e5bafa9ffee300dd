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
* ``llama-bench-md`` / ``-csv`` / ``-json`` / ``-jsonl``: llama-bench tables (see :func:`parse_llama_bench`).
* ``image-lines-only``: only vision-encoder lines (a run killed before its perf block).

Handled anywhere in the stream: timestamp/level prefixes (``0.08.700.664 I ``), ANSI colour codes, JSONL log
lines (``--log-jsonl``), decimal commas (pre-``setlocale`` builds), ``inf``/``nan`` (and MSVC ``1.#INF``), lines
of generated text glued in front of a timing line, UTF-16 files (PowerShell redirection), several perf blocks
(the last complete one wins), the vision-encoder lines of llava-cli and mtmd.

Usage::

    from mvlm_bench.timings import parse_file, parse_text, parse_llama_bench
    rec = parse_file("run.log")
    rec.eval_tps, rec.prompt_tokens, rec.missing, rec.warnings
    rows = parse_llama_bench(open("bench.json").read())   # list of dicts keyed by llama-bench field names
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


# --- line cleaning ------------------------------------------------------------------------------------------------
_ANSI = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_CTRL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")


def _decode(data: bytes) -> str:
    """Bytes → text. UTF-16 with BOM is what Windows PowerShell's ``>`` writes; everything else as UTF-8."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.decode("utf-8", errors="replace")


def _clean_lines(text: str) -> list[str]:
    """Split into lines with colour codes and control bytes removed; unwrap ``--log-jsonl`` records."""
    out: list[str] = []
    for raw in _ANSI.sub("", text).splitlines():
        line = _CTRL.sub("", raw)
        s = line.strip()
        if s.startswith("{") and '"msg"' in s:
            try:
                obj = json.loads(s)
            except ValueError:
                obj = None
            if isinstance(obj, dict) and isinstance(obj.get("msg"), str):
                out.extend(_CTRL.sub("", x) for x in obj["msg"].splitlines())
                continue
        out.append(line)
    return out


# --- perf lines ---------------------------------------------------------------------------------------------------
# "<function>: <what> time = X ms [/ N runs|tokens|%] [( Y ms per token|run [, Z tokens per second] )]"
# Not anchored: a timestamp/level prefix or a piece of generated text may precede the function name.
_PERF = re.compile(
    r"(?P<fn>[A-Za-z_]\w*):\s+(?P<what>load|sample|sampling|samplers|prompt eval|eval|predict|total|unaccounted)"
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


def _group_blocks(entries: list[_Entry]) -> list[list[_Entry]]:
    """Perf lines, in order, form blocks; a quantity seen twice starts the next block.

    Other text between perf lines does not split a block: merged stdout (buffered) and stderr interleave freely.
    """
    blocks: list[list[_Entry]] = []
    cur: list[_Entry] = []
    for e in entries:
        if any(x.key == e.key for x in cur):
            blocks.append(cur)
            cur = []
        cur.append(e)
    if cur:
        blocks.append(cur)
    return blocks


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
    encode_ms: list[float] = field(default_factory=list)
    per_patch: list[float] = field(default_factory=list)
    created_tokens: list[int] = field(default_factory=list)
    batch_tokens: list[int] = field(default_factory=list)


def _image_lines(lines: list[str], lo: int, hi: int) -> _Image:
    img = _Image()
    for line in lines[lo:hi]:
        if "image" not in line.lower() and "mtmd" not in line.lower():
            continue
        for rx in (_CLIP, _SLICE, _MTMD_BATCH):
            m = rx.search(line)
            if m:
                v = _num(m["ms"])
                if v is not None and math.isfinite(v):
                    img.encode_ms.append(v)
                if rx is _CLIP and m["per"] is not None:
                    p = _num(m["per"])
                    if p is not None and math.isfinite(p):
                        img.per_patch.append(p)
                break
        if m := _EMB_CREATED.search(line):
            img.created_tokens.append(int(m["n"]))
        elif m := _DECODING.search(line):
            img.batch_tokens.append(int(m["n"]))
    return img


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


def parse_text(text: str | bytes) -> TimingRecord:
    """Parse merged stdout+stderr of a llama.cpp program (or llama-bench output); never raises."""
    rec = TimingRecord()
    try:
        _parse_into(rec, text)
    except Exception as e:  # a parser bug must not take a benchmark run down with it
        rec.warnings.append(f"parser error ({type(e).__name__}: {e}); record may be partial")
    rec.missing = [f for f in FIELDS if getattr(rec, f) is None]
    return rec


def _parse_into(rec: TimingRecord, text: str | bytes) -> None:
    if isinstance(text, (bytes, bytearray)):
        text = _decode(bytes(text))
    if not isinstance(text, str) or not text.strip():
        rec.warnings.append("empty input")
        return
    lines = _clean_lines(text)
    entries = [e for i, line in enumerate(lines) if (e := _perf_entry(i, line)) is not None]
    blocks = _group_blocks(entries)

    chosen_idx: int | None = None
    for idx in range(len(blocks) - 1, -1, -1):
        if _complete(blocks[idx]):
            chosen_idx = idx
            break
    if chosen_idx is None and blocks:
        chosen_idx = len(blocks) - 1
        rec.warnings.append("no complete timing block (total plus prompt eval or eval): using the last, partial one")
    if chosen_idx is not None:
        if chosen_idx != len(blocks) - 1:
            rec.warnings.append(
                f"{len(blocks) - 1 - chosen_idx} incomplete timing block(s) after the last complete one were ignored"
            )
        if len(blocks) > 1:
            rec.warnings.append(f"{len(blocks)} timing blocks found: using block {chosen_idx + 1}")
        _fill_from_block(rec, blocks[chosen_idx])
        # Image lines that belong to this run: after the previous block, up to this block's end (to the end of
        # the text for the last block: buffered stdout may flush mtmd's lines after the stderr perf block).
        lo = blocks[chosen_idx - 1][-1].line + 1 if chosen_idx > 0 else 0
        hi = blocks[chosen_idx][-1].line + 1 if chosen_idx < len(blocks) - 1 else len(lines)
    else:
        lo, hi = 0, len(lines)

    img = _image_lines(lines, lo, hi)
    _fill_image(rec, img)

    if chosen_idx is None:
        bench_fmt, rows = _parse_llama_bench(lines)
        if rows:
            _fill_from_bench(rec, bench_fmt, rows)
        elif rec.found_anything:
            rec.source_format = "image-lines-only"
            rec.warnings.append("vision-encoder lines only: no perf block (run interrupted, or log level too low)")
        else:
            rec.warnings.append("no llama.cpp timing lines found")


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
    if img.encode_ms:
        rec.vision_encode_ms = sum(img.encode_ms)
    if img.created_tokens:
        rec.image_tokens = sum(img.created_tokens)
    elif img.batch_tokens:
        rec.image_tokens = sum(img.batch_tokens)
    if len(img.per_patch) == 1 and len(img.encode_ms) == 1:
        rec.vision_ms_per_token = img.per_patch[0]
    elif rec.vision_encode_ms is not None and rec.image_tokens:
        rec.vision_ms_per_token = rec.vision_encode_ms / rec.image_tokens
    if len(img.encode_ms) > 1:
        rec.warnings.append(f"{len(img.encode_ms)} vision encodes: vision_encode_ms is their sum")


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
    m = _TEST_RE.match(test)
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


def _parse_md(lines: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    table_rows: list[dict[str, Any]] = []  # rows of tables not yet given a build footer
    header: list[str] | None = None
    for line in lines:
        s = line.strip()
        if s.startswith("|") and s.count("|") >= 3:
            cells = _split_md(s)
            if header is None:
                if "t/s" in cells and "test" in cells:
                    header = cells
                continue
            if all(re.fullmatch(r":?-+:?", c) for c in cells if c):
                continue
            if len(cells) != len(header):
                continue
            row: dict[str, Any] = {}
            for name, cell in zip(header, cells, strict=True):
                key = _MD_NAMES.get(name, name)
                if name in ("size", "params"):
                    row[key] = _md_size(cell, name)
                elif name == "t/s":
                    parts = re.split(r"\s*(?:±|\+-|\+/-|Â±)\s*", cell)
                    row["avg_ts"] = _num(parts[0])
                    if len(parts) > 1:
                        row["stddev_ts"] = _num(parts[1])
                elif name == "test":
                    row["test"] = cell
                    row.update(_test_counts(cell))
                else:
                    row[key] = _scalar(cell)
            if isinstance(row.get("avg_ts"), float):  # a row without a rate is a repeated header or junk
                table_rows.append(row)
            continue
        header = None if not s.startswith("|") else header
        if m := re.match(r"build:\s*(?P<c>[0-9a-fA-F]+|unknown)\s*\((?P<n>\d+)\)", s):
            for r in table_rows:
                r.setdefault("build_commit", m["c"])
                r.setdefault("build_number", int(m["n"]))
            rows.extend(table_rows)
            table_rows = []
    rows.extend(table_rows)
    return rows


def _is_bench_record(obj: Any) -> bool:
    return isinstance(obj, dict) and ("avg_ts" in obj or "avg_ns" in obj) and ("n_prompt" in obj or "n_gen" in obj)


def _parse_json(text: str) -> list[dict[str, Any]]:
    dec = json.JSONDecoder()
    for m in re.finditer(r"^\s*\[", text, re.M):
        try:
            obj, _ = dec.raw_decode(text, m.end() - 1)
        except ValueError:
            continue
        if isinstance(obj, list) and obj and all(_is_bench_record(o) for o in obj):
            return obj
    return []


def _parse_jsonl(lines: list[str]) -> list[dict[str, Any]]:
    rows = []
    for line in lines:
        s = line.strip()
        if not s.startswith("{"):
            continue
        try:
            obj = json.loads(s)
        except ValueError:
            continue
        if _is_bench_record(obj):
            rows.append(obj)
    return rows


def _parse_csv(lines: list[str]) -> list[dict[str, Any]]:
    for i, line in enumerate(lines):
        if "avg_ts" in line and ("n_prompt" in line or "n_gen" in line) and "," in line and "|" not in line:
            header = next(csv.reader([line.strip()]))
            rows = []
            for values in csv.reader(io.StringIO("\n".join(lines[i + 1 :]))):
                if len(values) != len(header):
                    if rows:
                        break
                    continue
                rows.append({k: _scalar(v) for k, v in zip(header, values, strict=True)})
            return rows
    return []


def _parse_llama_bench(lines: list[str]) -> tuple[str | None, list[dict[str, Any]]]:
    text = "\n".join(lines)
    if rows := _parse_json(text):
        return "llama-bench-json", rows
    if rows := _parse_jsonl(lines):
        return "llama-bench-jsonl", rows
    if rows := _parse_md(lines):
        return "llama-bench-md", rows
    if rows := _parse_csv(lines):
        return "llama-bench-csv", rows
    return None, []


def parse_llama_bench(text: str | bytes) -> list[dict[str, Any]]:
    """llama-bench output (md, csv, json or jsonl; stderr lines around it are fine) → one dict per test.

    Keys are llama-bench's JSON field names (``n_prompt``, ``n_gen``, ``n_depth``, ``avg_ts``, ``stddev_ts``,
    ``model_type``, ``n_threads``, ...). Markdown rows also keep ``test`` (``pp512``, old ``pp 512``,
    ``pp512+tg128``, ``tg32 @ d512``) and get ``build_commit``/``build_number`` from the ``build:`` footer.
    Whatever columns a version prints are kept; none is required. Never raises: garbage gives ``[]``.
    """
    try:
        if isinstance(text, (bytes, bytearray)):
            text = _decode(bytes(text))
        return _parse_llama_bench(_clean_lines(text))[1]
    except Exception:  # never let a malformed table escape as an exception
        return []


def _fill_from_bench(rec: TimingRecord, fmt: str | None, rows: list[dict[str, Any]]) -> None:
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
    if len(rows) > len(used):
        names = ", ".join(str(r.get("test") or f"pp{r.get('n_prompt', 0)}/tg{r.get('n_gen', 0)}") for r in used)
        rec.warnings.append(
            f"llama-bench: {len(rows)} rows; the record holds {names or 'none'} of the last configuration "
            "(use parse_llama_bench for every row)"
        )
    if any((r.get("n_depth") or 0) > 0 for r in used):
        rec.warnings.append("llama-bench: the rows used were measured at a non-zero depth (n_depth)")


def parse_file(path: str | Path) -> TimingRecord:
    """Read a saved log and parse it. An unreadable file is the user's to fix: MvlmError, one line."""
    from mvlm_convert.errors import MvlmError

    p = Path(path)
    try:
        data = p.read_bytes()
    except IsADirectoryError:
        raise MvlmError(f"{p} is a directory: pass a saved llama.cpp output file") from None
    except FileNotFoundError:
        raise MvlmError(f"{p} does not exist: pass a saved llama.cpp output file") from None
    except OSError as e:
        raise MvlmError(f"cannot read {p}: {e.strerror or e}; check the path and its permissions") from None
    return parse_text(_decode(data))
