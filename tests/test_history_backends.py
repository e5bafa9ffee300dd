"""The history on both backends: an embedded SQLite file and a shared PostgreSQL database (a real private cluster,
the ``postgresql`` fixture in conftest.py), through the same API and the same CLI.

Saving, listing, selectors, ``mvlm compare`` and its gate, ``mvlm history import``, spilling when the server is
down, schema versions and migrations (including a SQLite file written by the released v1 code, taken from git),
and N processes saving at once: every test runs on both, and one runs the same CLI session on both and compares.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import psycopg
import pytest

from mvlm_bench.history import database as history_db
from mvlm_bench.history.database import History
from mvlm_bench.history.entries import entries_from_runs
from mvlm_bench.history.spill import save_or_spill
from mvlm_bench.records.record import Run, RunContext
from mvlm_bench.records.timings import TimingRecord
from mvlm_core.errors import MvlmError

REPO = Path(__file__).resolve().parents[1]
V1_COMMIT = "cdef4e0"  # the last commit whose history.py wrote schema version 1 (PRAGMA user_version, no version table)
BACKENDS = ("sqlite", "postgresql")


def _new_database(server_url: str) -> str:
    """A fresh empty database on the test cluster; its URL."""
    name = "h_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server_url, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path) -> str:
    """A location for a new history: a SQLite path, or the URL of an empty PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "h.sqlite")
    return _new_database(request.getfixturevalue("postgresql"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: nobody listens there


def _ctx(runtime="r0", device="orin") -> RunContext:
    return RunContext(device=device, model="MobileVLM-1.7B", precision="q4_k_s", model_file="m.Q4_K_S.gguf",
                      model_sha256="ab" * 32, size_bytes=5_000_000_000, runtime_commit=runtime,
                      runtime_patches=["cls-first.patch"], protocol="lm",
                      params={"n_predict": 64, "n_threads": 4, "n_gpu_layers": 0, "ctx_size": 2048})


_CLOCK = itertools.count(1_800_000_000, 10)


def _entry(eval_tps, runtime="r0", label=""):
    runs = []
    for i, e in enumerate(eval_tps):
        t = TimingRecord(load_ms=800.0 + i, prompt_eval_ms=200.0, prompt_tokens=24, prompt_tps=120.0 + i,
                         eval_ms=63_000 / e, eval_runs=63, eval_tps=e, total_ms=1000 + 63_000 / e,
                         source_format="llama_perf")
        start = next(_CLOCK)  # measured in the order made, at the same times on both backends
        runs.append(Run(t, _ctx(runtime), tokens_out=64, wall_s=1.0 + 64 / e, started_at=start, ended_at=start + 2))
    (out,) = entries_from_runs(runs, label=label, project=("c0ffee" * 6 + "abcd", False))
    return out


def _mvlm(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "MVLM_HISTORY"} | {"COLUMNS": "200"} | (env or {})
    return subprocess.run([sys.executable, "-m", "mvlm", *args], cwd=cwd, capture_output=True, text=True, env=e,
                          timeout=120)


def _sessions(db: str, seed: int, slow: float) -> None:
    """Four baseline sessions (label main, build r0) and a candidate (build r1) ``slow`` slower."""
    global _CLOCK
    _CLOCK = itertools.count(1_800_000_000, 10)  # the same times for the same sessions, on either backend
    rng = np.random.default_rng(seed)
    with History(db) as h:
        for _ in range(4):
            h.save(_entry([float(x) for x in 40 * np.exp(rng.normal(0, 0.01, 5))], label="main"))
        h.save(_entry([float(x) for x in 40 * (1 - slow) * np.exp(rng.normal(0, 0.01, 5))], runtime="r1",
                      label="pr"))


# --- the API ---------------------------------------------------------------------------------------------------------
def test_save_read_select(db):
    a, b = _entry([40.0, 41.5, float("nan"), 39.25], label="main"), _entry([30.0, 31.0], runtime="r1")
    b.samples["eval_tps"].append(float("inf"))
    a.created_at, b.created_at = "2026-01-01T00:00:00+00:00", "2026-01-01T00:00:01+00:00"  # b measured last: latest
    with History(db) as h:
        ids = h.save_many([a, b])
    assert ids[1] == ids[0] + 1 and (a.id, b.id) == tuple(ids)
    with History(db, create=False) as h:
        back = h.get(ids[0])
        assert back.samples["eval_tps"] == [40.0, 41.5, None, 39.25]  # NaN is NULL on both backends
        assert back.context.size_bytes == 5_000_000_000  # more than 32 bits
        assert back.context.params == a.context.params and back.project_commit == a.project_commit
        assert [t["eval_tps"] for t in back.timings][:2] == [40.0, 41.5]
        assert h.select("latest").id == ids[1] and h.select("latest~1").id == ids[0]
        assert h.select("label:main").id == ids[0] and h.select("runtime:r1").id == ids[1]
        assert h.get(ids[1]).samples["eval_tps"][-1] == float("inf")
        assert [e.id for e in h.entries(model="abababab")] == ids  # a sha256 prefix (8 hex digits or more)
        assert h.entries(device="other") == []
        with pytest.raises(MvlmError, match="matches nothing"):
            h.select("label:none")
        with pytest.raises(MvlmError, match=f"no entry id:{ids[1] + 5}"):
            h.get(ids[1] + 5)


def test_schema_version_table(db):
    History(db).close()
    if db.startswith("postgresql"):
        with psycopg.connect(db) as c:
            rows = c.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    else:
        with sqlite3.connect(db) as c:
            rows = c.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
            assert c.execute("PRAGMA user_version").fetchone()[0] == history_db.SCHEMA_VERSION
    assert [r[0] for r in rows] == list(range(1, history_db.SCHEMA_VERSION + 1))


def test_migration_step_and_failure(db, monkeypatch):
    with History(db) as h:
        eid = h.save(_entry([40.0, 41.0], label="old"))
    v = history_db.SCHEMA_VERSION

    def broken(store) -> None:
        store.execute("ALTER TABLE entry ADD COLUMN host TEXT NOT NULL DEFAULT ''")
        store.execute("ALTER TABLE no_such_table ADD COLUMN x TEXT")

    monkeypatch.setattr(history_db, "SCHEMA_VERSION", v + 1)
    monkeypatch.setattr(history_db, "MIGRATIONS", {v: broken})
    with pytest.raises(MvlmError, match="left unchanged"):
        History(db)
    # the same step as shared schema text, for both backends
    monkeypatch.setattr(history_db, "MIGRATIONS", {v: "ALTER TABLE entry ADD COLUMN host TEXT NOT NULL DEFAULT ''"})
    with History(db) as h:
        assert h.get(eid).label == "old"
        cols = [d[0] for d in h.store.execute("SELECT * FROM entry").description]
        versions = [r[0] for r in h.store.execute("SELECT version FROM schema_version ORDER BY version")]
    assert "host" in cols and versions == list(range(1, v + 2))
    monkeypatch.setattr(history_db, "SCHEMA_VERSION", v)
    with pytest.raises(MvlmError, match=f"schema version {v + 1}, newer than this mvlm"):
        History(db)


def test_released_v1_file_is_migrated_in_place(tmp_path, monkeypatch):
    """A history written by the released code (schema 1: PRAGMA user_version, no version table) is opened, migrated
    to the current schema in place, and keeps every row."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{V1_COMMIT}:mvlm_bench/history.py"], capture_output=True,
                         text=True)
    if src.returncode != 0:
        pytest.fail(f"this test reads the released history.py from git ({V1_COMMIT}): {src.stderr.strip()} "
                    "(run it in a full clone)")
    assert "SCHEMA_VERSION = 1" in src.stdout
    mod_file = tmp_path / "history_v1.py"
    # the released code's one project import at module level was `from mvlm_bench.records import RunContext` (the
    # records module, since split into a package): point it at today's RunContext, which it only constructs
    mod_file.write_text(src.stdout.replace("from mvlm_bench.records import RunContext",
                                           "from mvlm_bench.records.record import RunContext"))
    spec = importlib.util.spec_from_file_location("history_v1", mod_file)
    old = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "history_v1", old)  # its dataclasses look their module up
    spec.loader.exec_module(old)
    db = tmp_path / "old.sqlite"
    e = _entry([40.0, 41.0, 39.5], label="v1")
    with old.History(db) as h:
        (eid,) = h.save_many([old.Entry(context=e.context, samples=e.samples, label=e.label, timings=e.timings,
                                        project_commit=e.project_commit)])
    with sqlite3.connect(db) as c:
        assert "schema_version" not in {r[0] for r in c.execute("SELECT name FROM sqlite_master")}
    with History(db, create=False) as h:
        back = h.get(eid)
        h.save(_entry([41.0]))
    assert back.label == "v1" and back.samples["eval_tps"] == [40.0, 41.0, 39.5]
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == history_db.SCHEMA_VERSION
        assert [r[0] for r in c.execute("SELECT version FROM schema_version")] == list(
            range(1, history_db.SCHEMA_VERSION + 1))
    with pytest.raises(MvlmError, match="newer than this mvlm"):  # and the released code no longer writes into it
        old.History(db)


def test_postgres_database_of_something_else_is_refused(postgresql):
    url = _new_database(postgresql)
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("CREATE TABLE entry (x int)")
    with pytest.raises(MvlmError, match="a PostgreSQL database with other tables but not an mvlm benchmark history"):
        History(url)
    with pytest.raises(MvlmError, match="holds no benchmark history"):
        History(_new_database(postgresql), create=False)


# --- the CLI ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_same_answers_on_both_backends(tmp_path, postgresql):
    """One session (history, compare, the gate) on a SQLite file and on PostgreSQL: the same output, less where."""
    outs = []
    for i, db in enumerate((str(tmp_path / "h.sqlite"), _new_database(postgresql))):
        _sessions(db, seed=7, slow=0.12)
        cwd = tmp_path / f"cwd{i}"
        cwd.mkdir()
        listed = _mvlm("history", "--db", db, "--json", cwd=cwd)
        assert listed.returncode == 0, listed.stderr
        cmp_json = _mvlm("compare", "label:main", "latest", "--db", db, "--json", cwd=cwd)
        assert cmp_json.returncode == 0, cmp_json.stderr
        gate = _mvlm("compare", "label:main", "latest", "--db", db, "--fail-on-regression", "5%", cwd=cwd)
        assert gate.returncode == 4, gate.stdout + gate.stderr
        assert "performance regression" in gate.stderr
        ok = _mvlm("compare", "label:main", "latest", "--db", db, "--fail-on-regression", "30%", cwd=cwd)
        assert ok.returncode == 0 and "gate passed" in ok.stderr, ok.stderr
        outs.append((json.loads(listed.stdout), json.loads(cmp_json.stdout), gate.stderr.replace(db, "DB")))
    (lite, pg) = outs
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("source", "created_at")} for r in rows]  # noqa: E731
    assert strip(lite[0]) == strip(pg[0]) and len(lite[0]) == 5
    for c in (lite[1], pg[1]):
        for side in ("baseline", "candidate"):
            c["comparisons"][0][side].pop("source")
            c["comparisons"][0][side].pop("created_at")
    assert lite[1] == pg[1]
    assert lite[2].splitlines()[-1] == pg[2].splitlines()[-1]


@pytest.mark.slow
def test_cli_import_and_spill_when_server_is_down(tmp_path, postgresql, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the spill goes to the current directory (a URL has no directory beside it)
    url = _new_database(postgresql)
    port = _closed_port()
    down = f"postgresql://mvlm:s3cret@127.0.0.1:{port}/lab"
    out = save_or_spill([_entry([40.0, 40.5])], Path(down))  # the CLI's --db is a Path: postgresql:/ is read back
    assert not out.saved and out.spilled is not None and out.spilled.parent == tmp_path
    assert out.spilled.name.startswith("mvlm-history-lab.unsaved-")
    msg = out.message()
    assert "s3cret" not in msg and f"cannot connect to postgresql://mvlm:***@127.0.0.1:{port}/lab: Connection refused" \
        in msg and out.exit_code == 2, msg
    r = _mvlm("history", "import", str(out.spilled), "--db", url, cwd=tmp_path)
    assert r.returncode == 0 and "imported 1 measurement(s)" in r.stderr, r.stderr
    r = _mvlm("history", "import", str(out.spilled), "--db", url, cwd=tmp_path)
    assert r.returncode == 0 and "1 already stored" in r.stderr, r.stderr
    with History(url, create=False) as h:
        (e,) = h.entries()
    assert e.samples["eval_tps"] == [40.0, 40.5]


@pytest.mark.slow
def test_cli_connection_failure_is_one_line(tmp_path):
    port = _closed_port()
    for args in (("history",), ("compare",), ("history", "import", str(REPO / "tests" / "data" / "README.md"))):
        url = f"postgresql://mvlm:s3cret@127.0.0.1:{port}/x"
        r = _mvlm(*args, cwd=tmp_path, env={"MVLM_HISTORY": url}) if args[0] == "compare" else \
            _mvlm(*args, "--db", url, cwd=tmp_path)
        if args[-1].endswith("README.md"):  # not a report: refused before connecting
            assert r.returncode == 2 and "s3cret" not in r.stderr
            continue
        assert r.returncode == 2, r.stderr
        lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("warning: the --db URL carries")]
        assert len(lines) == 1 and "Traceback" not in r.stderr and "s3cret" not in r.stderr + r.stdout, r.stderr
        assert lines[0].startswith(f"error: cannot connect to postgresql://mvlm:***@127.0.0.1:{port}/x: "
                                   "Connection refused"), lines[0]


@pytest.mark.slow
def test_cli_history_masks_password(tmp_path, postgresql):
    url = _new_database(postgresql).replace("mvlm@", "mvlm:hunter2@")  # trust auth: the password is not checked
    with History(url) as h:
        h.save(_entry([40.0]))
        assert "hunter2" not in str(h.path) and h.entries()[0].source.startswith("postgresql://mvlm:***@")
    r = _mvlm("history", "--db", url, cwd=tmp_path)
    assert r.returncode == 0 and "hunter2" not in r.stdout + r.stderr and "mvlm:***@" in r.stdout, r.stdout
    # the hint of a selector that names nothing runs when pasted: the URL without its password, then PGPASSWORD
    r = _mvlm("compare", "id:1", "id:999", "--db", url, cwd=tmp_path)
    hint = url.replace("mvlm:hunter2@", "mvlm@")
    assert r.returncode == 2 and f"`mvlm history --db {hint}` (with PGPASSWORD set" in r.stderr, r.stderr


@pytest.mark.slow
def test_a_url_without_a_host_reaches_the_server_its_parameters_name(tmp_path, postgresql, monkeypatch):
    """libpq's ``postgresql:///db?host=...`` (the Unix-socket form has no host either): every command that takes
    --db, and $MVLM_HISTORY, keep the three slashes (a Path made ``postgresql:/db`` of it, then host ``db``)."""
    import urllib.parse

    url = urllib.parse.urlsplit(_new_database(postgresql))
    bare = f"postgresql:///{url.path.lstrip('/')}?host={url.hostname}&port={url.port}&user={url.username}"
    with History(url.geturl()) as h:
        h.save(_entry([40.0, 41.0, 42.0], label="main"))
        h.save(_entry([40.5, 41.5, 42.5], label="pr"))
    monkeypatch.chdir(tmp_path)  # a spill goes to the current directory
    spilled = save_or_spill([_entry([39.0])], tmp_path / "no-such-dir" / "h.sqlite").spilled  # a bench JSON report
    assert spilled is not None and spilled.parent == tmp_path
    runs = (("history", "--db", bare, "--json"), ("compare", "label:main", "latest", "--db", bare),
            ("history", "import", str(spilled), "--db", bare), ("report", "--paper", "mobilevlm", "--db", bare, "--json"))
    for args in runs:
        r = _mvlm(*args, cwd=tmp_path)
        assert r.returncode == 0, (args, r.stdout + r.stderr)
    r = _mvlm("history", "--json", cwd=tmp_path, env={"MVLM_HISTORY": bare})
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 3, r.stdout + r.stderr  # the import landed there
    assert not any(p.name.startswith("postgres") for p in tmp_path.rglob("*"))  # no SQLite file named after the URL


@pytest.mark.slow
def test_a_user_without_rights_on_the_tables_is_told_so(tmp_path, postgresql):
    """The lab's tables exist but belong to another role: 'permission denied', not 'no mvlm tables: create them'."""
    url = _new_database(postgresql)
    with History(url) as h:
        h.save(_entry([40.0]))
    role = "reader_" + uuid.uuid4().hex[:8]
    with psycopg.connect(postgresql, autocommit=True) as c:
        c.execute(f"CREATE ROLE {role} LOGIN")
    r = _mvlm("history", "--db", url.replace("mvlm@", f"{role}@"), cwd=tmp_path)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "permission denied" in errors[0], r.stderr
    assert "no mvlm tables" not in r.stderr


@pytest.mark.slow  # waits the 1 s it tests
def test_a_table_lock_held_elsewhere_is_waited_for_a_bounded_time(tmp_path, postgresql):
    """Another session holds a lock on the tables (a long migration, a stuck client): the command waits
    $MVLM_HISTORY_LOCK_TIMEOUT seconds, then says so in one line, as with SQLite (it waited without end, silently)."""
    url = _new_database(postgresql)
    with History(url) as h:
        h.save(_entry([40.0]))
    with psycopg.connect(url) as c:  # a transaction of its own, open until the block ends
        c.execute("LOCK TABLE entry IN ACCESS EXCLUSIVE MODE")
        t0 = time.monotonic()
        r = _mvlm("history", "--db", url, cwd=tmp_path, env={"MVLM_HISTORY_LOCK_TIMEOUT": "1"})
        took = time.monotonic() - t0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "is locked by another session (waited 1 s)" in errors[0], r.stderr
    assert took < 30, took
    r = _mvlm("history", "--db", url, "--json", cwd=tmp_path)  # released: readable again
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 1, r.stderr


REFUSED_LOCATIONS = (  # (what the user typed, the secret in it, what the one line says)
    ("host=127.0.0.1 port=5432 dbname=h user=lab password=Hunter2x", "Hunter2x", "libpq key=value string"),
    ("postgresq://lab:TopSecret99@127.0.0.1:5432/h", "TopSecret99", "postgresq:// URL"),
    ("postgresql+psycopg://lab:TopSecret99@127.0.0.1:5432/h", "TopSecret99", "postgresql+psycopg:// URL"),
    ("mysql://lab:TopSecret99@127.0.0.1/h", "TopSecret99", "mysql:// URL"),
    ("postgresql://lab:S3cr;et p@ss/w?rd#1@127.0.0.1:5432/h", "ss/w?rd", "percent-encode"),
    ("postgresql://lab:hun@ter2@127.0.0.1:5432/h", "ter2", "percent-encode"),
    ("postgresql://lab@127.0.0.1:5432/h?password=sec&retXY", "retXY", "percent-encode"),
    ("", None, "is empty"),
)


@pytest.mark.slow  # 8 x 6 CLI runs
@pytest.mark.parametrize(("location", "secret", "says"), REFUSED_LOCATIONS)
def test_a_location_that_is_no_history_is_refused_before_anything_runs(tmp_path, location, secret, says,
                                                                      monkeypatch):
    """A libpq key=value string, another scheme (a typo, SQLAlchemy's postgresql+psycopg://), a URL whose password
    holds unencoded '@', '/' or '&': one line that never shows the password, exit 2, nothing measured or written.
    (They became SQLite files named after the password, or errors that printed part of it.)"""
    given = tmp_path.parent / f"{tmp_path.name}-in"  # a real report to import, outside the directory watched
    given.mkdir()
    monkeypatch.chdir(given)
    report = save_or_spill([_entry([39.0])], given / "absent" / "h.sqlite").spilled
    assert report is not None
    runs = [("history", "--db", location), ("compare", "--db", location), ("report", "--paper", "mobilevlm", "--db",
            location), ("history", "import", str(report), "--db", location),
            ("bench", "--device", "local", "-m", str(tmp_path / "absent.gguf"), "--save", "--db", location)]
    for args in runs:
        r = _mvlm(*args, cwd=tmp_path)
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1 and says in errors[0], (args, r.stderr)
        assert secret is None or secret not in r.stdout + r.stderr, (args, r.stderr)
    if location:  # an empty $MVLM_HISTORY is unset, as usual: the default file
        r = _mvlm("history", cwd=tmp_path, env={"MVLM_HISTORY": location})
        assert r.returncode == 2 and says in r.stderr and (secret is None or secret not in r.stderr), r.stderr
    assert list(tmp_path.iterdir()) == []  # no SQLite file named after it, no spill


BAD_URLS = ("postgresql://mvlm:S3cretPW@[::1/mh",  # does not parse (urlsplit raises; psycopg quotes the whole URI)
            "postgresql://mvlm:S3cret PW@127.0.0.1:{port}/mh")  # a space in the password (psycopg quotes it)


@pytest.mark.slow
@pytest.mark.parametrize("template", BAD_URLS)
def test_password_never_printed_however_malformed_the_url(tmp_path, template, smollm2_gguf, monkeypatch):
    """history, compare, import, report and bench --save (its lease) with a malformed URL: never the password."""
    url = template.format(port=_closed_port())
    secret = "S3cret"
    monkeypatch.chdir(tmp_path)
    report = save_or_spill([_entry([40.0])], Path(f"postgresql://mvlm@127.0.0.1:{_closed_port()}/x")).spilled
    assert report is not None
    cache = tmp_path / "cache"  # a lease directory of its own (another bench on this machine holds the real one)
    cache.mkdir()
    from mvlm_core.runtime import cache_root

    (cache / "runtime").symlink_to(cache_root() / "runtime")
    for args in (("history", "--db", url), ("compare", "--db", url), ("history", "import", str(report), "--db", url),
                 ("report", "--paper", "mobilevlm", "--db", url),
                 ("bench", "--device", "local", "-m", str(smollm2_gguf), "-n", "4", "--repeat", "1", "--save",
                  "--lease-timeout", "0", "--db", url)):
        r = _mvlm(*args, cwd=tmp_path, env={"MVLM_CACHE": str(cache)})
        assert r.returncode != 0 and "Traceback" not in r.stderr, (args, r.stderr)
        assert secret not in r.stdout + r.stderr, (args, r.stdout, r.stderr)
        assert "carries a password" in r.stderr or "--db" not in args  # said once, before anything else
        error = [ln for ln in r.stderr.splitlines() if not ln.startswith("warning: the --db URL carries")]
        assert error[0].startswith("error: ") and "***" in r.stderr, (args, r.stderr)


def test_scrub_needs_no_parseable_url():
    from mvlm_bench.history.locations import scrub, url_password

    url = "postgresql://mvlm:S3cretPW@[::1/mh"
    assert url_password(url) == "S3cretPW"
    assert scrub(f'invalid URI: "{url}"', None) == 'invalid URI: "postgresql://mvlm:***@[::1/mh"'
    spaced = "postgresql://mvlm:S3cret PW@h/mh"
    assert scrub('unexpected spaces found in "S3cret PW"', spaced) == 'unexpected spaces found in "***"'
    assert scrub("host=h password='x y' user=u") == "host=h password=*** user=u"


@pytest.mark.slow
def test_copy_paste_hints_leave_the_password_out(tmp_path, postgresql, monkeypatch):
    """report --paper's fill command and the unsaved-file import hint: the URL without its password, and PGPASSWORD."""
    from mvlm_bench.history.locations import PGPASSWORD_NOTE

    url = _new_database(postgresql).replace("mvlm@", "mvlm:hunter2@")  # trust auth: the password is not checked
    bare = url.replace("mvlm:hunter2@", "mvlm@")
    r = _mvlm("history", "--db", url, cwd=tmp_path)  # not a history yet: the hint to start one
    assert r.returncode == 2 and "hunter2" not in r.stderr and f"--save --db {bare} ({PGPASSWORD_NOTE})`" in r.stderr
    with History(url) as h:
        h.save(_entry([40.0]))
    r = _mvlm("report", "--paper", "mobilevlm", "--db", url, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "hunter2" not in r.stdout + r.stderr, r.stdout
    assert f"--db {bare} ({PGPASSWORD_NOTE})" in " ".join(r.stdout.split()), r.stdout
    monkeypatch.chdir(tmp_path)
    down = f"postgresql://mvlm:hunter2@127.0.0.1:{_closed_port()}/lab"
    out = save_or_spill([_entry([40.0])], Path(down))
    msg = out.message()
    assert out.spilled is not None and "hunter2" not in msg and "mvlm:***@" in msg, msg
    assert f"--db {down.replace('mvlm:hunter2@', 'mvlm@')} ({PGPASSWORD_NOTE})` stores them" in msg, msg


def test_import_of_an_empty_list_says_it_holds_no_records(tmp_path):
    (tmp_path / "e.json").write_text("[]")
    r = _mvlm("history", "import", str(tmp_path / "e.json"), "--db", str(tmp_path / "h.sqlite"), cwd=tmp_path)
    assert r.returncode == 2 and "holds no records" in r.stderr and "expected a list" not in r.stderr, r.stderr


def test_paper_report_reads_postgres(postgresql):
    from mvlm_bench.papers.beside import load_entries

    url = _new_database(postgresql)
    with History(url) as h:
        h.save(_entry([40.0]))
    entries, where, note = load_entries(Path(url), None)
    assert len(entries) == 1 and note is None and str(where) == url


# --- concurrency -----------------------------------------------------------------------------------------------------
_SAVER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from test_history_backends import _entry
from mvlm_bench.history.spill import save_or_spill
time.sleep(max(0.0, float(sys.argv[5]) - time.time()))  # all start together: they race to create the history too
for k in range(int(sys.argv[2])):
    out = save_or_spill([_entry([40.0 + k, 41.0, 39.0], label=f"p{sys.argv[4]}-{k}")], Path(sys.argv[1]))
    if not out.saved:
        sys.exit(out.message())
"""


@pytest.mark.slow
def test_concurrent_saves_lose_nothing(db, tmp_path):
    """6 processes, 10 saves each, all at once into a new history (so they also race to create it): 60 entries."""
    procs, per = 6, 10
    start = time.time() + 4
    ps = [subprocess.Popen([sys.executable, "-c", _SAVER, db, str(per), str(REPO / "tests"), str(i), str(start)],
                           cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(procs)]
    results = [p.communicate(timeout=300) for p in ps]
    for p, (out, err) in zip(ps, results, strict=True):
        assert p.returncode == 0, out + err
    with History(db, create=False) as h:
        entries = h.entries()
    labels = sorted(e.label for e in entries)
    assert labels == sorted(f"p{i}-{k}" for i in range(procs) for k in range(per))
    assert len({e.id for e in entries}) == procs * per and all(e.repetitions == 3 for e in entries)
    assert not list(tmp_path.glob("*.unsaved-*.json"))
    backend = "postgresql" if db.startswith("postgresql") else "sqlite"
    print(f"{backend}: {procs} processes, {procs * per} runs saved, {len(entries)} found")


@pytest.mark.slow
def test_concurrent_real_bench_save(db, tmp_path, host_runtime, smollm2_gguf):
    """6 real `mvlm bench --save` processes (SmolLM2 on this machine, the real host runtime) at once: 6 entries."""
    procs = 6
    ps = []
    for i in range(procs):
        (tmp_path / f"p{i}").mkdir()
        prof = tmp_path / f"p{i}" / "here.toml"  # one device "here"; each process its own work directory
        prof.write_text(f'name = "here"\ntransport = "local"\nworkdir = "{tmp_path / f"dev{i}"}"\ntarget = "host"\n'
                        "threads = 1\n")
        env = {k: v for k, v in os.environ.items() if k != "MVLM_HISTORY"} | {"COLUMNS": "200"}
        ps.append(subprocess.Popen(
            [sys.executable, "-m", "mvlm", "bench", "--device", str(prof), "--protocol", "lm", "--model",
             str(smollm2_gguf), "-n", "8", "--repeat", "2", "--warmup", "0", "--save", "--db", db, "--label", f"p{i}"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=600) for p in ps]
    for p, (_out, err) in zip(ps, results, strict=True):
        assert p.returncode == 0 and "saved as id:" in err, err[-2000:]
    with History(db, create=False) as h:
        entries = h.entries()
    assert sorted(e.label for e in entries) == [f"p{i}" for i in range(procs)]
    assert all(e.repetitions == 2 and all(v and v > 0 for v in e.samples["eval_tps"]) for e in entries)
    assert not list(tmp_path.glob("*.unsaved-*.json"))
    backend = "postgresql" if db.startswith("postgresql") else "sqlite"
    print(f"{backend}: {procs} bench processes, {procs} measurements saved, {len(entries)} found")
