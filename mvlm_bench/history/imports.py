"""Reading measurements from files: ``mvlm bench --json-file`` reports, the spill files of a failed save, and
llama-bench's own output (json, jsonl, sql, csv, md: one entry per configuration, each test a metric)."""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mvlm_bench.history.entries import Entry, entry_from_record, lenient_time, normalise_time, project_commit
from mvlm_bench.records.columns import finite
from mvlm_bench.records.record import RunContext
from mvlm_core import jsontext
from mvlm_core.errors import MvlmError


def bench_metric(r: dict[str, Any]) -> str:
    """The metric a llama-bench test row measures: ``pp512_tps``, ``tg128_tps``, ``pp512+tg128_tps``, ``@d512``."""
    n_p, n_g, n_d = (int(r.get(k) or 0) for k in ("n_prompt", "n_gen", "n_depth"))
    key = f"pp{n_p}" if n_g == 0 else (f"tg{n_g}" if n_p == 0 else f"pp{n_p}+tg{n_g}")
    return key + (f"@d{n_d}" if n_d else "") + "_tps"


def entry_from_llama_bench(rows: Sequence[dict[str, Any]], context: RunContext, label: str = "",
                           project: tuple[str, bool | None] | None = None) -> Entry:
    """llama-bench test rows of ONE configuration as one Entry: metric ``pp64_tps`` / ``tg128_tps`` (one value per
    sample: ``samples_ts``, else ``avg_ts``; a test that comes again, in a file of several runs, adds its samples).
    The one plain pp test (no tg, no depth), when there is exactly one, is also ``prompt_tps``, and the one plain tg
    test ``eval_tps``: the metrics `mvlm history` shows and the gate judges."""
    commit, dirty = project if project is not None else project_commit()
    samples: dict[str, list[float | None]] = {}
    plain: dict[str, list[str]] = {"prompt_tps": [], "eval_tps": []}
    for r in rows:
        vals = r.get("samples_ts") or ([r["avg_ts"]] if r.get("avg_ts") is not None else [])
        if not isinstance(vals, list):
            raise ValueError("'samples_ts' is not a list")
        key = bench_metric(r)
        samples.setdefault(key, []).extend(finite(v) for v in vals)  # the same test again: more repetitions
        if re.fullmatch(r"pp\d+_tps", key):
            plain["prompt_tps"].append(key)
        elif re.fullmatch(r"tg\d+_tps", key):
            plain["eval_tps"].append(key)
    for alias, keys in plain.items():
        if len(set(keys)) == 1 and alias not in samples:
            samples[alias] = list(samples[keys[0]])
    return Entry(context=context, samples=samples, label=label, project_commit=commit, project_dirty=dirty)




BENCH_TEST_FIELDS = {"n_prompt", "n_gen", "n_depth", "test", "test_time", "avg_ns", "stddev_ns", "avg_ts",
                      "stddev_ts", "samples_ns", "samples_ts"}  # fmt: skip
# llama-bench fields kept in an entry's params: what makes two llama-bench configurations different
BENCH_PARAMS = ("n_batch", "n_ubatch", "n_threads", "type_k", "type_v", "n_gpu_layers", "split_mode", "main_gpu",
                 "no_kv_offload", "flash_attn", "tensor_split", "embeddings", "cpu_mask", "cpu_strict", "poll",
                 "n_cpu_moe", "devices", "load_mode", "use_mmap", "backends", "model_type", "model_n_params",
                 "fit_target", "fit_min_ctx", "build_number")  # fmt: skip


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_bench_row(r: dict[str, Any], i: int, path: Path) -> None:
    """A llama-bench row holds what llama-bench writes: a test (pp, tg or both; counts that are whole and not
    negative), at least one sample, samples and averages that are finite numbers (never negative; as many ns as t/s),
    an ISO 8601 ``test_time``, integers within 64 bits, valid Unicode; anything else is refused in one line (nothing
    stored)."""
    def bad(why: str) -> MvlmError:
        return MvlmError(f"{path}: llama-bench row {i} {why}: pass the file llama-bench wrote, unedited; nothing was "
                         "imported")

    if "test" in r and "n_prompt" not in r and "n_gen" not in r:  # a Markdown row whose test did not read
        raise bad(f"has test {str(r['test'])[:30]!r}, not a llama-bench test (pp512, tg128, pp512+tg128, tg128 @ d512)")
    for k in ("n_prompt", "n_gen", "n_depth"):
        v = r.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise bad(f"has {k} = {str(v)[:30]}, not a count")
    if not r.get("n_prompt") and not r.get("n_gen"):
        raise bad("names no test (n_prompt and n_gen are both 0 or missing)")
    for k in ("samples_ts", "samples_ns"):
        vs = r.get(k)
        if vs is None:
            continue
        if not isinstance(vs, list) or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in vs):
            raise bad(f"has {k} with values that are not numbers")
        if not all(_is_number(v) for v in vs):
            raise bad(f"has {k} with a value that is not a finite number (nan or inf)")
        if not vs:
            raise bad(f"has no samples ({k} is empty): llama-bench ran no repetition of this test")
        if any(v <= 0 for v in vs):
            raise bad(f"has {'a negative value' if any(v < 0 for v in vs) else 'a zero'} in {k}: not a speed or a "
                      "duration")
    ts, ns = r.get("samples_ts"), r.get("samples_ns")
    if isinstance(ts, list) and isinstance(ns, list) and len(ts) != len(ns):
        raise bad(f"has {len(ts)} samples_ts but {len(ns)} samples_ns (one of each per repetition)")
    for k in ("avg_ts", "avg_ns", "stddev_ts", "stddev_ns"):
        v = r.get(k)
        if v is None:
            continue
        if not _is_number(v):
            raise bad(f"has {k} = {str(v)[:30]}, not a finite number")
        if v < 0:
            raise bad(f"has {k} = {v:g}: a speed or a duration is never negative")
    if r.get("samples_ts") is None and not r.get("avg_ts"):
        avg = "avg_ts = 0" if r.get("avg_ts") is not None else "no avg_ts"
        raise bad(f"has no samples (no samples_ts and {avg}): llama-bench ran no repetition of this test")
    t = r.get("test_time")
    if t not in (None, ""):
        try:
            if not isinstance(t, str):
                raise ValueError
            normalise_time(t)
        except ValueError:
            raise bad(f"has test_time = {str(t)[:40]!r}, not an ISO 8601 time (llama-bench writes 2026-01-31T12:00:00Z)"
                      ) from None
    for k, v in r.items():
        if isinstance(v, int) and not isinstance(v, bool) and not -(1 << 63) <= v < 1 << 63:
            raise bad(f"has {k} = {str(v)[:24]}..., beyond 64 bits")
        for text in (k, v) if isinstance(v, str) else (k,):
            try:
                str(text).encode("utf-8")
            except UnicodeEncodeError:
                raise bad(f"has text that is not valid Unicode in {str(k)[:30]!r}") from None


MAX_DEVICE = 100


def check_device(device: str | None) -> None:
    """``--device`` of an import: one line of text, like a label (MvlmError otherwise)."""
    if device is None:
        return
    if not device.strip() or len(device) > MAX_DEVICE or any(ord(c) < 32 or 0x7f <= ord(c) < 0xa0 for c in device):
        what = "empty" if not device.strip() else (f"{len(device)} characters" if len(device) > MAX_DEVICE else
                                                   f"{device[:40]!r}, with a control character (a line break?)")
        raise MvlmError(f"--device is {what}: give the device's name, one line of at most {MAX_DEVICE} characters "
                        "(e.g. orin, sd8gen3); nothing was imported")


def entries_from_bench_rows(rows: list[dict[str, Any]], path: Path, device: str | None = None,
                            refuse_repeats: bool = False, need_device: bool = False) -> list[Entry]:
    """llama-bench test rows as entries: one per configuration (model, build, threads, batch sizes, ... : every field
    but the test's own), each test a metric whose values are its samples (see :func:`entry_from_llama_bench`).
    ``device``: the name to store them under (None: llama-bench's cpu_info, then gpu_info; with ``need_device``
    (the import), rows with neither are refused, saying to pass ``--device``). ``refuse_repeats``: a row equal
    to an earlier one is refused (llama-bench's -o json: each test once, at its own time; the line formats are checked
    line by line as they are read)."""
    check_device(device)
    groups: dict[str, list[dict[str, Any]]] = {}
    seen: dict[str, int] = {}
    for i, r in enumerate(rows):
        _check_bench_row(r, i, path)
        if refuse_repeats:
            first = seen.setdefault(json.dumps(r, sort_keys=True, default=str), i)
            if first != i:
                raise MvlmError(f"{path}: llama-bench row {i} repeats row {first} (the same test twice: its samples "
                                "would count twice): remove it and import again; nothing was imported")
        if need_device and device is None and not (r.get("cpu_info") or r.get("gpu_info")):
            raise MvlmError(f"{path}: llama-bench row {i} has an empty cpu_info and gpu_info, so no device to store it "
                            "under: pass --device NAME; nothing was imported")
    named = device
    try:
        for r in rows:
            config = {k: v for k, v in r.items() if k not in BENCH_TEST_FIELDS}
            groups.setdefault(json.dumps(config, sort_keys=True, default=str), []).append(r)
        out = []
        for i, rs in enumerate(groups.values()):
            r0 = rs[0]
            name = str(r0.get("model_filename") or "").replace("\\", "/").rsplit("/", 1)[-1]
            params = {k: r0[k] for k in BENCH_PARAMS if k in r0}
            size = r0.get("model_size")
            ctx = RunContext(device=named or str(r0.get("cpu_info") or r0.get("gpu_info") or ""),
                             model=name.removesuffix(".gguf") or str(r0.get("model_type") or ""),
                             model_file=name, size_bytes=size if isinstance(size, int) and not isinstance(size, bool)
                             else None, runtime_commit=str(r0.get("build_commit") or ""), protocol="llama-bench",
                             cpu_info=str(r0.get("cpu_info") or ""), gpu_info=str(r0.get("gpu_info") or ""),
                             params=params)
            e = entry_from_llama_bench(rs, ctx, project=("", None))
            e.created_at = min((t for t in map(lenient_time, rs) if t), default="")
            e.source = f"{path}[{i}]" if len(groups) > 1 else str(path)
            out.append(e)
    except (TypeError, ValueError, AttributeError) as exc:
        raise MvlmError(f"{path}: llama-bench rows with unexpected values ({exc}): pass the file llama-bench wrote, "
                        "unedited") from None
    return out


# The largest report read (it is parsed whole): a report of the most rows one import stores is about half of it.
MAX_REPORT_BYTES = 256 << 20


def check_report_file(path: Path, todo: str = "pass a JSON file written by `mvlm bench --json-file` or llama-bench") -> None:
    """Refuse, in one line, a report path that is missing or not a regular file (a FIFO would block the read forever,
    /dev/zero would never end); ``todo``: what to pass instead."""
    from mvlm_core.atomic import file_kind

    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MvlmError(f"{path} does not exist: {todo}") from None
    except OSError as e:
        raise MvlmError(f"cannot read {path}: {e.strerror or e}; {todo}") from None
    if not stat.S_ISREG(st.st_mode):
        raise MvlmError(f"{path} is {file_kind(path)}, not a file: {todo}")
    if st.st_size > MAX_REPORT_BYTES:  # read whole to parse: its size bounds what reading it costs
        raise MvlmError(f"{path} is {st.st_size} bytes, more than a report can be ({MAX_REPORT_BYTES >> 20} MiB); "
                        "split it and pass the parts")


def entries_from_json(path: Path, device: str | None = None, need_device: bool = False) -> list[Entry]:
    """Entries from a file written by ``mvlm bench --json-file`` (papers' protocols or llama-bench rows), by
    :func:`save_or_spill`, or by llama-bench itself (``-o json``/``jsonl``/``sql``/``csv``/``md``: one entry per
    configuration). ``device``: the device name for llama-bench rows (which only know cpu_info/gpu_info; see
    :func:`entries_from_bench_rows`)."""
    path = Path(path)
    check_device(device)
    check_report_file(path)
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except IsADirectoryError:
        raise MvlmError(f"{path} is a directory: pass a JSON file written by `mvlm bench --json-file`") from None
    except OSError as e:
        raise MvlmError(f"cannot read benchmark JSON {path}: {e.strerror or e}") from None
    stripped = head.lstrip()
    if stripped.startswith(b"\xef\xbb\xbf"):
        stripped = stripped[3:].lstrip()
    if not stripped.startswith((b"[", b"{")):
        return bench_file(path, device, need_device)  # llama-bench md / csv / sql (or else: a one-line refusal)
    try:
        data = jsontext.loads(path.read_bytes())
    except jsontext.NotJson as e:
        if stripped.startswith(b"{"):  # JSON lines: mvlm bench --jsonl, or llama-bench -o jsonl
            lines = _mvlm_json_lines(path)
            return lines if lines is not None else bench_file(path, device, need_device)
        raise MvlmError(f"cannot read benchmark JSON {path}: {e}: pass a file written by `mvlm bench --json-file`") from None
    except jsontext.JsonError as e:
        raise MvlmError(f"{path} is refused: {e}; pass a report mvlm or llama-bench wrote, unedited") from None
    except (OSError, MemoryError) as e:
        raise MvlmError(f"cannot read benchmark JSON {path}: {e}") from None
    if isinstance(data, dict):
        data = [data]
    if isinstance(data, list) and not data:
        raise MvlmError(f"{path} holds no records (an empty JSON list): nothing to read; pass a report written by "
                        "`mvlm bench --json-file` that has measurements")
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise MvlmError(f"{path} is not a report written by `mvlm bench --json-file` (expected a list of records)")
    if all("runs" not in r and ("samples_ts" in r or "avg_ts" in r) for r in data):  # llama-bench's own rows
        return entries_from_bench_rows(data, path, device, refuse_repeats=True, need_device=need_device)
    out = []
    for i, r in enumerate(data):
        if "runs" not in r:
            raise MvlmError(f"{path}: record {i} has no per-repetition 'runs': write it with `mvlm bench --json-file`")
        source = f"{path}[{i}]" if len(data) > 1 else str(path)
        try:
            out.append(entry_from_record(r, source))
        except ValueError as e:
            raise MvlmError(f"{path}: record {i} is malformed ({e}): pass a file written by `mvlm bench --json-file`, "
                            "unedited") from None
    return out


def _mvlm_json_lines(path: Path) -> list[Entry] | None:
    """``mvlm bench --jsonl``: one record per repetition; the lines of one bench's configuration (equal context,
    label, commit and ``session``) become one entry, in line order, exactly as ``--save`` stores them. A file that
    several benches appended to gives one entry per bench: by ``session``, and in files written before it was
    recorded, a repetition index that starts again. A line that is not a record (cut short, edited) or that repeats
    another is refused in one line and nothing is imported. None when the file is not mvlm's JSON Lines."""
    records: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    bad = None
    bench_row = False  # the first line that is not a record is one of llama-bench's rows
    first_record = 0
    with open(path, "rb") as f:
        raw = f.read().decode("utf-8", errors="replace").splitlines()
    for n, line in enumerate(raw, 1):
        if not line.strip():
            continue
        try:
            obj = jsontext.loads(line)
        except jsontext.NotJson:
            obj = None
        except jsontext.JsonError as e:
            raise MvlmError(f"{path}: line {n} is refused: {e}; nothing was imported") from None
        if not isinstance(obj, dict) or "runs" not in obj:
            if bad is None:
                bad, bench_row = n, isinstance(obj, dict) and ("avg_ts" in obj or "avg_ns" in obj)
            continue
        if line.strip() in seen:
            raise MvlmError(f"{path}: line {n} repeats line {seen[line.strip()]} (the same repetition twice): remove it "
                            "and import again; nothing was imported")
        seen[line.strip()] = n
        records.append(obj)
        first_record = first_record or n
    if not records:
        return None
    if bad is not None and bench_row:
        raise MvlmError(f"{path}: line {first_record} is an mvlm bench record and line {bad} a llama-bench row: a file "
                        "holds one kind or the other; import them from separate files; nothing was imported")
    if bad is not None:
        raise MvlmError(f"{path}: line {bad} is not an mvlm bench record ({'cut short' if bad == len(raw) else 'edited'}"
                        "?): remove it and import again; nothing was imported")
    return [_json_lines_entry(rs, path, i, len(chunks)) for chunks in [_sessions(records)]
            for i, rs in enumerate(chunks)]


def _sessions(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The records of each bench's configuration, in file order."""
    groups: dict[str, list[list[dict[str, Any]]]] = {}
    last: dict[str, int] = {}
    for r in records:
        key = json.dumps({k: v for k, v in r.items() if k not in _PER_REPETITION}, sort_keys=True, default=str)
        runs = r["runs"] if isinstance(r["runs"], list) else []
        rep = runs[0].get("repetition") if runs and isinstance(runs[0], dict) else None
        rep = rep if isinstance(rep, int) and not isinstance(rep, bool) else None
        if key not in groups or (rep is not None and rep <= last.get(key, -1)):
            groups.setdefault(key, []).append([])  # a new bench of the same configuration starts again at 0
        groups[key][-1].append(r)
        last[key] = rep if rep is not None else last.get(key, -1) + 1
    return [chunk for chunks in groups.values() for chunk in chunks]


def _json_lines_entry(rs: list[dict[str, Any]], path: Path, i: int, n: int) -> Entry:
    merged = dict(rs[0]) | {"runs": [run for r in rs for run in r["runs"]], "repetitions": len(rs)}
    try:
        return entry_from_record(merged, f"{path}[{i}]" if n > 1 else str(path))
    except ValueError as e:
        raise MvlmError(f"{path}: the lines of configuration {i} are malformed ({e}): pass the file `mvlm bench "
                        "--jsonl` wrote, unedited") from None


# fields of an mvlm record that belong to one repetition (the rest say which configuration it is)
_PER_REPETITION = {"runs", "repetitions", "metrics", "test_time", "start_time", "end_time", "avg_ns", "stddev_ns",
                   "avg_ts", "stddev_ts", "samples_ns", "samples_ts", "noisy", "noisy_cv"}


def bench_file(path: Path, device: str | None = None, need_device: bool = False) -> list[Entry]:
    """llama-bench output in any format it writes, as entries; anything else is a one-line refusal."""
    from mvlm_bench.records.llama_bench_output import IMPORT_MAX_JSON_CHARS, IMPORT_MAX_ROWS, read_bench_rows
    from mvlm_bench.records.log_facts import describe_content
    from mvlm_bench.records.timings import parse_file

    rec = parse_file(path)
    if rec.source_format.startswith("llama-bench-"):
        try:
            found = read_bench_rows(path, IMPORT_MAX_ROWS + 1, IMPORT_MAX_JSON_CHARS, IMPORT_MAX_JSON_CHARS)
        except OSError as e:
            raise MvlmError(f"{path}: cannot be read ({e.strerror or e})") from None
        if found.count > IMPORT_MAX_ROWS:
            raise MvlmError(f"{path} has {found.count} llama-bench rows (or more); one import stores at most "
                            f"{IMPORT_MAX_ROWS}, every one or none: split the file and import the parts")
        if found.json_too_big and not found.rows:
            raise MvlmError(f"{path} holds a JSON array larger than {IMPORT_MAX_JSON_CHARS >> 20} MiB: write "
                            "llama-bench's output as -o jsonl (one row per line) and import that")
        if found.rows and found.rejected is not None:
            line, what = found.rejected
            raise MvlmError(f"{path}: line {line} is {what} (edited or cut short?): every row is imported or none; "
                            "remove that line and import again")
        if found.rows:
            return entries_from_bench_rows(found.rows, path, device, need_device=need_device)
    if rec.source_format not in ("unrecognised", "image-lines-only"):
        what = f"the timings of one llama.cpp run ({rec.source_format})"
    else:
        what = describe_content(path)
    raise MvlmError(f"{path} is not a benchmark report (found {what}): pass a file written by `mvlm bench --json-file` "
                    "or by llama-bench (-o json, jsonl, sql, csv or md), or a history selector such as latest")


