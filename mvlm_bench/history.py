"""The benchmark history: every stored ``mvlm bench`` measurement, with every repetition, in one SQLite file.

A regression gate needs a baseline it can trust, and a person chasing a slowdown needs to know what exactly was
measured months ago. So an entry keeps the whole context (device, llama.cpp commit + patches, model file + sha256,
protocol, parameters), the project's git commit when known, a free-form label, a UTC timestamp, and the metrics of
EACH repetition (never only a mean: the statistics in :mod:`mvlm_bench.compare` need the spread).

Where the file is: ``--db PATH``, else ``$MVLM_HISTORY``, else ``./mvlm-history.sqlite`` (the current directory, i.e.
next to the project when run from its root; CI caches or uploads this one file).

Schema: tables ``entry`` (one row per measurement), ``repetition`` (timing record per repetition) and ``sample``
(one row per repetition and metric, for queries and plots). ``PRAGMA user_version`` holds :data:`SCHEMA_VERSION`.
Opening an older file runs the steps in :data:`MIGRATIONS` (version N -> N+1) in one transaction; a newer file, a
file with a gap in the migrations, or a SQLite file that is not a history, is a clear error, never silently rewritten.

Selectors (``mvlm compare``, ``--baseline``): ``latest``, ``latest~N`` (N entries before the latest), ``id:N`` (or a
bare number), ``label:NAME``, ``commit:PREFIX`` (the project's git commit), ``runtime:PREFIX`` (llama.cpp commit);
``label:`` / ``commit:`` / ``runtime:`` take a ``~N`` suffix too. ``--device/--model/--protocol`` narrow the search,
and a baseline chosen relative to a candidate is looked for among entries of the same setup (see :func:`setup_key`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import sqlite3
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mvlm_bench.report import RunContext
from mvlm_convert.errors import MvlmError

SCHEMA_VERSION = 1
DEFAULT_DB_NAME = "mvlm-history.sqlite"
_APP_ID = 0x6D766C6D  # "mvlm": PRAGMA application_id, tells our files from other SQLite files

_SCHEMA_V1 = """
CREATE TABLE entry (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    project_commit TEXT NOT NULL DEFAULT '',
    project_dirty INTEGER,
    device TEXT NOT NULL,
    model TEXT NOT NULL,
    precision TEXT NOT NULL DEFAULT '',
    model_file TEXT NOT NULL DEFAULT '',
    model_sha256 TEXT NOT NULL DEFAULT '',
    mmproj_file TEXT NOT NULL DEFAULT '',
    mmproj_sha256 TEXT NOT NULL DEFAULT '',
    size_bytes INTEGER,
    runtime_commit TEXT NOT NULL DEFAULT '',
    runtime_patches TEXT NOT NULL DEFAULT '[]',
    protocol TEXT NOT NULL DEFAULT '',
    cpu_info TEXT NOT NULL DEFAULT '',
    gpu_info TEXT NOT NULL DEFAULT '',
    params TEXT NOT NULL DEFAULT '{}',
    repetitions INTEGER NOT NULL
);
CREATE INDEX entry_setup ON entry (device, model_sha256, protocol);
CREATE TABLE repetition (
    entry_id INTEGER NOT NULL REFERENCES entry(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    timing TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (entry_id, idx)
);
CREATE TABLE sample (
    entry_id INTEGER NOT NULL REFERENCES entry(id) ON DELETE CASCADE,
    repetition INTEGER NOT NULL,
    metric TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (entry_id, repetition, metric)
);
"""

# Migration hook: MIGRATIONS[n] upgrades a version-n file to n+1 (inside the opening transaction). Add a step here
# and bump SCHEMA_VERSION whenever the layout changes; never edit a released step.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {}

# Params that make two measurements comparable (with device, model hash and protocol); the runtime is NOT among
# them: comparing runtimes is the point.
SETUP_PARAMS = ("n_predict", "n_threads", "n_gpu_layers", "ctx_size", "prompt")


def default_db_path() -> Path:
    """``$MVLM_HISTORY`` or ``./mvlm-history.sqlite``."""
    env = os.environ.get("MVLM_HISTORY")
    return Path(env) if env else Path.cwd() / DEFAULT_DB_NAME


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
        return " ".join(b for b in bits if b)


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


def entries_from_runs(runs: Sequence, label: str = "", project: tuple[str, bool | None] | None = None) -> list[Entry]:
    """One Entry per group of repetitions (``report.aggregate``), not yet stored."""
    from mvlm_bench.report import METRIC_KEYS, aggregate

    commit, dirty = project if project is not None else project_commit()
    out = []
    for g in aggregate(runs):
        samples = {k: [p[k] for p in g.per_run] for k in METRIC_KEYS}
        out.append(Entry(context=g.context, samples=samples, label=label, project_commit=commit, project_dirty=dirty,
                         timings=[r.timing.to_dict() for r in g.runs]))
    return out


def entry_from_llama_bench(rows: Sequence[dict[str, Any]], context: RunContext, label: str = "",
                           project: tuple[str, bool | None] | None = None) -> Entry:
    """llama-bench's JSON rows as one Entry: metric ``pp64_tps`` / ``tg128_tps`` with one value per sample."""
    commit, dirty = project if project is not None else project_commit()
    samples: dict[str, list[float | None]] = {}
    for r in rows:
        n_p, n_g = int(r.get("n_prompt") or 0), int(r.get("n_gen") or 0)
        key = f"pp{n_p}_tps" if n_g == 0 else (f"tg{n_g}_tps" if n_p == 0 else f"pp{n_p}+tg{n_g}_tps")
        vals = r.get("samples_ts") or ([r["avg_ts"]] if r.get("avg_ts") is not None else [])
        samples[key] = [float(v) for v in vals]
    return Entry(context=context, samples=samples, label=label, project_commit=commit, project_dirty=dirty)


def entries_from_json(path: Path) -> list[Entry]:
    """Entries from a file written by ``mvlm bench --json`` (papers' protocols or llama-bench rows)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise MvlmError(f"cannot read benchmark JSON {path}: {e}") from e
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data or not all(isinstance(r, dict) for r in data):
        raise MvlmError(f"{path} is not a report written by `mvlm bench --json` (expected a list of records)")
    if all("runs" not in r and "samples_ts" in r for r in data):  # llama-bench's own rows
        r0 = data[0]
        ctx = RunContext(device=str(r0.get("device") or r0.get("cpu_info") or ""),
                         model=str(r0.get("model_type") or ""), model_file=str(r0.get("model_filename") or ""),
                         runtime_commit=str(r0.get("build_commit") or ""), protocol="llama-bench")
        e = entry_from_llama_bench(data, ctx, project=("", None))
        e.source = f"{path}"
        return [e]
    out = []
    for i, r in enumerate(data):
        if "runs" not in r:
            raise MvlmError(f"{path}: record {i} has no per-repetition 'runs': write it with `mvlm bench --json`")
        params = r.get("params") or {}
        ctx = RunContext(device=r.get("device") or "", model=r.get("model") or "", precision=r.get("precision") or "",
                         model_file=r.get("model_filename") or "", model_sha256=r.get("model_sha256") or "",
                         mmproj_file=r.get("mmproj_filename") or "", mmproj_sha256=r.get("mmproj_sha256") or "",
                         size_bytes=r.get("model_size"), runtime_commit=r.get("build_commit") or "",
                         runtime_patches=list(r.get("runtime_patches") or []), protocol=r.get("protocol") or "",
                         cpu_info=r.get("cpu_info") or "", gpu_info=r.get("gpu_info") or "", params=params)
        samples: dict[str, list[float | None]] = {}
        for run in r["runs"]:
            for k, v in (run.get("metrics") or {}).items():
                if isinstance(v, int | float) or v is None:
                    samples.setdefault(k, []).append(None if v is None else float(v))
        out.append(Entry(context=ctx, samples=samples, timings=[run.get("timing") or {} for run in r["runs"]],
                         source=f"{path}[{i}]" if len(data) > 1 else str(path)))
    return out


def project_commit(cwd: Path | None = None) -> tuple[str, bool | None]:
    """(git commit, dirty?) of the project the command runs in; ('', None) outside a git work tree or without git."""
    env_sha = os.environ.get("GITHUB_SHA", "")
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            return env_sha, None
        d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                           text=True, timeout=30)
        return r.stdout.strip(), (bool(d.stdout.strip()) if d.returncode == 0 else None)
    except (OSError, subprocess.TimeoutExpired):
        return env_sha, None


class History:
    """An open history file. Use as a context manager; every write is one transaction."""

    def __init__(self, path: Path | str | None = None, create: bool = True):
        self.path = Path(path) if path is not None else default_db_path()
        if not self.path.exists() and not create:
            raise MvlmError(f"no benchmark history at {self.path}: run `mvlm bench ... --save` first or pass --db PATH")
        if self.path.parent and not self.path.parent.is_dir():
            raise MvlmError(f"cannot create {self.path}: directory {self.path.parent} does not exist")
        try:
            self.conn = sqlite3.connect(self.path)
            self.conn.execute("PRAGMA foreign_keys = ON")
            self._open()
        except sqlite3.DatabaseError as e:
            raise MvlmError(f"{self.path} is not a readable SQLite benchmark history ({e}): pass another --db") from e

    def _open(self) -> None:
        c = self.conn
        version = c.execute("PRAGMA user_version").fetchone()[0]
        app_id = c.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version == 0 and not tables:
            with c:
                c.executescript(_SCHEMA_V1)
                c.execute(f"PRAGMA application_id = {_APP_ID}")
                c.execute("PRAGMA user_version = 1")
            version = 1
        elif app_id != _APP_ID:
            raise MvlmError(f"{self.path} is a SQLite file but not an mvlm benchmark history: pass another --db")
        if version > SCHEMA_VERSION:
            raise MvlmError(f"{self.path} has history schema version {version}, newer than this mvlm understands "
                            f"({SCHEMA_VERSION}): upgrade mvlm, or pass another --db")
        if version < SCHEMA_VERSION:
            missing = [v for v in range(version, SCHEMA_VERSION) if v not in MIGRATIONS]
            if missing:
                raise MvlmError(f"{self.path} has history schema version {version} and this mvlm has no migration "
                                f"from version {missing[0]}: export it with an older mvlm or pass another --db")
            try:
                with c:
                    for v in range(version, SCHEMA_VERSION):
                        MIGRATIONS[v](c)
                        c.execute(f"PRAGMA user_version = {v + 1}")
            except sqlite3.DatabaseError as e:
                raise MvlmError(f"migrating {self.path} from schema version {version} failed ({e}); "
                                "the file was left unchanged") from e

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writing -------------------------------------------------------------------------------------------------
    def save(self, entry: Entry, created_at: str | None = None) -> int:
        """Store one entry (context + every repetition); returns its id and sets ``entry.id``."""
        c = entry.context
        created = created_at or dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        with self.conn as conn:
            cur = conn.execute(
                "INSERT INTO entry (created_at, label, project_commit, project_dirty, device, model, precision, "
                "model_file, model_sha256, mmproj_file, mmproj_sha256, size_bytes, runtime_commit, runtime_patches, "
                "protocol, cpu_info, gpu_info, params, repetitions) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (created, entry.label, entry.project_commit,
                 None if entry.project_dirty is None else int(entry.project_dirty), c.device, c.label(), c.precision,
                 c.model_file, c.model_sha256, c.mmproj_file, c.mmproj_sha256, c.size_bytes, c.runtime_commit,
                 json.dumps(list(c.runtime_patches)), c.protocol, c.cpu_info, c.gpu_info,
                 json.dumps(c.params, sort_keys=True, default=str), entry.repetitions),
            )
            eid = int(cur.lastrowid)
            for i in range(max(entry.repetitions, len(entry.timings))):
                t = entry.timings[i] if i < len(entry.timings) else {}
                conn.execute("INSERT INTO repetition (entry_id, idx, timing) VALUES (?,?,?)",
                             (eid, i, json.dumps(t, default=str)))
            conn.executemany(
                "INSERT INTO sample (entry_id, repetition, metric, value) VALUES (?,?,?,?)",
                [(eid, i, k, v) for k, vs in entry.samples.items() for i, v in enumerate(vs)
                 if not isinstance(v, str)],
            )
        entry.id, entry.created_at = eid, created
        return eid

    # --- reading -------------------------------------------------------------------------------------------------
    def _row_to_entry(self, row: sqlite3.Row | tuple, cols: list[str]) -> Entry:
        r = dict(zip(cols, row, strict=True))
        ctx = RunContext(device=r["device"], model=r["model"], precision=r["precision"], model_file=r["model_file"],
                         model_sha256=r["model_sha256"], mmproj_file=r["mmproj_file"],
                         mmproj_sha256=r["mmproj_sha256"], size_bytes=r["size_bytes"],
                         runtime_commit=r["runtime_commit"], runtime_patches=json.loads(r["runtime_patches"]),
                         protocol=r["protocol"], cpu_info=r["cpu_info"], gpu_info=r["gpu_info"],
                         params=json.loads(r["params"]))
        return Entry(context=ctx, samples={}, id=r["id"], created_at=r["created_at"], label=r["label"],
                     project_commit=r["project_commit"],
                     project_dirty=None if r["project_dirty"] is None else bool(r["project_dirty"]),
                     source=f"{self.path.name}#{r['id']}")

    def _load_samples(self, entries: list[Entry]) -> None:
        by_id = {e.id: e for e in entries}
        if not by_id:
            return
        q = ",".join("?" * len(by_id))
        for eid, rep, metric, value in self.conn.execute(
            f"SELECT entry_id, repetition, metric, value FROM sample WHERE entry_id IN ({q}) "
            "ORDER BY entry_id, repetition", list(by_id)):
            vals = by_id[eid].samples.setdefault(metric, [])
            vals.extend([None] * (rep + 1 - len(vals)))
            vals[rep] = value
        for eid, timing in self.conn.execute(
                f"SELECT entry_id, timing FROM repetition WHERE entry_id IN ({q}) ORDER BY entry_id, idx", list(by_id)):
            by_id[eid].timings.append(json.loads(timing))

    def entries(self, device: str | None = None, model: str | None = None, protocol: str | None = None,
                label: str | None = None, samples: bool = True) -> list[Entry]:
        """Stored entries, oldest first, optionally filtered (model matches name, file name or sha256 prefix)."""
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
        cur = self.conn.execute("SELECT * FROM entry" + (" WHERE " + " AND ".join(where) if where else "")
                                + " ORDER BY id", args)
        cols = [d[0] for d in cur.description]
        out = [self._row_to_entry(row, cols) for row in cur.fetchall()]
        if samples:
            self._load_samples(out)
        return out

    def get(self, entry_id: int) -> Entry:
        cur = self.conn.execute("SELECT * FROM entry WHERE id = ?", (entry_id,))
        row = cur.fetchone()
        if row is None:
            raise MvlmError(f"no entry id:{entry_id} in {self.path}: `mvlm history --db {self.path}` lists them")
        e = self._row_to_entry(row, [d[0] for d in cur.description])
        self._load_samples([e])
        return e

    def select(self, selector: str, device: str | None = None, model: str | None = None, protocol: str | None = None,
               like: Entry | None = None, exclude: Sequence[int] = ()) -> Entry:
        """Resolve a selector (module docstring). ``like``: only entries with the same setup as this one."""
        s = selector.strip()
        m = re.fullmatch(r"(?:id:)?(\d+)", s)
        if m:
            return self.get(int(m.group(1)))
        m = re.fullmatch(r"(latest|label:.+?|commit:[0-9a-fA-F]+|runtime:[0-9a-zA-Z]+)(?:~(\d+))?", s)
        if not m:
            raise MvlmError(f"unknown selector {selector!r}: use latest, latest~N, id:N, label:NAME, commit:SHA, "
                            "runtime:SHA or a JSON file written by `mvlm bench --json`")
        base, back = m.group(1), int(m.group(2) or 0)
        cands = [e for e in self.entries(device, model, protocol) if e.id not in exclude]
        if like is not None:
            key = setup_key(like)
            cands = [e for e in cands if setup_key(e) == key]
        if base.startswith("label:"):
            cands = [e for e in cands if e.label == base[len("label:"):]]
        elif base.startswith("commit:"):
            cands = [e for e in cands if e.project_commit.lower().startswith(base[len("commit:"):].lower())]
        elif base.startswith("runtime:"):
            cands = [e for e in cands if e.context.runtime_commit.lower().startswith(base[len("runtime:"):].lower())]
        if back >= len(cands):
            scope = [f"device {device}" if device else "", f"model {model}" if model else "",
                     f"protocol {protocol}" if protocol else "",
                     f"the setup of {like.describe()}" if like is not None else ""]
            scope_s = ", ".join(x for x in scope if x)
            raise MvlmError(f"selector {selector!r} matches nothing in {self.path}"
                            + (f" among entries with {scope_s}" if scope_s else "")
                            + f" ({len(cands)} candidate(s)): `mvlm history` lists what is stored")
        return cands[-1 - back]
