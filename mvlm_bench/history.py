"""The benchmark history: every stored ``mvlm bench`` measurement, with every repetition, in one SQLite file.

A regression gate needs a baseline it can trust, and a person chasing a slowdown needs to know what exactly was
measured months ago. So an entry keeps the whole context (device, llama.cpp commit + patches, model file + sha256,
protocol, parameters), mvlm's own git commit when known (:func:`project_commit`), a free-form label, a UTC timestamp,
and the metrics of EACH repetition (never only a mean: the statistics in :mod:`mvlm_bench.compare` need the spread).

Where it is: ``--db``, else ``$MVLM_HISTORY``, else ``./mvlm-history.sqlite`` (the current directory, i.e. next to the
project when run from its root; CI caches or uploads this one file). Either is a SQLite path or a PostgreSQL URL
(``postgresql://user@host:port/db``, psycopg 3: a lab's shared history, see docs/lab.md); :mod:`mvlm_bench.store`
is the seam, and both backends run the same SQL.

Schema: tables ``entry`` (one row per measurement), ``repetition`` (timing record per repetition), ``sample``
(one row per repetition and metric, for queries and plots) and ``schema_version`` (one row per applied step; the
highest is the version, :data:`SCHEMA_VERSION`; a SQLite file mirrors it in ``PRAGMA user_version``, so an older mvlm
refuses a newer file). Opening an older history runs the steps in :data:`MIGRATIONS` (version N -> N+1) in one
transaction (a file from before the version table is version 1 by its ``user_version``); a newer history, one with a
gap in the migrations, or a SQLite file or PostgreSQL database that is not a history, is a clear error, never
silently rewritten.

Selectors (``mvlm compare``, ``--baseline``): ``latest``, ``latest~N`` (N entries before the latest), ``id:N`` (or a
bare number), ``label:NAME``, ``commit:PREFIX`` (mvlm's own git commit), ``runtime:PREFIX`` (llama.cpp commit);
``label:`` / ``commit:`` / ``runtime:`` take a ``~N`` suffix too. ``--device/--model/--protocol`` narrow the search,
and a baseline chosen relative to a candidate is looked for among entries of the same setup (see :func:`setup_key`).

Faults: a file that is not a history (random bytes, text, a truncated or damaged database, another program's SQLite
file, a directory, a read-only or locked file) is one :class:`HistoryError` line naming the file and what to do,
never a traceback. A write (one or several entries) is one transaction, so a failed save leaves a good history as
it was. :func:`save_or_spill` never loses a measurement: when the history cannot take it, the entries go to a JSON
file beside it (``<db>.unsaved-<UTC time>.json``; the current directory, then the temporary directory, when that
cannot be written) that ``mvlm compare`` reads and ``mvlm history import`` stores later. A lock held by another
process is waited for ``$MVLM_HISTORY_LOCK_TIMEOUT`` seconds (default 5; also the PostgreSQL connect timeout). A
PostgreSQL server that cannot be reached is one line (``cannot connect to postgresql://...: connection refused: ...``,
the URL's password masked), exit 2.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import re
import shlex
import sqlite3
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mvlm_bench import store as stores
from mvlm_bench.records import RunContext
from mvlm_core.errors import MvlmError
from mvlm_core.terminal import visible

DEFAULT_DB_NAME = "mvlm-history.sqlite"
_APP_ID = 0x6D766C6D  # "mvlm": PRAGMA application_id, tells our files from other SQLite files

# Schema text shared by both backends: {pk} {int} {real} are filled per backend (store.ddl). Version 1 is the
# layout of the first release (SQLite only, versioned by PRAGMA user_version); NEVER edit a released step.
_SCHEMA_V1 = """
CREATE TABLE entry (
    id {pk},
    created_at TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    project_commit TEXT NOT NULL DEFAULT '',
    project_dirty {int},
    device TEXT NOT NULL,
    model TEXT NOT NULL,
    precision TEXT NOT NULL DEFAULT '',
    model_file TEXT NOT NULL DEFAULT '',
    model_sha256 TEXT NOT NULL DEFAULT '',
    mmproj_file TEXT NOT NULL DEFAULT '',
    mmproj_sha256 TEXT NOT NULL DEFAULT '',
    size_bytes {int},
    runtime_commit TEXT NOT NULL DEFAULT '',
    runtime_patches TEXT NOT NULL DEFAULT '[]',
    protocol TEXT NOT NULL DEFAULT '',
    cpu_info TEXT NOT NULL DEFAULT '',
    gpu_info TEXT NOT NULL DEFAULT '',
    params TEXT NOT NULL DEFAULT '{}',
    repetitions {int} NOT NULL
);
CREATE INDEX entry_setup ON entry (device, model_sha256, protocol);
CREATE TABLE repetition (
    entry_id {int} NOT NULL REFERENCES entry(id) ON DELETE CASCADE,
    idx {int} NOT NULL,
    timing TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (entry_id, idx)
);
CREATE TABLE sample (
    entry_id {int} NOT NULL REFERENCES entry(id) ON DELETE CASCADE,
    repetition {int} NOT NULL,
    metric TEXT NOT NULL,
    value {real},
    PRIMARY KEY (entry_id, repetition, metric)
);
"""

_SCHEMA_V2 = """
CREATE TABLE schema_version (
    version {int} PRIMARY KEY,
    applied_at TEXT NOT NULL
)
"""

# MIGRATIONS[n] upgrades a version-n history to n+1 inside the opening transaction: schema text for both backends
# (store.ddl) or a callable given the open store (``store.execute(sql, params)``, ``store.kind``). A new history runs
# them all from 0. Add a step and SCHEMA_VERSION follows; never edit a released step.
MIGRATIONS: dict[int, str | Callable[[stores.Store], None]] = {0: _SCHEMA_V1, 1: _SCHEMA_V2}
SCHEMA_VERSION = max(MIGRATIONS) + 1
HISTORY_TABLES = ("entry", "repetition", "sample")

# Params that make two measurements comparable (with device, model hash and protocol); the runtime is NOT among
# them: comparing runtimes is the point.
SETUP_PARAMS = ("n_predict", "n_threads", "n_gpu_layers", "ctx_size", "prompt")

MAX_ID = 2**63 - 1  # SQLite's INTEGER PRIMARY KEY range
DEFAULT_LOCK_TIMEOUT_S = 5.0


class HistoryError(MvlmError):
    """A history file that cannot be used: ``what`` is wrong with it, ``todo`` is what to do (message: both)."""

    def __init__(self, what: str, todo: str = "pass another --db", *, exit_code: int | None = None):
        super().__init__(f"{what}: {todo}", exit_code=exit_code)
        self.what, self.todo = what, todo


def lock_timeout() -> float:
    """Seconds to wait for another process's lock: ``$MVLM_HISTORY_LOCK_TIMEOUT`` or 5."""
    try:
        v = float(os.environ.get("MVLM_HISTORY_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT_S))
    except ValueError:
        return DEFAULT_LOCK_TIMEOUT_S
    return v if math.isfinite(v) and v >= 0 else DEFAULT_LOCK_TIMEOUT_S


def _writable_dir(d: Path) -> bool:
    return d.is_dir() and os.access(d, os.W_OK | os.X_OK)


def db_error(path: Path, exc: BaseException, doing: str = "reading") -> HistoryError:
    """A SQLite (or OS) error on the history file as one line: what is wrong with the file and what to do."""
    msg = str(exc) or type(exc).__name__
    low = msg.lower()
    try:
        is_dir = path.is_dir()
    except OSError:
        is_dir = False
    if is_dir:
        return HistoryError(f"{path} is a directory, not a benchmark history",
                            f"pass a file, e.g. --db {path / DEFAULT_DB_NAME}")
    if "not a database" in low or "encrypted" in low:
        return HistoryError(f"{path} is not a readable SQLite benchmark history (file is not a database)",
                            "move the file aside (the next --save starts a new history) or pass another --db")
    if "malformed" in low or "corrupt" in low:
        return HistoryError(f"{path} is damaged ({msg})",
                            f"restore it from a backup or move the file aside (`sqlite3 {path} .recover` may rescue its "
                            "rows), or pass another --db")
    if "locked" in low or "busy" in low:
        return HistoryError(f"{path} is locked by another process (waited {lock_timeout():g} s)",
                            "run again when that process is done (or raise $MVLM_HISTORY_LOCK_TIMEOUT), "
                            "or pass another --db")
    if "readonly" in low or "read-only" in low:
        return HistoryError(f"{path} is read-only ({msg})",
                            "make the file and its directory writable, or pass another --db")
    if "disk is full" in low or "no space" in low or getattr(exc, "errno", None) == 28:
        return HistoryError(f"the disk holding {path} is full ({msg})", "free space and run again, or pass another --db",
                            exit_code=28)
    if "unable to open" in low or "cannot open" in low:
        if not _writable_dir(path.parent):
            verb = "create" if not path.exists() else "write" if doing == "writing" else "open"
            return HistoryError(f"cannot {verb} {path}: its directory {path.parent} is not writable",
                                "make it writable or pass another --db")
        return HistoryError(f"cannot open {path} ({msg})", "check the path and its permissions, or pass another --db")
    if "disk i/o" in low or isinstance(exc, OSError):
        return HistoryError(f"I/O error on {path} ({msg})", "check the disk it is on, or pass another --db")
    if "no such table" in low or "no such column" in low or isinstance(exc, (KeyError, ValueError, TypeError)):
        return HistoryError(f"{path} is damaged or not an mvlm benchmark history ({type(exc).__name__}: {msg})",
                            "restore it from a backup or pass another --db")
    return HistoryError(f"SQLite error while {doing} {path} ({msg})", "pass another --db")


def pg_error(url: str, exc: BaseException, doing: str = "reading") -> HistoryError:
    """A psycopg (or decoding) error on a PostgreSQL history as one line; the URL's password is never shown."""
    where = stores.mask_url(url)
    msg = stores.one_line(str(exc) or type(exc).__name__, url)
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if doing == "connecting":
        if "invalid" in msg.lower() and ("dsn" in msg.lower() or "connection option" in msg.lower()
                                         or "uri" in msg.lower()):
            return HistoryError(f"{where} is not a usable PostgreSQL URL ({msg})",
                                "write it as postgresql://user@host:port/database, or pass another --db")
        lines = [stores.one_line(ln, url) for ln in str(exc).splitlines() if ln.strip()] or [msg]
        reason = re.sub(r"^connection failed:\s*", "", ": ".join(lines))
        reason = re.sub(r'^connection to server at "[^"]*"(?:\s*\([^)]*\))?, port \d+ failed:\s*', "", reason)
        return HistoryError(f"cannot connect to {where}: {reason}",
                            "start the server or fix the URL (host, port, user, database), or pass another --db")
    if sqlstate == "53100":
        return HistoryError(f"the disk of the PostgreSQL server holding {where} is full ({msg})",
                            "free space on the server and run again, or pass another --db", exit_code=28)
    if sqlstate == "55P03":  # lock_timeout: another session holds a lock on the tables
        return HistoryError(f"{where} is locked by another session (waited {lock_timeout():g} s)",
                            "run again when it is done (or raise $MVLM_HISTORY_LOCK_TIMEOUT), or pass another --db")
    if sqlstate.startswith("42501") or "permission denied" in msg.lower():
        return HistoryError(f"{where}: permission denied ({msg})",
                            "grant the user CREATE, SELECT and INSERT on the database, or pass another --db")
    if sqlstate in ("42P01", "42703") or isinstance(exc, (KeyError, ValueError, TypeError)):
        return HistoryError(f"{where} is damaged or not an mvlm benchmark history ({type(exc).__name__}: {msg})",
                            "restore it from a backup or pass another --db")
    if sqlstate.startswith("08") or sqlstate.startswith("57") or "connection" in msg.lower():
        return HistoryError(f"lost the connection to {where} while {doing} ({msg})",
                            "check the server and run again, or pass another --db")
    return HistoryError(f"PostgreSQL error while {doing} {where} ({msg})", "pass another --db")


def default_db_path() -> Path | str:
    """``$MVLM_HISTORY`` (a file as a Path, a PostgreSQL URL as written) or ``./mvlm-history.sqlite``."""
    env = os.environ.get("MVLM_HISTORY")
    return stores.location(env) if env else Path.cwd() / DEFAULT_DB_NAME


@dataclasses.dataclass
class Entry:
    """One stored (or loaded-from-JSON) measurement: context + per-repetition metrics."""

    context: RunContext
    samples: dict[str, list[float | None]]  # metric -> one value per repetition
    id: int | None = None
    created_at: str = ""
    label: str = ""
    project_commit: str = ""
    project_dirty: bool | None = None
    timings: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    source: str = ""  # where it came from, for messages: "db.sqlite#12" or "run.json[0]"

    @property
    def repetitions(self) -> int:
        return max((len(v) for v in self.samples.values()), default=0)

    def describe(self) -> str:
        c = self.context
        bits = [f"#{self.id}" if self.id is not None else self.source, c.label(), c.device, c.protocol]
        if c.runtime_commit:
            bits.append(f"llama.cpp {c.runtime_commit[:10]}")
        if self.project_commit:
            bits.append(f"commit {self.project_commit[:10]}")
        if self.label:
            bits.append(f"label {self.label}")
        return visible(" ".join(b for b in bits if b))  # for messages: stored text, control characters shown


def setup_key(e: Entry) -> tuple:
    """What must be equal for two entries to measure the same thing (on possibly different runtimes)."""
    c = e.context
    return (c.device, c.model_sha256 or c.model_file, c.mmproj_sha256 or c.mmproj_file, c.protocol,
            tuple(json.dumps(c.params.get(k), sort_keys=True, default=str) for k in SETUP_PARAMS))


def setup_differences(a: Entry, b: Entry) -> list[str]:
    """Human-readable list of setup fields that differ (empty: comparable)."""
    out = []
    for name in ("device", "model_sha256", "mmproj_sha256", "protocol"):
        va, vb = getattr(a.context, name), getattr(b.context, name)
        if va != vb:
            out.append(f"{name}: {str(va)[:16] or '–'} vs {str(vb)[:16] or '–'}")
    for k in SETUP_PARAMS:
        va, vb = a.context.params.get(k), b.context.params.get(k)
        if va != vb:
            out.append(f"{k}: {va} vs {vb}")
    return out


def _utc_text(t: float) -> str:
    """A unix time in the history's ``created_at`` form (ISO 8601, UTC, seconds)."""
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


def normalise_time(text: str) -> str:
    """An ISO 8601 time (``2026-01-01T12:00:00Z``, with an offset, or naive = UTC) in the history's ``created_at``
    form; ValueError when it is not one."""
    t = dt.datetime.fromisoformat(text.strip())
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC).isoformat(timespec="seconds")


def entries_from_runs(runs: Sequence, label: str = "", project: tuple[str, bool | None] | None = None) -> list[Entry]:
    """One Entry per group of repetitions (``records.aggregate``), not yet stored; ``created_at`` is when the group
    was measured (its first repetition's start, as ``test_time`` in ``mvlm bench --json-file``)."""
    from mvlm_bench.records import METRIC_KEYS, aggregate, measured_between

    commit, dirty = project if project is not None else project_commit()
    out = []
    for g in aggregate(runs):
        samples = {k: [p[k] for p in g.per_run] for k in METRIC_KEYS}
        out.append(Entry(context=g.context, samples=samples, label=label, project_commit=commit, project_dirty=dirty,
                         timings=[r.timing.to_dict() for r in g.runs], created_at=_utc_text(measured_between(g.runs)[0])))
    return out


def _bench_metric(r: dict[str, Any]) -> str:
    """The metric a llama-bench test row measures: ``pp512_tps``, ``tg128_tps``, ``pp512+tg128_tps``, ``@d512``."""
    n_p, n_g, n_d = (int(r.get(k) or 0) for k in ("n_prompt", "n_gen", "n_depth"))
    key = f"pp{n_p}" if n_g == 0 else (f"tg{n_g}" if n_p == 0 else f"pp{n_p}+tg{n_g}")
    return key + (f"@d{n_d}" if n_d else "") + "_tps"


def entry_from_llama_bench(rows: Sequence[dict[str, Any]], context: RunContext, label: str = "",
                           project: tuple[str, bool | None] | None = None) -> Entry:
    """llama-bench test rows of ONE configuration as one Entry: metric ``pp64_tps`` / ``tg128_tps`` (one value per
    sample: ``samples_ts``, else ``avg_ts``). The one plain pp test (no tg, no depth), when there is exactly one, is
    also ``prompt_tps``, and the one plain tg test ``eval_tps``: the metrics `mvlm history` shows and the gate judges."""
    commit, dirty = project if project is not None else project_commit()
    samples: dict[str, list[float | None]] = {}
    plain: dict[str, list[str]] = {"prompt_tps": [], "eval_tps": []}
    for r in rows:
        vals = r.get("samples_ts") or ([r["avg_ts"]] if r.get("avg_ts") is not None else [])
        if not isinstance(vals, list):
            raise ValueError("'samples_ts' is not a list")
        key = _bench_metric(r)
        samples[key] = [_json_num(v) for v in vals]
        if re.fullmatch(r"pp\d+_tps", key):
            plain["prompt_tps"].append(key)
        elif re.fullmatch(r"tg\d+_tps", key):
            plain["eval_tps"].append(key)
    for alias, keys in plain.items():
        if len(set(keys)) == 1 and alias not in samples:
            samples[alias] = list(samples[keys[0]])
    return Entry(context=context, samples=samples, label=label, project_commit=commit, project_dirty=dirty)


def _json_num(v: Any) -> float | None:
    """A metric value as JSON can hold it (inf/nan: None)."""
    if v is None or isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


def entries_to_records(entries: Sequence[Entry]) -> list[dict[str, Any]]:
    """Entries as the records ``mvlm bench --json-file`` writes (plus label, commit and time): what
    :func:`entries_from_json` reads back unchanged, so ``mvlm compare`` and ``mvlm history import`` take them."""
    out = []
    for e in entries:
        c = e.context
        n = max(e.repetitions, len(e.timings))
        runs = []
        for i in range(n):
            metrics = {k: _json_num(vs[i]) if i < len(vs) else None for k, vs in e.samples.items()}
            runs.append({"repetition": i, "metrics": metrics, "timing": e.timings[i] if i < len(e.timings) else {}})
        out.append({
            "build_commit": c.runtime_commit or None, "cpu_info": c.cpu_info or None, "gpu_info": c.gpu_info or None,
            "model_filename": c.model_file or None, "file_size": c.size_bytes, "device": c.device,
            "model": c.label(), "precision": c.precision or None, "model_sha256": c.model_sha256 or None,
            "mmproj_filename": c.mmproj_file or None, "mmproj_sha256": c.mmproj_sha256 or None,
            "runtime_patches": list(c.runtime_patches), "protocol": c.protocol or None, "params": c.params,
            "repetitions": n, "runs": runs, "label": e.label, "project_commit": e.project_commit,
            "project_dirty": e.project_dirty, "created_at": e.created_at,
        })
    return out


def _text(v: Any, what: str) -> str:
    if v is None:
        return ""
    if not isinstance(v, str | int | float) or isinstance(v, bool):
        raise ValueError(f"{what} is {type(v).__name__}, not text")
    return str(v)


def _entry_from_record(r: dict[str, Any], source: str) -> Entry:
    """One ``mvlm bench --json-file`` record; ValueError (the caller names file and record) when its fields have wrong types."""
    params = r.get("params") or {}
    if not isinstance(params, dict):
        raise ValueError("'params' is not an object")
    patches = r.get("runtime_patches") or []
    if not isinstance(patches, list) or not all(isinstance(x, str) for x in patches):
        raise ValueError("'runtime_patches' is not a list of names")
    size_key = "file_size" if "file_size" in r else "model_size"  # reports before llama-bench's model_size: file size
    size = r.get(size_key)
    if size is not None and (isinstance(size, bool) or not isinstance(size, int)):
        raise ValueError(f"'{size_key}' is not a whole number")
    runs = r["runs"]
    if not isinstance(runs, list) or not all(isinstance(x, dict) for x in runs):
        raise ValueError("'runs' is not a list of objects")
    ctx = RunContext(device=_text(r.get("device"), "'device'"), model=_text(r.get("model"), "'model'"),
                     precision=_text(r.get("precision"), "'precision'"),
                     model_file=_text(r.get("model_filename"), "'model_filename'"),
                     model_sha256=_text(r.get("model_sha256"), "'model_sha256'"),
                     mmproj_file=_text(r.get("mmproj_filename"), "'mmproj_filename'"),
                     mmproj_sha256=_text(r.get("mmproj_sha256"), "'mmproj_sha256'"), size_bytes=size,
                     runtime_commit=_text(r.get("build_commit"), "'build_commit'"), runtime_patches=list(patches),
                     protocol=_text(r.get("protocol"), "'protocol'"), cpu_info=_text(r.get("cpu_info"), "'cpu_info'"),
                     gpu_info=_text(r.get("gpu_info"), "'gpu_info'"), params=params)
    samples: dict[str, list[float | None]] = {}
    timings = []
    for i, run in enumerate(runs):
        metrics = run.get("metrics") or {}
        timing = run.get("timing") or {}
        if not isinstance(metrics, dict) or not isinstance(timing, dict):
            raise ValueError(f"run {i}: 'metrics' and 'timing' must be objects")
        for k, v in metrics.items():
            if v is None or (isinstance(v, int | float) and not isinstance(v, bool)):
                vals = samples.setdefault(str(k), [])
                vals.extend([None] * (i - len(vals)))  # a metric missing from earlier runs keeps its index
                vals.append(_json_num(v))
        timings.append(timing)
    dirty = r.get("project_dirty")
    created = _text(r.get("created_at"), "'created_at'")
    if not created:  # a `mvlm bench --json-file` report: when it was measured
        created = _record_time(r)
    return Entry(context=ctx, samples=samples, timings=timings, source=source, label=_text(r.get("label"), "'label'"),
                 project_commit=_text(r.get("project_commit"), "'project_commit'"),
                 project_dirty=dirty if isinstance(dirty, bool) else None, created_at=created)


def _lenient_time(row: dict[str, Any]) -> str:
    """A llama-bench row's ``test_time`` in the history's form, '' when missing or unreadable."""
    try:
        return normalise_time(str(row.get("test_time") or ""))
    except ValueError:
        return ""


def _record_time(r: dict[str, Any]) -> str:
    """The measurement time of a report record: ``test_time`` (ISO 8601, llama-bench's field) or ``start_time``
    (unix); '' when it has neither (older reports: the import time is used). ValueError when they are malformed."""
    t = r.get("test_time")
    if t not in (None, ""):
        if not isinstance(t, str):
            raise ValueError("'test_time' is not an ISO 8601 time")
        try:
            return normalise_time(t)
        except ValueError:
            raise ValueError(f"'test_time' {t[:40]!r} is not an ISO 8601 time") from None
    start = r.get("start_time")
    if start is not None:
        if isinstance(start, bool) or not isinstance(start, int | float) or not math.isfinite(start):
            raise ValueError("'start_time' is not a unix time")
        try:
            return _utc_text(float(start))
        except (OverflowError, OSError, ValueError):
            raise ValueError(f"'start_time' {start!r} is not a unix time") from None
    return ""


# llama-bench fields that name a test rather than a configuration (the rest must be equal within one entry)
_BENCH_TEST_FIELDS = {"n_prompt", "n_gen", "n_depth", "test", "test_time", "avg_ns", "stddev_ns", "avg_ts",
                      "stddev_ts", "samples_ns", "samples_ts"}  # fmt: skip
# llama-bench fields kept in an entry's params: what makes two llama-bench configurations different
_BENCH_PARAMS = ("n_batch", "n_ubatch", "n_threads", "type_k", "type_v", "n_gpu_layers", "split_mode", "main_gpu",
                 "no_kv_offload", "flash_attn", "tensor_split", "embeddings", "cpu_mask", "cpu_strict", "poll",
                 "n_cpu_moe", "devices", "load_mode", "use_mmap", "backends", "model_type", "model_n_params",
                 "fit_target", "fit_min_ctx", "build_number")  # fmt: skip


def _entries_from_bench_rows(rows: list[dict[str, Any]], path: Path, device: str | None = None) -> list[Entry]:
    """llama-bench test rows as entries: one per configuration (model, build, threads, batch sizes, ... : every field
    but the test's own), each test a metric whose values are its samples (see :func:`entry_from_llama_bench`).
    ``device``: the name to store them under (default: llama-bench's cpu_info, then gpu_info)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    try:
        for r in rows:
            config = {k: v for k, v in r.items() if k not in _BENCH_TEST_FIELDS}
            groups.setdefault(json.dumps(config, sort_keys=True, default=str), []).append(r)
        out = []
        for i, rs in enumerate(groups.values()):
            r0 = rs[0]
            name = str(r0.get("model_filename") or "").replace("\\", "/").rsplit("/", 1)[-1]
            params = {k: r0[k] for k in _BENCH_PARAMS if k in r0}
            size = r0.get("model_size")
            ctx = RunContext(device=device or str(r0.get("cpu_info") or r0.get("gpu_info") or ""),
                             model=name.removesuffix(".gguf") or str(r0.get("model_type") or ""),
                             model_file=name, size_bytes=size if isinstance(size, int) and not isinstance(size, bool)
                             else None, runtime_commit=str(r0.get("build_commit") or ""), protocol="llama-bench",
                             cpu_info=str(r0.get("cpu_info") or ""), gpu_info=str(r0.get("gpu_info") or ""),
                             params=params)
            e = entry_from_llama_bench(rs, ctx, project=("", None))
            e.created_at = min((t for t in map(_lenient_time, rs) if t), default="")
            e.source = f"{path}[{i}]" if len(groups) > 1 else str(path)
            out.append(e)
    except (TypeError, ValueError, AttributeError) as exc:
        raise MvlmError(f"{path}: llama-bench rows with unexpected values ({exc}): pass the file llama-bench wrote, "
                        "unedited") from None
    return out


def check_report_file(path: Path, todo: str = "pass a JSON file written by `mvlm bench --json-file` or llama-bench") -> None:
    """Refuse, in one line, a report path that is missing or not a regular file (a FIFO would block the read forever,
    /dev/zero would never end); ``todo``: what to pass instead."""
    from mvlm_core.atomic import file_kind

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MvlmError(f"{path} does not exist: {todo}") from None
    except OSError as e:
        raise MvlmError(f"cannot read {path}: {e.strerror or e}; {todo}") from None
    if not stat.S_ISREG(mode):
        raise MvlmError(f"{path} is {file_kind(path)}, not a file: {todo}")


def entries_from_json(path: Path, device: str | None = None) -> list[Entry]:
    """Entries from a file written by ``mvlm bench --json-file`` (papers' protocols or llama-bench rows), by
    :func:`save_or_spill`, or by llama-bench itself (``-o json``/``jsonl``/``sql``/``csv``/``md``: one entry per
    configuration). ``device``: the device name for llama-bench rows (which only know cpu_info/gpu_info)."""
    path = Path(path)
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
        return _bench_file(path, device)  # llama-bench md / csv / sql (or something else: a one-line refusal)
    try:
        data = json.loads(path.read_bytes())
    except ValueError as e:
        if stripped.startswith(b"{"):  # JSON lines: llama-bench -o jsonl
            return _bench_file(path, device)
        raise MvlmError(f"cannot read benchmark JSON {path}: {e}: pass a file written by `mvlm bench --json-file`") from None
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
        return _entries_from_bench_rows(data, path, device)
    out = []
    for i, r in enumerate(data):
        if "runs" not in r:
            raise MvlmError(f"{path}: record {i} has no per-repetition 'runs': write it with `mvlm bench --json-file`")
        source = f"{path}[{i}]" if len(data) > 1 else str(path)
        try:
            out.append(_entry_from_record(r, source))
        except ValueError as e:
            raise MvlmError(f"{path}: record {i} is malformed ({e}): pass a file written by `mvlm bench --json-file`, "
                            "unedited") from None
    return out


def _bench_file(path: Path, device: str | None = None) -> list[Entry]:
    """llama-bench output in any format it writes, as entries; anything else is a one-line refusal."""
    from mvlm_bench.timings import describe_content, parse_file, parse_llama_bench_file

    rec = parse_file(path)
    if rec.source_format.startswith("llama-bench-"):
        rows = parse_llama_bench_file(path)
        if rows:
            return _entries_from_bench_rows(rows, path, device)
    if rec.source_format not in ("unrecognised", "image-lines-only"):
        what = f"the timings of one llama.cpp run ({rec.source_format})"
    else:
        what = describe_content(path)
    raise MvlmError(f"{path} is not a benchmark report (found {what}): pass a file written by `mvlm bench --json-file` "
                    "or by llama-bench (-o json, jsonl, sql, csv or md), or a history selector such as latest")


def project_commit(source: Path | None = None) -> tuple[str, bool | None]:
    """(git commit, dirty?) of mvlm's own source: the git work tree the mvlm package lives in (``source``: that
    directory; default this package's), whatever the current directory is. ('', None) when the package is not a
    tracked file of a git work tree (an installed wheel: site-packages, even inside another project's tree) or
    without git."""
    pkg = Path(source) if source is not None else Path(__file__).resolve().parent

    def git(*args: str, timeout: float = 10) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(pkg), *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    try:
        tracked = git("ls-files", "--error-unmatch", "--", "__init__.py")
        if tracked.returncode != 0:
            return "", None
        r = git("rev-parse", "HEAD")
        if r.returncode != 0:
            return "", None
        d = git("status", "--porcelain", "--untracked-files=no", timeout=30)
        return r.stdout.strip(), (bool(d.stdout.strip()) if d.returncode == 0 else None)
    except (OSError, subprocess.TimeoutExpired):
        return "", None


class History:
    """An open history (a SQLite file or a PostgreSQL database). Use as a context manager; every write is one
    transaction.

    ``create``: make a new history when there is none (no file, an empty file, an empty database); otherwise that is
    an error (``mvlm history`` / ``compare`` never write a new one). Every SQLite, PostgreSQL or OS error is a
    :class:`HistoryError`. ``path``: the file (``Path``), or the URL with its password masked (``str``).
    """

    def __init__(self, path: Path | str | None = None, create: bool = True):
        loc = stores.location(path if path is not None else default_db_path())
        self.create = create
        self.store: stores.Store | None = None
        self.url = loc if isinstance(loc, str) else ""
        if self.url:
            self.path: Path | str = stores.mask_url(self.url)
            self.name = self.path
            self._open_postgres()
            return
        self.path = p = Path(loc)
        self.name = p.name
        try:
            existed = p.exists()
            mode = p.stat().st_mode if existed else 0
        except OSError as e:  # a name too long, a loop of links, ...
            raise HistoryError(f"cannot open {p} ({e.strerror or e})", "pass another --db") from None
        if existed:
            if stat.S_ISDIR(mode):
                raise HistoryError(f"{p} is a directory, not a benchmark history",
                                   f"pass a file, e.g. --db {p / DEFAULT_DB_NAME}")
            if not stat.S_ISREG(mode):
                raise HistoryError(f"{p} is not a regular file", "pass a history file with --db")
        elif not create:
            raise HistoryError(f"no benchmark history at {p}", "run `mvlm bench ... --save` first or pass --db PATH")
        elif not p.parent.is_dir():
            what = "does not exist" if not p.parent.exists() else "is not a directory"
            raise HistoryError(f"cannot create {p}: directory {p.parent} {what}", "create it or pass another --db")
        try:
            self.store = stores.SqliteStore(p, lock_timeout())
            self._open()
        except BaseException as e:
            self.close()
            if not existed:  # what this call created, and only while it is still empty (another process may own it)
                for leftover in (p, p.with_name(p.name + "-journal")):
                    try:
                        if leftover.stat().st_size == 0:
                            leftover.unlink()
                    except OSError:
                        pass
            if isinstance(e, (sqlite3.Error, OSError)):
                raise db_error(p, e, "opening") from None
            raise

    def _open_postgres(self) -> None:
        try:
            import psycopg
        except ImportError:
            raise HistoryError(f"{self.path} is a PostgreSQL history and psycopg is not installed",
                               "pip install 'mvlm[lab]' (psycopg 3), or pass a SQLite --db") from None
        try:
            self.store = stores.PostgresStore(self.url, lock_timeout() or DEFAULT_LOCK_TIMEOUT_S, lock_timeout())
        except psycopg.Error as e:
            raise pg_error(self.url, e, "connecting") from None
        try:
            self._open()
        except BaseException as e:
            self.close()
            if isinstance(e, psycopg.Error):
                raise pg_error(self.url, e, "opening") from None
            raise

    @property
    def conn(self) -> Any:
        """The backend's own connection (sqlite3 or psycopg), None once closed."""
        return self.store.conn if self.store is not None else None

    def _version(self, tables: set[str]) -> int:
        """The schema version: the highest ``schema_version`` row; a SQLite file also says it in ``user_version``
        (the only record before the version table), and the higher of the two counts."""
        s = self.store
        assert s is not None
        version = 0
        if "schema_version" in tables:
            version = s.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
        if s.kind == "sqlite":
            version = max(version, s.execute("PRAGMA user_version").fetchone()[0])
        return int(version)

    def _is_new(self, tables: set[str]) -> bool:
        """Nothing stored yet: an empty SQLite file, a database without any history table."""
        s = self.store
        assert s is not None
        if s.kind == "sqlite":
            return not tables and s.execute("PRAGMA user_version").fetchone()[0] == 0 and \
                s.execute("PRAGMA application_id").fetchone()[0] == 0
        return not tables & {*HISTORY_TABLES, "schema_version"}

    def _foreign(self, tables: set[str]) -> bool:
        """A SQLite file of another program (its application id), a database whose tables are not a history's."""
        s = self.store
        assert s is not None
        if s.kind == "sqlite":
            return s.execute("PRAGMA application_id").fetchone()[0] != _APP_ID
        return "schema_version" not in tables

    def _open(self) -> None:
        s = self.store
        assert s is not None
        tables = s.tables()
        version = self._version(tables)
        if self._is_new(tables) and not self.create:
            what = "an empty file" if s.kind == "sqlite" else "no mvlm tables in the database"
            raise HistoryError(f"{self.path} holds no benchmark history ({what})",
                               f"run `mvlm bench ... --save {stores.db_option(self.path)}` to start one, or pass another --db")
        if self._is_new(tables) or version < SCHEMA_VERSION:
            with self._write(schema=True):  # schema, version and id: all or nothing, one process at a time
                tables = s.tables()  # again, under the lock: another process may have just made or migrated it
                version = self._version(tables)
                if self._is_new(tables):
                    if s.kind == "sqlite":
                        s.execute(f"PRAGMA application_id = {_APP_ID}")
                    self._migrate(0)
                    version = SCHEMA_VERSION
                elif not self._foreign(tables) and version < SCHEMA_VERSION:
                    self._migrate(version)
                    version = SCHEMA_VERSION
            tables = s.tables()
        if self._foreign(tables):
            kind = "a SQLite file" if s.kind == "sqlite" else "a PostgreSQL database with other tables"
            raise HistoryError(f"{self.path} is {kind} but not an mvlm benchmark history", "pass another --db")
        if version > SCHEMA_VERSION:
            raise HistoryError(f"{self.path} has history schema version {version}, newer than this mvlm understands "
                               f"({SCHEMA_VERSION})", "upgrade mvlm, or pass another --db")
        missing_tables = set(HISTORY_TABLES) - tables
        if missing_tables:
            raise HistoryError(f"{self.path} is damaged: table(s) {', '.join(sorted(missing_tables))} missing",
                               "restore it from a backup or pass another --db")
        self._check_integrity()

    def _migrate(self, version: int) -> None:
        """Run MIGRATIONS[version], ..., up to SCHEMA_VERSION (inside the caller's transaction) and record them."""
        s = self.store
        assert s is not None
        missing = [v for v in range(version, SCHEMA_VERSION) if v not in MIGRATIONS]
        if missing:
            raise HistoryError(f"{self.path} has history schema version {version} and this mvlm has no migration "
                               f"from version {missing[0]}", "export it with an older mvlm or pass another --db")
        try:
            for v in range(version, SCHEMA_VERSION):
                step = MIGRATIONS[v]
                if callable(step):
                    step(s)
                else:
                    for statement in stores.ddl(step, s.kind):
                        s.execute(statement)
            if "schema_version" in s.tables():
                now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
                have = {r[0] for r in s.execute("SELECT version FROM schema_version")}
                s.executemany("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                              [(v, now) for v in range(1, SCHEMA_VERSION + 1) if v not in have])
            if s.kind == "sqlite":
                s.execute(f"PRAGMA user_version = {int(SCHEMA_VERSION)}")
        except (*s.errors, ValueError) as e:
            if version == 0:
                raise
            raise HistoryError(f"migrating {self.path} from schema version {version} failed "
                               f"({stores.one_line(str(e), self.url)}); "
                               "the history was left unchanged", "pass another --db") from e

    def _check_integrity(self) -> None:
        """SQLite's ``PRAGMA quick_check``: a damaged file is refused before anything is read from or written into it
        (a regression gate must not compare against half-read rows). A PostgreSQL server checks its own pages."""
        s = self.store
        assert s is not None
        if s.kind != "sqlite":
            return
        check = [r[0] for r in s.execute("PRAGMA quick_check(5)")]
        if check != ["ok"]:
            raise HistoryError(f"{self.path} is damaged (integrity check: {'; '.join(check)[:200]})",
                               f"restore it from a backup or move the file aside (`sqlite3 {self.path} .recover` "
                               "may rescue its rows), or pass another --db")

    @contextmanager
    def _write(self, schema: bool = False) -> Iterator[stores.Store]:
        """One write transaction (SQLite: the write lock first, BEGIN IMMEDIATE; ``schema``: PostgreSQL's advisory
        lock too); any failure rolls back."""
        s = self.store
        assert s is not None
        s.begin(schema=schema)
        try:
            yield s
        except BaseException:
            s.rollback()
            raise
        s.commit()

    def _error(self, exc: BaseException, doing: str) -> HistoryError:
        return pg_error(self.url, exc, doing) if self.url else db_error(Path(self.path), exc, doing)

    @contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        """SQLite/PostgreSQL/OS errors and unreadable stored values become one HistoryError line."""
        errors = self.store.errors if self.store is not None else ()
        try:
            yield
        except MvlmError:
            raise
        except (*errors, sqlite3.Error, OSError, ValueError, KeyError, TypeError) as e:
            raise self._error(e, doing) from None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writing -------------------------------------------------------------------------------------------------
    def save(self, entry: Entry, created_at: str | None = None) -> int:
        """Store one entry (context + every repetition); returns its id and sets ``entry.id``."""
        return self.save_many([entry], created_at=created_at)[0]

    def save_many(self, entries: Sequence[Entry], created_at: str | None = None) -> list[int]:
        """Store entries in ONE transaction (all or none); returns their ids and sets ``entry.id``/``created_at``.

        A SQLite file is integrity-checked first (``PRAGMA quick_check``): nothing is written into a damaged history.
        """
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        assigned: list[tuple[Entry, int, str]] = []
        with self._guard("writing"), self._write() as s:
            self._check_integrity()  # again, under the write lock
            for entry in entries:
                created = created_at or entry.created_at or now
                assigned.append((entry, self._insert(s, entry, created), created))
        for entry, eid, created in assigned:
            entry.id, entry.created_at = eid, created
        return [eid for _, eid, _ in assigned]

    @staticmethod
    def _insert(s: stores.Store, entry: Entry, created: str) -> int:
        c = entry.context
        (eid,) = s.execute(
            "INSERT INTO entry (created_at, label, project_commit, project_dirty, device, model, precision, "
            "model_file, model_sha256, mmproj_file, mmproj_sha256, size_bytes, runtime_commit, runtime_patches, "
            "protocol, cpu_info, gpu_info, params, repetitions) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
            (created, entry.label, entry.project_commit,
             None if entry.project_dirty is None else int(entry.project_dirty), c.device, c.label(), c.precision,
             c.model_file, c.model_sha256, c.mmproj_file, c.mmproj_sha256, c.size_bytes, c.runtime_commit,
             json.dumps(list(c.runtime_patches)), c.protocol, c.cpu_info, c.gpu_info,
             json.dumps(c.params, sort_keys=True, default=str), entry.repetitions),
        ).fetchone()
        eid = int(eid)
        n = max(entry.repetitions, len(entry.timings))
        s.executemany("INSERT INTO repetition (entry_id, idx, timing) VALUES (?,?,?)",
                      [(eid, i, json.dumps(entry.timings[i] if i < len(entry.timings) else {}, default=str))
                       for i in range(n)])
        # NaN is stored as NULL on both backends (SQLite has no NaN; PostgreSQL would keep it)
        s.executemany(
            "INSERT INTO sample (entry_id, repetition, metric, value) VALUES (?,?,?,?)",
            [(eid, i, k, None if isinstance(v, float) and math.isnan(v) else v)
             for k, vs in entry.samples.items() for i, v in enumerate(vs) if not isinstance(v, str)],
        )
        return eid

    # --- reading -------------------------------------------------------------------------------------------------
    def _row_to_entry(self, row: Sequence[Any], cols: list[str]) -> Entry:
        r = dict(zip(cols, row, strict=True))
        patches, params = json.loads(r["runtime_patches"]), json.loads(r["params"])
        if not isinstance(patches, list) or not isinstance(params, dict):
            raise ValueError(f"entry {r['id']} has malformed runtime_patches/params")
        ctx = RunContext(device=r["device"], model=r["model"], precision=r["precision"], model_file=r["model_file"],
                         model_sha256=r["model_sha256"], mmproj_file=r["mmproj_file"],
                         mmproj_sha256=r["mmproj_sha256"], size_bytes=r["size_bytes"],
                         runtime_commit=r["runtime_commit"], runtime_patches=patches,
                         protocol=r["protocol"], cpu_info=r["cpu_info"], gpu_info=r["gpu_info"], params=params)
        return Entry(context=ctx, samples={}, id=r["id"], created_at=r["created_at"], label=r["label"],
                     project_commit=r["project_commit"],
                     project_dirty=None if r["project_dirty"] is None else bool(r["project_dirty"]),
                     source=f"{self.name}#{r['id']}")

    def _load_samples(self, entries: list[Entry]) -> None:
        by_id = {e.id: e for e in entries}
        ids = list(by_id)
        conn = self.store
        assert conn is not None
        for lo in range(0, len(ids), 500):  # SQLite limits the number of ? in one statement
            part = ids[lo : lo + 500]
            q = ",".join("?" * len(part))
            for eid, rep, metric, value in conn.execute(
                f"SELECT entry_id, repetition, metric, value FROM sample WHERE entry_id IN ({q}) "
                "ORDER BY entry_id, repetition", part):
                if not isinstance(rep, int) or not 0 <= rep < 1_000_000:
                    raise ValueError(f"entry {eid} has a sample with repetition {rep!r}")
                if not isinstance(metric, str):
                    raise ValueError(f"entry {eid} has a sample whose metric name is {type(metric).__name__}")
                if value is not None and not isinstance(value, int | float):  # TEXT or BLOB stored by hand
                    shown = repr(value if len(value) <= 30 else value[:30])
                    raise ValueError(f"entry {eid} repetition {rep} has a {type(value).__name__} value {shown} for "
                                     f"{metric[:40]}; sample values must be numbers")
                vals = by_id[eid].samples.setdefault(metric, [])
                vals.extend([None] * (rep + 1 - len(vals)))
                vals[rep] = value
            for eid, timing in conn.execute(
                    f"SELECT entry_id, timing FROM repetition WHERE entry_id IN ({q}) ORDER BY entry_id, idx", part):
                t = json.loads(timing)
                by_id[eid].timings.append(t if isinstance(t, dict) else {})

    def entries(self, device: str | None = None, model: str | None = None, protocol: str | None = None,
                label: str | None = None, samples: bool = True) -> list[Entry]:
        """Stored entries, oldest first, optionally filtered (model matches name, file name or sha256 prefix)."""
        with self._guard("reading"):
            return self._entries(device, model, protocol, label, samples)

    def _entries(self, device: str | None, model: str | None, protocol: str | None, label: str | None,
                 samples: bool) -> list[Entry]:
        assert self.store is not None
        where, args = [], []
        if device:
            where.append("device = ?")
            args.append(device)
        if model:
            where.append("(model = ? OR model_file = ? OR model_sha256 LIKE ?)")
            args += [model, model, model.lower() + "%"]
        if protocol:
            where.append("protocol = ?")
            args.append(protocol)
        if label is not None:
            where.append("label = ?")
            args.append(label)
        cur = self.store.execute("SELECT * FROM entry" + (" WHERE " + " AND ".join(where) if where else "")
                                + " ORDER BY id", args)
        cols = [d[0] for d in cur.description]
        out = [self._row_to_entry(row, cols) for row in cur.fetchall()]
        if samples:
            self._load_samples(out)
        return out

    def _list_hint(self) -> str:
        """```mvlm history --db LOCATION``` to paste (a URL without its password, then how to give it)."""
        cmd, sep, note = stores.db_option(self.url or self.path).partition(" (")
        return f"`mvlm history {cmd}`" + (f" ({note}" if sep else "")

    def get(self, entry_id: int) -> Entry:
        if not 0 <= entry_id <= MAX_ID:
            raise MvlmError(f"id:{entry_id} is out of range (ids are 1 to {MAX_ID}): "
                            f"{self._list_hint()} lists the stored ones")
        with self._guard("reading"):
            assert self.store is not None
            cur = self.store.execute("SELECT * FROM entry WHERE id = ?", (entry_id,))
            row = cur.fetchone()
            if row is None:
                raise MvlmError(f"no entry id:{entry_id} in {self.path}: {self._list_hint()} lists them")
            e = self._row_to_entry(row, [d[0] for d in cur.description])
            self._load_samples([e])
            return e

    def select(self, selector: str, device: str | None = None, model: str | None = None, protocol: str | None = None,
               like: Entry | None = None, exclude: Sequence[int] = ()) -> Entry:
        """Resolve a selector (module docstring). ``like``: only entries with the same setup as this one."""
        s = selector.strip()
        m = re.fullmatch(r"(?:id:)?([0-9]+)", s, re.ASCII)
        if m:
            digits = m.group(1).lstrip("0") or "0"
            if len(digits) > len(str(MAX_ID)) or int(digits) > MAX_ID:
                shown = digits if len(digits) <= 30 else digits[:12] + "..."
                raise MvlmError(f"selector id:{shown} is out of range (ids are 1 to {MAX_ID}): "
                                f"{self._list_hint()} lists the stored ids")
            return self.get(int(digits))
        m = re.fullmatch(r"(latest|label:.+?|commit:[0-9a-fA-F]+|runtime:[0-9a-zA-Z]+)(?:~([0-9]+))?", s, re.ASCII)
        if not m:
            shown = selector if len(selector) <= 80 else selector[:60] + "..."
            raise MvlmError(f"unknown selector {shown!r}: use latest, latest~N, id:N, label:NAME, commit:SHA, "
                            "runtime:SHA or a JSON file written by `mvlm bench --json-file`")
        back_s = (m.group(2) or "0").lstrip("0") or "0"
        base, back = m.group(1), int(back_s) if len(back_s) <= 18 else MAX_ID  # ~N beyond any history: matches none
        named = [e for e in self.entries(device, model, protocol) if e.id not in exclude]
        if base.startswith("label:"):
            named = [e for e in named if e.label == base[len("label:"):]]
        elif base.startswith("commit:"):
            named = [e for e in named if e.project_commit.lower().startswith(base[len("commit:"):].lower())]
        elif base.startswith("runtime:"):
            named = [e for e in named if e.context.runtime_commit.lower().startswith(base[len("runtime:"):].lower())]
        cands = named if like is None else [e for e in named if setup_key(e) == setup_key(like)]
        if back >= len(cands):
            scope = [f"device {device}" if device else "", f"model {model}" if model else "",
                     f"protocol {protocol}" if protocol else "",
                     f"the setup of {like.describe()}" if like is not None else ""]
            scope_s = ", ".join(x for x in scope if x)
            shown = selector if len(selector) <= 80 else selector[:60] + "..."
            nearest = ""
            if like is not None and named and not cands:  # say what differs from the newest entry it names
                diff = setup_differences(named[-1], like)
                nearest = (f"; it names {len(named)} entr{'y' if len(named) == 1 else 'ies'} of another setup, the "
                           f"newest (id:{named[-1].id}) differing in {', '.join(diff[:4])} (stored vs this run)"
                           if diff else "")
            raise MvlmError(f"selector {shown!r} matches nothing in {self.path}"
                            + (f" among entries with {scope_s}" if scope_s else "")
                            + f" ({len(cands)} candidate(s)){nearest}: `mvlm history` lists what is stored")
        return cands[-1 - back]


# --- saving without ever losing a measurement ----------------------------------------------------------------------
@dataclasses.dataclass
class SaveOutcome:
    """What :func:`save_or_spill` did: saved (``ids``), or not (``error``) with the entries ``spilled`` to a JSON file
    (or, when no file could be written anywhere, ``unsaved_json`` for the caller to print)."""

    db: Path | str  # a SQLite file, or a PostgreSQL URL with its password masked
    entries: list[Entry]
    ids: list[int] = dataclasses.field(default_factory=list)
    error: MvlmError | None = None
    spilled: Path | None = None
    unsaved_json: str = ""

    @property
    def saved(self) -> bool:
        return self.error is None

    @property
    def exit_code(self) -> int:
        return self.error.exit_code if self.error is not None else 0

    def message(self) -> str:
        """One line: why the history did not take the measurement, where it is instead, and what to do."""
        if self.error is None:
            return f"saved as {', '.join(f'id:{i}' for i in self.ids)} in {self.db}"
        what, todo = ((self.error.what, self.error.todo) if isinstance(self.error, HistoryError)
                      else (str(self.error), ""))
        reps = sum(e.repetitions for e in self.entries)
        n = f"{len(self.entries)} measurement(s), {reps} repetition(s)"
        if self.spilled is not None:
            kept = f"the runs ({n}) were written to {self.spilled} instead"
            then = (f"`mvlm history import {shlex.quote(str(self.spilled))} {stores.db_option(self.db)}` stores them "
                    "(`mvlm compare` reads the file as it is)")
        else:
            kept = f"the runs ({n}) could not be written to any file either and were printed on stdout as JSON"
            then = "save that JSON to a file and `mvlm history import` it"
        return f"not saved to the benchmark history: {what}; {kept}: {todo + ', then ' if todo else ''}{then}"


def spill_entries(entries: Sequence[Entry], db: Path | str) -> tuple[Path | None, str]:
    """Write entries to ``<db>.unsaved-<UTC time>.json`` beside the history, else in the current directory, else in
    the temporary directory (a PostgreSQL history: ``mvlm-history-<database>.unsaved-...`` in the current directory,
    else the temporary one). Returns (the file or None when none could be written, the JSON text)."""
    from mvlm_core.atomic import write_text

    text = json.dumps(entries_to_records(entries), indent=2, default=str) + "\n"
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    loc = stores.location(db)
    if isinstance(loc, str):
        dbname = re.sub(r"[^A-Za-z0-9._-]+", "_", loc.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1])[:60]
        stem, beside = f"mvlm-history-{dbname or 'postgresql'}.unsaved-{stamp}", []
    else:
        stem, beside = f"{loc.name or DEFAULT_DB_NAME}.unsaved-{stamp}", [loc.parent]
    dirs: list[Path] = []
    for d in (*beside, Path.cwd(), Path(tempfile.gettempdir())):
        try:
            d = d.resolve()
        except OSError:
            continue
        if d not in dirs:
            dirs.append(d)
    for d in dirs:
        if not d.is_dir():
            continue
        k = 0
        while (d / f"{stem}{f'-{k}' if k else ''}.json").exists() and k < 1000:
            k += 1
        target = d / f"{stem}{f'-{k}' if k else ''}.json"
        try:
            return write_text(target, text), text
        except (MvlmError, OSError):
            continue
    return None, text


def save_or_spill(entries: Sequence[Entry], db: Path | str | None = None) -> SaveOutcome:
    """Store the entries in the history in one transaction; if that fails for any reason (not a history, damaged,
    locked, read-only, disk full, a directory, ...), write them to a JSON file instead (:func:`spill_entries`).

    Never raises for a history problem: the outcome says what happened (``message()`` is one line for the user). The
    entries get their ``created_at`` now, so a later ``mvlm history import`` of the spilled file keeps the time.
    """
    loc = stores.location(db if db is not None else default_db_path())
    path = stores.mask_url(loc) if isinstance(loc, str) else loc
    entries = list(entries)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    for e in entries:
        e.created_at = e.created_at or now
    out = SaveOutcome(db=path, entries=entries)
    try:
        with History(loc) as h:
            out.ids = h.save_many(entries)
        return out
    except MvlmError as e:
        out.error = e
    except (sqlite3.Error, OSError) as e:
        out.error = db_error(loc, e, "writing") if isinstance(loc, Path) else pg_error(loc, e, "writing")
    except BaseException:  # Ctrl-C / SIGTERM while saving: keep the runs, then stop as asked
        spill_entries(entries, loc)
        raise
    out.spilled, text = spill_entries(entries, loc)
    if out.spilled is None:
        out.unsaved_json = text
    return out


def content_key(e: Entry) -> str:
    """What a measurement IS: its whole context (device, model and mmproj files and hashes, llama.cpp build and
    patches, protocol, parameters) and every repetition's value of every metric. Not its time, label or project
    commit: a `mvlm bench --json-file` report carries none of those, and the same runs imported twice (or a copy of the
    file, or a report of runs that `--save` already stored) are still one measurement."""
    c = e.context

    def norm(vs: Sequence[Any]) -> list[float | None]:
        out = [_json_num(v) for v in vs]
        while out and out[-1] is None:
            out.pop()
        return out

    samples = {str(k): norm(vs) for k, vs in e.samples.items()}
    ctx = {"device": c.device, "model": c.label(), "precision": c.precision, "model_file": c.model_file,
           "model_sha256": c.model_sha256, "mmproj_file": c.mmproj_file, "mmproj_sha256": c.mmproj_sha256,
           "size_bytes": c.size_bytes, "runtime_commit": c.runtime_commit, "runtime_patches": list(c.runtime_patches),
           "protocol": c.protocol, "cpu_info": c.cpu_info, "gpu_info": c.gpu_info,
           "params": json.loads(json.dumps(c.params, sort_keys=True, default=str))}
    return json.dumps([ctx, {k: v for k, v in samples.items() if v}], sort_keys=True, default=str)


def same_measurement(a: Entry, b: Entry) -> bool:
    """The same measurement (an import of a file that was already imported, a copy of it, or a report of stored
    runs), whatever ``created_at``, label or project commit each carries: see :func:`content_key`."""
    return content_key(a) == content_key(b)
