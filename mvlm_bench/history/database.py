"""The benchmark history: every stored ``mvlm bench`` measurement, with every repetition, in one SQLite file.

A regression gate needs a baseline it can trust, and a person chasing a slowdown needs to know what exactly was
measured months ago. So an entry keeps the whole context (device, llama.cpp commit + patches, model file + sha256,
protocol, parameters), mvlm's own git commit when known (:func:`project_commit`), a free-form label, a UTC timestamp,
and the metrics of EACH repetition (never only a mean: the statistics in :mod:`mvlm_bench.decide.stats` need the spread).

Where it is: ``--db``, else ``$MVLM_HISTORY``, else ``./mvlm-history.sqlite`` (the current directory, i.e. next to the
project when run from its root; CI caches or uploads this one file). Either is a SQLite path or a PostgreSQL URL
(``postgresql://user@host:port/db``, psycopg 3: a lab's shared history, see docs/lab.md); :mod:`mvlm_bench.history.store`
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

import datetime as dt
import json
import math
import re
import sqlite3
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mvlm_bench.history.entries import Entry, setup_differences, setup_key
from mvlm_bench.history.errors import DEFAULT_DB_NAME, HistoryError, db_error, default_db_path, lock_timeout, pg_error
from mvlm_bench.history.locations import db_option, location, mask_url, one_line
from mvlm_bench.history.schema import SCHEMA_V1, SCHEMA_V2
from mvlm_bench.history.store import PostgresStore, SqliteStore, Store, ddl
from mvlm_bench.records.record import RunContext
from mvlm_core.errors import MvlmError

_APP_ID = 0x6D766C6D  # "mvlm": PRAGMA application_id, tells our files from other SQLite files

# MIGRATIONS[n] upgrades a version-n history to n+1 inside the opening transaction: schema text for both backends
# (store.ddl) or a callable given the open store (``store.execute(sql, params)``, ``store.kind``). A new history runs
# them all from 0. Add a step and SCHEMA_VERSION follows; never edit a released step.
MIGRATIONS: dict[int, str | Callable[[Store], None]] = {0: SCHEMA_V1, 1: SCHEMA_V2}
SCHEMA_VERSION = max(MIGRATIONS) + 1
HISTORY_TABLES = ("entry", "repetition", "sample")

MAX_ID = 2**63 - 1  # SQLite's INTEGER PRIMARY KEY range
DEFAULT_LOCK_TIMEOUT_S = 5.0


class History:
    """An open history (a SQLite file or a PostgreSQL database). Use as a context manager; every write is one
    transaction.

    ``create``: make a new history when there is none (no file, an empty file, an empty database); otherwise that is
    an error (``mvlm history`` / ``compare`` never write a new one). Every SQLite, PostgreSQL or OS error is a
    :class:`HistoryError`. ``path``: the file (``Path``), or the URL with its password masked (``str``).
    """

    def __init__(self, path: Path | str | None = None, create: bool = True):
        loc = location(path if path is not None else default_db_path())
        self.create = create
        self.store: Store | None = None
        self.url = loc if isinstance(loc, str) else ""
        if self.url:
            self.path: Path | str = mask_url(self.url)
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
            self.store = SqliteStore(p, lock_timeout())
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
            self.store = PostgresStore(self.url, lock_timeout() or DEFAULT_LOCK_TIMEOUT_S, lock_timeout())
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
                               f"run `mvlm bench ... --save {db_option(self.path)}` to start one, or pass another --db")
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
                    for statement in ddl(step, s.kind):
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
                               f"({one_line(str(e), self.url)}); "
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
    def _write(self, schema: bool = False) -> Iterator[Store]:
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

    def save_new(self, entries: Sequence[Entry]) -> tuple[list[int], int, list[int]]:
        """Store the entries that are not stored yet (the same measurement: :func:`~mvlm_bench.history.entries.
        content_key`), given twice counted once. An entry that continues a stored one (:func:`~mvlm_bench.history.
        entries.continues`: a spill file or --jsonl of a bench whose history stopped taking repetitions) adds its later
        repetitions to that entry instead. The check and the writes are one transaction that holds the history's write
        lock (SQLite) or its advisory lock (PostgreSQL), so concurrent imports of one file store it once. Returns (the
        new ids, how many were skipped, the ids of entries that were continued)."""
        from mvlm_bench.history.entries import content_key, continues

        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        assigned: list[tuple[Entry, int, str]] = []
        continued: list[int] = []
        with self._guard("writing"), self._write(schema=True) as s:
            self._check_integrity()
            stored = self._entries(None, None, None, None, True)
            seen = {content_key(e) for e in stored}
            for entry in entries:
                key = content_key(entry)
                if key in seen or any(continues(entry, e) for e in stored):  # stored already, maybe with more
                    continue
                seen.add(key)
                base = next((e for e in stored if continues(e, entry)), None)
                if base is not None and base.id is not None:
                    self._extend(s, base, entry)
                    continued.append(base.id)
                    base.samples, base.timings = entry.samples, entry.timings
                    continue
                created = entry.created_at or now
                assigned.append((entry, self._insert(s, entry, created), created))
        for entry, eid, created in assigned:
            entry.id, entry.created_at = eid, created
        skipped = len(entries) - len(assigned) - len(continued)
        return [eid for _, eid, _ in assigned], skipped, continued

    @staticmethod
    def _extend(s: Store, base: Entry, entry: Entry) -> None:
        """Add ``entry``'s repetitions after ``base``'s (stored) to ``base``."""
        first, n = base.repetitions, entry.repetitions
        s.executemany("INSERT INTO repetition (entry_id, idx, timing) VALUES (?,?,?)",
                      [(base.id, i, json.dumps(entry.timings[i] if i < len(entry.timings) else {}, default=str))
                       for i in range(first, n)])
        s.executemany("INSERT INTO sample (entry_id, repetition, metric, value) VALUES (?,?,?,?)",
                      [(base.id, i, k, None if isinstance(v, float) and math.isnan(v) else v)
                       for k, vs in entry.samples.items() for i, v in enumerate(vs)
                       if i >= first and not isinstance(v, str)])
        s.execute("UPDATE entry SET repetitions = ? WHERE id = ?", (n, base.id))

    def delete(self, ids: Sequence[int]) -> int:
        """Delete these entries with every repetition and sample, in one transaction; returns how many were there."""
        n = 0
        with self._guard("writing"), self._write() as s:
            for lo in range(0, len(ids), 500):  # SQLite limits the number of ? in one statement
                part = list(ids[lo: lo + 500])
                q = ",".join("?" * len(part))
                n += len(s.execute(f"SELECT id FROM entry WHERE id IN ({q})", part).fetchall())
                for table in ("sample", "repetition"):
                    s.execute(f"DELETE FROM {table} WHERE entry_id IN ({q})", part)
                s.execute(f"DELETE FROM entry WHERE id IN ({q})", part)
        return n

    def append_repetition(self, entry: Entry) -> None:
        """Store the newest repetition of an entry already stored (``entry.id``): its timing and every metric, and the
        entry's repetition count, in one transaction (a bench saves each repetition the moment it ends)."""
        i = entry.repetitions - 1
        if entry.id is None or i < 0:
            raise ValueError("append_repetition needs a stored entry with at least one repetition")
        with self._guard("writing"), self._write() as s:
            s.execute("INSERT INTO repetition (entry_id, idx, timing) VALUES (?,?,?)",
                      (entry.id, i, json.dumps(entry.timings[i] if i < len(entry.timings) else {}, default=str)))
            s.executemany("INSERT INTO sample (entry_id, repetition, metric, value) VALUES (?,?,?,?)",
                          [(entry.id, i, k, None if isinstance(v, float) and math.isnan(v) else v)
                           for k, vs in entry.samples.items() if i < len(vs)
                           for v in (vs[i],) if not isinstance(v, str)])
            s.execute("UPDATE entry SET repetitions = ? WHERE id = ?", (entry.repetitions, entry.id))

    @staticmethod
    def _insert(s: Store, entry: Entry, created: str) -> int:
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
        if model:  # its name, its file, or a sha256 prefix of 8 hex digits or more (no wildcard: % and _ are text)
            if re.fullmatch(r"[0-9a-fA-F]{8,64}", model):
                where.append("(model = ? OR model_file = ? OR substr(model_sha256, 1, ?) = ?)")
                args += [model, model, len(model), model.lower()]
            else:
                where.append("(model = ? OR model_file = ?)")
                args += [model, model]
        if protocol:
            where.append("protocol = ?")
            args.append(protocol)
        if label is not None:
            where.append("label = ?")
            args.append(label)
        # newest last: by when it was measured (an import of an old report goes where it belongs), then by id
        cur = self.store.execute("SELECT * FROM entry" + (" WHERE " + " AND ".join(where) if where else "")
                                + " ORDER BY created_at, id", args)
        cols = [d[0] for d in cur.description]
        out = [self._row_to_entry(row, cols) for row in cur.fetchall()]
        if samples:
            self._load_samples(out)
        return out

    def _list_hint(self) -> str:
        """```mvlm history --db LOCATION``` to paste (a URL without its password, then how to give it)."""
        cmd, sep, note = db_option(self.url or self.path).partition(" (")
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

    def named(self, selector: str) -> list[Entry]:
        """Every entry a selector can name, oldest first (``label:main``: every main entry; ``id:3``: that one;
        ``latest~2``: what ``latest`` names); an unknown selector is refused."""
        s = selector.strip()
        if re.fullmatch(r"(?:id:)?([0-9]+)", s, re.ASCII):
            return [self.select(s)]
        m = re.fullmatch(r"(latest|label:.+?|commit:[0-9a-fA-F]+|runtime:[0-9a-zA-Z]+)(?:~([0-9]+))?", s, re.ASCII)
        if not m:
            return [self.select(s)]  # refused there, in its words
        return self._named(m.group(1), None, None, None, None)

    def _named(self, base: str, device, model, protocol, label) -> list[Entry]:
        named = self.entries(device, model, protocol, label)
        if base.startswith("label:"):
            named = [e for e in named if e.label == base[len("label:"):]]
        elif base.startswith("commit:"):
            named = [e for e in named if e.project_commit.lower().startswith(base[len("commit:"):].lower())]
        elif base.startswith("runtime:"):
            named = [e for e in named if e.context.runtime_commit.lower().startswith(base[len("runtime:"):].lower())]
        return named

    def select(self, selector: str, device: str | None = None, model: str | None = None, protocol: str | None = None,
               like: Entry | None = None, exclude: Sequence[int] = (), label: str | None = None) -> Entry:
        """Resolve a selector (module docstring) among the entries the filters match (an id that does not match them
        is refused). ``like``: only entries with the same setup as this one."""
        s = selector.strip()
        m = re.fullmatch(r"(?:id:)?([0-9]+)", s, re.ASCII)
        if m:
            digits = m.group(1).lstrip("0") or "0"
            if len(digits) > len(str(MAX_ID)) or int(digits) > MAX_ID:
                shown = digits if len(digits) <= 30 else digits[:12] + "..."
                raise MvlmError(f"selector id:{shown} is out of range (ids are 1 to {MAX_ID}): "
                                f"{self._list_hint()} lists the stored ids")
            e = self.get(int(digits))
            if (device, model, protocol, label) != (None, None, None, None) and \
                    e.id not in {x.id for x in self.entries(device, model, protocol, label, samples=False)}:
                said = " ".join(f"--{k} {v}" for k, v in (("device", device), ("model", model), ("protocol", protocol),
                                                         ("label", label)) if v is not None)
                raise MvlmError(f"id:{e.id} ({e.describe()}) does not match {said}: drop the filter or name another "
                                "entry (nothing was changed)")
            return e
        m = re.fullmatch(r"(latest|label:.+?|commit:[0-9a-fA-F]+|runtime:[0-9a-zA-Z]+)(?:~([0-9]+))?", s, re.ASCII)
        if not m:
            shown = selector if len(selector) <= 80 else selector[:60] + "..."
            raise MvlmError(f"unknown selector {shown!r}: use latest, latest~N, id:N, label:NAME, commit:SHA, "
                            "runtime:SHA or a JSON file written by `mvlm bench --json-file`")
        back_s = (m.group(2) or "0").lstrip("0") or "0"
        base, back = m.group(1), int(back_s) if len(back_s) <= 18 else MAX_ID  # ~N beyond any history: matches none
        named = [e for e in self._named(base, device, model, protocol, label) if e.id not in exclude]
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


