"""Faults of the benchmark history and of `mvlm bench parse` on large or foreign input (issue 13, items 10 and 11).

Real SQLite files damaged the ways files get damaged, a lock held by another real process, a real read-only mount and
a real full tmpfs (as root), and the `mvlm` console script run as a subprocess, so exit codes and one-line errors
are what a user or a CI job sees. The slow tests bench the real SmolLM2 on a local device with the real host runtime
against a damaged history, and parse a 20 MB file of junk around one timing block.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from peers import fill_up

from mvlm_bench.history import entries as history_entries
from mvlm_bench.history.database import History
from mvlm_bench.history.entries import entries_from_runs
from mvlm_bench.history.errors import HistoryError
from mvlm_bench.history.imports import entries_from_json
from mvlm_bench.history.spill import save_or_spill
from mvlm_bench.records.groups import aggregate
from mvlm_bench.records.record import Run, RunContext
from mvlm_bench.records.timings import TimingRecord, parse_file, parse_text
from mvlm_bench.views.exports import render_json
from mvlm_core.errors import MvlmError

MVLM = [sys.executable, "-m", "mvlm"]  # this tree's mvlm, as the console script runs it
DATA = Path(__file__).parent / "data"


def mvlm(*args: object, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    e = dict(os.environ) | {"COLUMNS": "200"} | (env or {})
    e.pop("MVLM_HISTORY", None)
    return subprocess.run([*MVLM, *map(str, args)], cwd=cwd, capture_output=True, text=True, errors="replace", env=e,
                          timeout=timeout)


def error_line(r: subprocess.CompletedProcess) -> str:
    """The command failed with exactly one `error:` line and no traceback; returns that line."""
    assert r.returncode not in (0, 1), (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# --- histories: good ones and the damaged kinds ---------------------------------------------------------------------
def _ctx(runtime: str = "0c1e570") -> RunContext:
    return RunContext(device="orin", model="MobileVLM-1.7B", precision="q4_k_s", model_file="m.Q4_K_S.gguf",
                      model_sha256="ab" * 32, size_bytes=123, runtime_commit=runtime, protocol="lm",
                      params={"n_predict": 400, "n_threads": 4, "n_gpu_layers": 0, "ctx_size": 2048})


def _runs(eval_tps: list[float], runtime: str = "0c1e570") -> list[Run]:
    out = []
    for i, e in enumerate(eval_tps):
        t = TimingRecord(load_ms=800.0 + i, prompt_eval_ms=200.0, prompt_tokens=24, prompt_tps=120.0 + i * 0.1,
                         eval_ms=399_000 / e, eval_runs=399, eval_tps=e, sample_ms=40.0, sample_runs=400,
                         sample_tps=10_000.0, total_ms=1000 + 399_000 / e, source_format="llama_perf")
        out.append(Run(t, _ctx(runtime), tokens_out=400, wall_s=1.2 + 400 / e, started_at=1.8e9 + 10 * i,
                       ended_at=1.8e9 + 10 * i + 5))  # every entry measured at the same (fixed) times
    return out


def _entries(eval_tps: list[float], label: str = "", runtime: str = "0c1e570") -> list[history_entries.Entry]:
    return entries_from_runs(_runs(eval_tps, runtime), label=label, project=("c0ffee" * 6, False))


def good_db(path: Path, reps: int = 150) -> Path:
    rng = random.Random(1)
    with History(path) as h:
        for i in range(3):
            h.save(_entries([40.0 + rng.random() for _ in range(reps)], label=f"e{i}", runtime=f"r{i}")[0])
    return path


def _damage(kind: str, p: Path) -> None:
    if kind == "random-bytes":
        p.write_bytes(random.Random(0).randbytes(8192))
    elif kind == "text-file":
        p.write_text("device,model,eval_tps\norin,MobileVLM,40.1\n")
    elif kind == "truncated":
        data = good_db(p).read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif kind == "damaged-page":
        data = bytearray(good_db(p).read_bytes())
        data[8192 : 8192 + 4096] = b"\x55" * 4096  # page 3, a b-tree page, overwritten
        p.write_bytes(bytes(data))
    elif kind == "another-schema":
        con = sqlite3.connect(p)
        con.execute("CREATE TABLE measurements (device TEXT, eval_tps REAL)")
        con.commit()
        con.close()
    elif kind == "table-dropped":
        con = sqlite3.connect(good_db(p))
        con.execute("DROP TABLE sample")
        con.commit()
        con.close()
    elif kind == "bad-row":
        con = sqlite3.connect(good_db(p))
        con.execute("UPDATE entry SET params = '{not json'")
        con.commit()
        con.close()
    elif kind in ("text-value", "blob-value"):  # a value edited by hand: SQLite keeps text/blob in a REAL column
        con = sqlite3.connect(good_db(p))
        value = "'fast'" if kind == "text-value" else "X'00ff'"
        con.execute(f"UPDATE sample SET value = {value} WHERE entry_id = 2 AND repetition = 3 AND metric = 'eval_tps'")
        assert con.execute("SELECT typeof(value) FROM sample WHERE entry_id = 2 AND repetition = 3 "
                           "AND metric = 'eval_tps'").fetchone()[0] == kind.split("-")[0]
        con.commit()
        con.close()
    elif kind == "empty-file":
        p.write_bytes(b"")
    elif kind == "directory":
        p.mkdir()
    else:
        raise AssertionError(kind)


FAULTS = {  # kind -> what the one line says
    "random-bytes": "not a readable SQLite benchmark history",
    "text-file": "not a readable SQLite benchmark history",
    "truncated": "is damaged",
    "damaged-page": "is damaged",
    "another-schema": "not an mvlm benchmark history",
    "table-dropped": "is damaged",
    "bad-row": "is damaged",
    "text-value": "is damaged",
    "blob-value": "is damaged",
    "empty-file": "holds no benchmark history",
    "directory": "is a directory",
}


def _state(p: Path) -> object:
    return sorted(x.name for x in p.iterdir()) if p.is_dir() else sha(p)


@pytest.mark.slow
@pytest.mark.parametrize("kind", FAULTS)
@pytest.mark.parametrize("command", [["history"], ["history", "--json"], ["compare"], ["history", "plot"]],
                         ids=["history", "history-json", "compare", "plot"])
def test_damaged_history_is_one_line_and_left_alone(tmp_path, kind, command):
    db = tmp_path / "h.sqlite"
    _damage(kind, db)
    before = _state(db)
    r = mvlm(*command, "--db", db, cwd=tmp_path)
    line = error_line(r)
    assert r.returncode == 2 and str(db) in line and FAULTS[kind] in line, line
    if kind.endswith("-value"):  # the row is named, and what is wrong with it
        assert "entry 2 repetition 3" in line and "sample values must be numbers" in line, line
    assert _state(db) == before  # reading commands never write
    assert sorted(x.name for x in tmp_path.iterdir()) == ["h.sqlite"]  # no journal, no plots, nothing


# an empty file is a new history to a save, and a row with bad JSON does not stop one (it stops reading it)
SAVE_FAULTS = [k for k in FAULTS if k not in ("empty-file", "bad-row", "text-value", "blob-value")]


@pytest.mark.parametrize("kind", SAVE_FAULTS)
def test_failed_save_spills_the_runs_beside_the_history(tmp_path, kind, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "h.sqlite"
    _damage(kind, db)
    before = _state(db)
    entries = _entries([40.0, 41.0, 39.5], label="pr-7")
    out = save_or_spill(entries, db)
    assert not out.saved and out.ids == [] and isinstance(out.error, HistoryError)
    assert out.spilled is not None and out.spilled.parent == tmp_path
    assert out.spilled.name.startswith("h.sqlite.unsaved-") and out.spilled.suffix == ".json"
    msg = out.message()
    assert "\n" not in msg and str(db) in msg and str(out.spilled) in msg and FAULTS[kind] in msg
    assert "mvlm history import" in msg
    assert _state(db) == before  # a failed save never touches the file
    (back,) = entries_from_json(out.spilled)
    assert back.samples["eval_tps"] == [40.0, 41.0, 39.5] and back.label == "pr-7"
    assert back.project_commit == "c0ffee" * 6 and back.created_at == entries[0].created_at != ""
    assert back.context.model_sha256 == "ab" * 32 and len(back.timings) == 3


@pytest.mark.slow
def test_locked_history_waits_then_says_so(tmp_path, monkeypatch):
    db = good_db(tmp_path / "h.sqlite")
    before = sha(db)
    locker = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""\
            import sqlite3, sys
            con = sqlite3.connect({str(db)!r}, isolation_level=None)
            con.execute("BEGIN EXCLUSIVE")
            con.execute("DELETE FROM sample")  # a writer in the middle of its transaction
            print("locked", flush=True)
            sys.stdin.read()  # hold the lock until the test closes stdin
            """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        r = mvlm("history", "--db", db, cwd=tmp_path, env={"MVLM_HISTORY_LOCK_TIMEOUT": "0.3"})
        line = error_line(r)
        assert r.returncode == 2 and "locked by another process (waited 0.3 s)" in line and str(db) in line
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MVLM_HISTORY_LOCK_TIMEOUT", "0.3")
        out = save_or_spill(_entries([40.0, 41.0]), db)
        assert not out.saved and "locked" in out.message() and out.spilled and out.spilled.is_file()
    finally:
        locker.stdin.close()  # the writer ends without committing: its change is rolled back
        locker.wait(timeout=30)
    assert sha(db) == before
    r = mvlm("history", "--db", db, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [len(e["samples"]["eval_tps"]) for e in json.loads(r.stdout)] == [150, 150, 150]


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory mounted read-only (a bind mount remounted ro; needs root), with a good history in it."""
    src = tmp_path / "src"
    src.mkdir()
    good_db(src / "h.sqlite")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    r = subprocess.run(["mount", "--bind", str(src), str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"a read-only history needs a read-only mount, and mounting needs root: {r.stderr.strip()}")
    try:
        r = subprocess.run(["mount", "-o", "remount,ro,bind", str(mnt)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_read_only_history_reads_and_spills_to_the_current_directory(tmp_path, read_only_dir, monkeypatch):
    db = read_only_dir / "h.sqlite"
    before = sha(db)
    r = mvlm("history", "--db", db, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # reading a read-only history works
    assert [e["label"] for e in json.loads(r.stdout)] == ["e0", "e1", "e2"]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    out = save_or_spill(_entries([40.0, 41.0, 42.0]), db)
    assert not out.saved and "is read-only" in out.message()
    assert out.spilled is not None and out.spilled.parent == work  # its own directory cannot take the file
    assert entries_from_json(out.spilled)[0].samples["eval_tps"] == [40.0, 41.0, 42.0]
    assert sha(db) == before
    out = save_or_spill(_entries([40.0]), read_only_dir / "new.sqlite")
    assert not out.saved and "cannot create" in out.message() and "is not writable" in out.message()
    assert out.spilled is not None and out.spilled.parent == work
    assert sorted(x.name for x in read_only_dir.iterdir()) == ["h.sqlite"]


@pytest.mark.slow
def test_disk_full_save_keeps_the_good_history_and_spills_elsewhere(tmp_path, small_fs, monkeypatch):
    fs = small_fs(512 * 1024)
    db = good_db(fs / "h.sqlite", reps=20)
    fill_up(fs / "filler")
    before = sha(db)
    monkeypatch.chdir(tmp_path)
    big = _entries([40.0 + i / 1000 for i in range(3000)])  # needs many new pages (and a journal)
    out = save_or_spill(big, db)
    assert not out.saved and "is full" in out.message() and out.exit_code == 28
    assert out.spilled is not None and out.spilled.parent == tmp_path  # beside the history: no space
    assert len(entries_from_json(out.spilled)[0].samples["eval_tps"]) == 3000
    assert sha(db) == before and sorted(x.name for x in fs.iterdir()) == ["filler", "h.sqlite"]
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT COUNT(*) FROM entry").fetchone()[0] == 3
    con.close()


def test_empty_file_becomes_a_history_on_save(tmp_path):
    db = tmp_path / "h.sqlite"
    db.write_bytes(b"")
    out = save_or_spill(_entries([40.0, 41.0]), db)
    assert out.saved and out.ids == [1] and out.spilled is None and "saved as id:1" in out.message()
    with History(db, create=False) as h:
        assert h.get(1).samples["eval_tps"] == [40.0, 41.0]


def test_save_of_several_entries_is_one_transaction(tmp_path):
    db = good_db(tmp_path / "h.sqlite", reps=5)
    good = _entries([40.0, 41.0])[0]
    bad = _entries([30.0, 31.0], runtime="other")[0]
    bad.samples["eval_tps"][1] = object()  # a value SQLite cannot store: fails after the first entry went in
    with History(db) as h, pytest.raises(HistoryError):
        h.save_many([good, bad])
    with History(db, create=False) as h:
        assert [e.label for e in h.entries()] == ["e0", "e1", "e2"]  # neither entry: all or nothing
    assert good.id is None


def test_new_history_that_cannot_be_created_leaves_no_file(tmp_path, small_fs):
    fs = small_fs(64 * 1024)
    fill_up(fs / "filler")
    with pytest.raises(HistoryError, match="is full"):
        History(fs / "new.sqlite")
    assert sorted(x.name for x in fs.iterdir()) == ["filler"]


# --- selectors and the other inputs of compare / history -------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("selector", "says"), [
    ("id:99999999999999999999999", "out of range"),
    ("99999999999999999999999", "out of range"),
    ("id:" + "9" * 5000, "out of range"),
    ("latest~" + "9" * 5000, "matches nothing"),
    ("label:nope~99999999999999999999", "matches nothing"),
    ("id:0", "no entry id:0"),
    ("label:", "unknown selector"),
    ("commit:xyz", "unknown selector"),
    ("id:-1", "unknown selector"),
    ("x" * 300, "unknown selector"),  # longer than a file name may be
    ("adir", "is a directory"),
    ("missing.json", "does not exist"),
], ids=lambda v: v[:20] if isinstance(v, str) else v)
def test_compare_selectors_are_validated(tmp_path, selector, says):
    db = good_db(tmp_path / "h.sqlite", reps=5)
    (tmp_path / "adir").mkdir()
    before = sha(db)
    r = mvlm("compare", selector, "latest", "--db", db, cwd=tmp_path)
    line = error_line(r)
    assert r.returncode == 2 and says in line and len(line) < 600, line
    assert sha(db) == before


@pytest.mark.slow
def test_compare_options_are_validated(tmp_path):
    db = good_db(tmp_path / "h.sqlite", reps=5)
    before = sha(db)
    for args, says in ((["--alpha", "2"], "not a significance level"), (["--alpha", "nan"], "not a significance"),
                       (["--markdown", str(db)], "also an input"),
                       (["--markdown", str(tmp_path / "no" / "such" / "dir" / "x.md")], "cannot write")):
        r = mvlm("compare", "latest~1", "latest", "--db", db, *args, cwd=tmp_path)
        assert says in error_line(r), (args, r.stderr)
    assert sha(db) == before
    r = mvlm("history", "plot", "--db", db, "--out", db, cwd=tmp_path)
    assert "is a file" in error_line(r)


@pytest.mark.slow
def test_spill_file_round_trip_compare_and_import(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.sqlite"
    _damage("random-bytes", bad)
    a = save_or_spill(_entries([40.0, 40.3, 39.9, 40.1], label="main"), bad)
    b = save_or_spill(_entries([30.0, 30.2, 29.9, 30.1], label="pr", runtime="r2"), bad)
    assert a.spilled and b.spilled and a.spilled != b.spilled
    r = mvlm("compare", a.spilled, b.spilled, "--metric", "eval_tps", "--fail-on-regression", "5%", cwd=tmp_path)
    assert r.returncode == 4 and "40.05 -> 30.05" in error_line(r)  # mvlm compare reads the spilled files as they are
    fresh = tmp_path / "fresh.sqlite"
    r = mvlm("history", "import", a.spilled, b.spilled, "--db", fresh, cwd=tmp_path)
    assert r.returncode == 0 and "imported 2 measurement(s): id:1, id:2" in r.stderr, r.stderr
    r = mvlm("history", "import", a.spilled, "--db", fresh, cwd=tmp_path)
    assert r.returncode == 0 and "imported 0 measurement(s)" in r.stderr and "1 already stored" in r.stderr
    r = mvlm("history", "--db", fresh, "--json", cwd=tmp_path)
    rows = json.loads(r.stdout)
    assert [(x["label"], x["created_at"], x["runtime_commit"]) for x in rows] == [
        ("main", a.entries[0].created_at, "0c1e570"), ("pr", b.entries[0].created_at, "r2")]
    assert rows[0]["samples"]["eval_tps"] == [40.0, 40.3, 39.9, 40.1]
    r = mvlm("compare", "label:main", "label:pr", "--db", fresh, "--metric", "eval_tps", cwd=tmp_path)
    assert r.returncode == 0 and "slower" in r.stdout


def _ab_runs(level_a: float, level_b: float) -> list[Run]:
    """An A/B session's runs: both sides, each context marked with its side (as `mvlm bench --against` does)."""
    import dataclasses

    out = []
    for side, level in (("baseline", level_a), ("candidate", level_b)):
        for r in _runs([level, level + 0.3, level - 0.1]):
            ctx = dataclasses.replace(r.context, params=r.context.params | {"ab_side": side}, model=f"M ({side})")
            out.append(dataclasses.replace(r, context=ctx))
    return out


@pytest.mark.slow
def test_import_of_bench_json_reports_stores_each_measurement_once_at_its_measurement_time(tmp_path):
    """`mvlm bench --json` records carry when they were measured (test_time, start/end unix times); importing one
    twice, a copy of it, an A/B report twice, or a report of runs `--save` already stored, stores nothing new."""
    import datetime as dt
    import shutil

    runs = _runs([40.0, 40.3, 39.9])
    before_s = min(r.ended_at for r in runs) - 60
    report = tmp_path / "bench.json"
    report.write_text(render_json(aggregate(runs)))
    (rec,) = json.loads(report.read_text())
    assert rec["test_time"].endswith("Z") and before_s < rec["start_time"] <= rec["end_time"]
    measured = dt.datetime.fromisoformat(rec["test_time"]).isoformat(timespec="seconds")
    ab = tmp_path / "ab.json"
    ab.write_text(render_json(aggregate(_ab_runs(40.0, 36.0))))
    copy = tmp_path / "copy-of-bench.json"
    shutil.copy(report, copy)
    db = tmp_path / "h.sqlite"
    r = mvlm("history", "import", report, "--db", db, cwd=tmp_path)
    assert r.returncode == 0 and "imported 1 measurement(s): id:1" in r.stderr, r.stderr
    for again in ([report], [copy], [report, copy]):
        r = mvlm("history", "import", *again, "--db", db, cwd=tmp_path)
        assert r.returncode == 0 and "imported 0 measurement(s)" in r.stderr, r.stderr
        assert f"{len(again)} already stored" in r.stderr
    r = mvlm("history", "import", ab, ab, "--db", db, cwd=tmp_path)  # the same A/B file twice in one command
    assert r.returncode == 0 and "imported 2 measurement(s): id:2, id:3" in r.stderr, r.stderr
    r = mvlm("history", "import", ab, "--db", db, cwd=tmp_path)
    assert r.returncode == 0 and "imported 0 measurement(s)" in r.stderr and "2 already stored" in r.stderr
    with History(db, create=False) as h:
        stored = h.entries()
    assert [e.created_at for e in stored][0] == measured  # its measurement time, not the import time
    assert sorted(e.context.params.get("ab_side", "") for e in stored) == ["", "baseline", "candidate"]
    assert [e.id for e in stored] == [1, 2, 3]  # an import of an old report again did not become `latest`
    # runs already stored by `bench --save` (label, project commit) and then imported from the --json report
    saved = tmp_path / "saved.sqlite"
    entries = _entries([41.0, 41.2, 40.9], label="main")
    assert save_or_spill(entries, saved).saved
    same = tmp_path / "same.json"
    same.write_text(render_json(aggregate(_runs([41.0, 41.2, 40.9]))))
    r = mvlm("history", "import", same, "--db", saved, cwd=tmp_path)
    assert r.returncode == 0 and "imported 0 measurement(s)" in r.stderr and "1 already stored" in r.stderr
    # another build with the same values is another measurement
    other = tmp_path / "other.json"
    other.write_text(render_json(aggregate(_runs([41.0, 41.2, 40.9], runtime="r2"))))
    r = mvlm("history", "import", other, "--db", saved, cwd=tmp_path)
    assert r.returncode == 0 and "imported 1 measurement(s)" in r.stderr


def test_bench_json_record_without_a_time_is_imported_at_the_import_time_and_bad_times_are_refused(tmp_path):
    report = tmp_path / "old.json"
    recs = json.loads(render_json(aggregate(_runs([40.0, 40.3]))))
    for k in ("test_time", "start_time", "end_time"):
        del recs[0][k]
    report.write_text(json.dumps(recs))
    (e,) = entries_from_json(report)
    assert e.created_at == ""  # save_many gives it the import time
    recs[0]["test_time"] = "yesterday"
    report.write_text(json.dumps(recs))
    r = mvlm("history", "import", report, "--db", tmp_path / "h.sqlite", cwd=tmp_path)
    assert "'test_time' 'yesterday' is not an ISO 8601 time" in error_line(r) and r.returncode == 2
    assert not (tmp_path / "h.sqlite").exists()


@pytest.mark.slow
def test_non_positive_speed_values_are_left_out_with_a_warning(tmp_path):
    """A negative or zero Eval tokens/s (an edited row, a damaged JSON) is not a measurement: every comparison leaves it
    out and says so; when nothing valid is left for a gated metric the gate says it was not applied (never 'passed'
    on a 'slower' verdict with speedup '–')."""
    db = tmp_path / "h.sqlite"
    with History(db) as h:
        for i in range(4):
            h.save(_entries([40.0 + i * 0.1, 40.2, 39.9], label="main")[0])
        h.save(_entries([-40.0, -41.0, -39.0], label="pr", runtime="r2")[0])
    r = mvlm("compare", "label:main", "latest", "--db", db, "--metric", "eval_tps", "--fail-on-regression", "5%",
             cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 non-positive value(s) ignored (3 in the candidate)" in r.stderr and "not gated" in r.stderr
    assert "gate not applied" in r.stderr and "gate passed" not in r.stderr and "slower" not in r.stdout
    r = mvlm("compare", "label:main", "latest", "--db", db, "--metric", "eval_tps", "--json", cwd=tmp_path)
    (ev,) = json.loads(r.stdout)["comparisons"][0]["metrics"]
    assert ev["verdict"] == "n/a" and ev["dropped_candidate"] == 3 and ev["speedup"] is None
    assert any("non-positive" in w for w in json.loads(r.stdout)["comparisons"][0]["warnings"])
    # one bad value among good ones: left out, the rest still judged (a real 25% slowdown fails)
    con = sqlite3.connect(db)
    con.execute("UPDATE sample SET value = 30.0 WHERE entry_id = 5 AND metric = 'eval_tps' AND repetition > 0")
    con.execute("UPDATE sample SET value = 30.2 WHERE entry_id = 5 AND metric = 'eval_tps' AND repetition = 2")
    con.execute("UPDATE sample SET value = 0 WHERE entry_id = 2 AND metric = 'eval_tps' AND repetition = 1")
    con.commit()
    con.close()
    r = mvlm("compare", "label:main", "latest", "--db", db, "--metric", "eval_tps", "--fail-on-regression", "5%",
             cwd=tmp_path)
    line = error_line(r)
    assert r.returncode == 4 and "40.1 -> 30.1: 24.9% worse" in line, r.stderr
    assert "1 in the baseline's sessions" in r.stderr and "1 in the candidate" in r.stderr
    # a JSON file is read as an import reads it: a negative speed is no report mvlm writes, refused in one line
    # (a zero one, which a damaged run can give, is left out with the same warning)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(render_json(aggregate(_runs([40.0, 40.3, 39.9, 40.1]))))
    b.write_text(render_json(aggregate(_runs([30.0, 30.2, -29.9, 30.1]))))
    assert "is -29.9: a speed or a duration is never negative" in error_line(mvlm("compare", a, b, cwd=tmp_path))
    (rec,) = json.loads(render_json(aggregate(_runs([30.0, 30.2, 29.9, 30.1]))))
    rec["runs"][2]["metrics"]["eval_tps"] = 0.0
    b.write_text(json.dumps([rec]))
    r = mvlm("compare", a, b, "--metric", "eval_tps", cwd=tmp_path)
    assert r.returncode == 0 and "1 non-positive value(s) ignored (1 in the candidate)" in r.stderr, r.stderr


def test_a_damaged_history_keeps_the_gate_and_the_runs(tmp_path, monkeypatch):
    """After a bench: a damaged history does not stop the comparison with a JSON baseline, nor lose the runs: the
    history sink spills them beside it, the gate still judges (exit 4), and the file is left as it was."""
    from mvlm_bench.decide.gate import pair_entries
    from mvlm_bench.decide.verdict import EXIT_REGRESSION, judge_pairs, resolve
    from mvlm_bench.sinks.base import Sinks
    from mvlm_bench.sinks.history_sink import HistorySink

    monkeypatch.chdir(tmp_path)
    base = tmp_path / "base.json"
    base.write_text(render_json(aggregate(_runs([40.0, 40.3, 39.9, 40.1]))))
    bad = tmp_path / "bad.sqlite"
    _damage("truncated", bad)
    before = sha(bad)
    sink = HistorySink(bad, label="pr")
    sinks = Sinks([sink])
    for run in _runs([30.0, 30.2, 29.9, 30.1]):
        sinks.emit(run)
    sinks.close()
    ((_, error),) = sinks.errors
    (spill,) = tmp_path.glob("bad.sqlite.unsaved-*.json")
    assert "not saved" in str(error) and str(spill) in str(error) and error.exit_code == 2
    (stored,) = entries_from_json(spill)
    assert stored.label == "pr" and stored.repetitions == 4 and sha(bad) == before
    verdict = judge_pairs(pair_entries(resolve(str(base), bad), [stored]), None, 0.05, 0.05)
    assert verdict.error().exit_code == EXIT_REGRESSION and "performance regression" in str(verdict.error())
    good = good_db(tmp_path / "good.sqlite", reps=5)
    sink = HistorySink(good, label="pr")
    sinks = Sinks([sink])
    for run in _runs([30.0, 30.2]):
        sinks.emit(run)
    sinks.close()
    assert not sinks.errors and sink.message().startswith("saved as id:4 in")
    with pytest.raises(MvlmError, match="matches nothing"):
        resolve("label:nope", good, like=next(iter(sink.entries.values())))


# --- llama-bench files in compare (they used to be "Extra data" for JSONL) -------------------------------------------
_LB_FIELDS = ["build_commit", "build_number", "cpu_info", "gpu_info", "backends", "model_filename", "model_type",
              "model_size", "model_n_params", "n_threads", "n_prompt", "n_gen", "n_depth", "test_time", "avg_ns",
              "stddev_ns", "avg_ts", "stddev_ts"]


def _lb_rows(scale: float) -> list[dict]:
    rows = []
    for n_p, n_g, ts in ((16, 0, 200.0), (0, 8, 60.0)):
        samples = [ts * scale * f for f in (0.99, 1.0, 1.01)]
        rows.append({"build_commit": "0c1e570", "build_number": 1, "cpu_info": "Xeon", "gpu_info": "", "backends": "CPU",
                     "model_filename": "m.gguf", "model_type": "llama 256M Q4_1", "model_size": 96576768,
                     "model_n_params": 134515008, "n_threads": 2, "n_prompt": n_p, "n_gen": n_g, "n_depth": 0,
                     "test_time": "2026-01-01T00:00:00Z", "avg_ns": int(1e9 * (n_p + n_g) / ts), "stddev_ns": 1000,
                     "avg_ts": ts * scale, "stddev_ts": 1.0, "samples_ns": [int(1e9 * (n_p + n_g) / s) for s in samples],
                     "samples_ts": samples})
    return rows


def _write_lb(path: Path, fmt: str, scale: float) -> Path:
    """llama-bench output in its printers' layouts (tools/llama-bench/llama-bench.cpp), with stderr noise."""
    rows = _lb_rows(scale)
    noise = "load_backend: loaded CPU backend from libggml-cpu.so\n"
    if fmt == "jsonl":
        body = "".join(json.dumps(r) + "\n" for r in rows)
    elif fmt == "json":
        body = json.dumps(rows, indent=2) + "\n"
    elif fmt == "csv":
        body = ",".join(_LB_FIELDS) + "\n" + "".join(",".join(f'"{r[k]}"' for k in _LB_FIELDS) + "\n" for r in rows)
    elif fmt == "md":
        body = "| model | size | params | backend | threads | test | t/s |\n| --- | ---: | ---: | --- | ---: | ---: | ---: |\n"
        body += "".join(f"| llama 256M Q4_1 | 92.10 MiB | 134.52 M | CPU | 2 | {'pp16' if r['n_prompt'] else 'tg8'} | "
                        f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f} |\n" for r in rows) + "\nbuild: 0c1e570 (1)\n"
    elif fmt == "sql":
        body = "CREATE TABLE IF NOT EXISTS llama_bench (\n" + ",\n".join(f"  {k} TEXT" for k in _LB_FIELDS) + "\n);\n\n"
        body += "".join(f"INSERT INTO llama_bench ({', '.join(_LB_FIELDS)}) VALUES ("
                        + ", ".join(f"'{r[k]}'" for k in _LB_FIELDS) + ");\n" for r in rows)
    else:
        raise AssertionError(fmt)
    path.write_text(noise + body)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "md", "sql"])
def test_compare_reads_every_llama_bench_format(tmp_path, fmt):
    a = _write_lb(tmp_path / f"a.{fmt}", fmt, 1.0)
    b = _write_lb(tmp_path / f"b.{fmt}", fmt, 0.5)
    r = mvlm("compare", a, b, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    metrics = {m["key"]: m for m in json.loads(r.stdout)["comparisons"][0]["metrics"]}
    assert set(metrics) == {"pp16_tps", "tg8_tps", "prompt_tps", "eval_tps"}
    assert metrics["tg8_tps"]["speedup"] == metrics["eval_tps"]["speedup"] == pytest.approx(0.5)
    assert metrics["tg8_tps"]["n_baseline"] == (1 if fmt in ("csv", "md", "sql") else 3)  # csv/md/sql: no samples


@pytest.mark.parametrize(("content", "says"), [
    ('{"a": 1}\n{"b": 2}\n', "JSON lines that are not llama-bench records"),
    ("CREATE TABLE t (a INTEGER);\nINSERT INTO t VALUES (1);\n", "SQL statements that are not llama-bench rows"),
    ("just some notes\nabout a run\n", "line(s) of other text"),
    (b"\x00\x01\x02\xff" * 1000, "binary data"),
    ("", "an empty file"),
])
def test_compare_refuses_other_files_in_one_line(tmp_path, content, says):
    p = tmp_path / "thing.log"
    if content == "sql":
        _write_lb(p, "sql", 1.0)
    elif isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    r = mvlm("compare", p, p, cwd=tmp_path)
    line = error_line(r)
    assert r.returncode == 2 and str(p) in line and says in line and "Extra data" not in line, line


# --- bench --save with a real bench ------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_bench_save_into_a_damaged_history_loses_nothing(tmp_path, host_runtime, smollm2_gguf):
    """The real SmolLM2 benched on a local device; the history is a SQLite file with a damaged page (found only when
    it is opened to save): the runs land in a JSON file. A --db that is no SQLite file at all (random bytes) is
    refused before anything is measured."""
    profile = tmp_path / "local.toml"  # the local transport, with its own work directory (tests run side by side)
    profile.write_text(f'name = "local"\ntransport = "local"\nworkdir = "{tmp_path / "device"}"\ntarget = "host"\n'
                       "threads = 2\n")
    db = tmp_path / "hist" / "h.sqlite"
    db.parent.mkdir()
    bench = ["bench", "--device", profile, "--protocol", "lm", "--model", smollm2_gguf, "-n", "16", "--repeat", "2",
             "--warmup", "0", "--save", "--db", db]
    _damage("random-bytes", db)
    r = mvlm(*bench, cwd=tmp_path, timeout=600)
    assert "is not a SQLite benchmark history" in error_line(r) and "run 1/" not in r.stderr
    db.unlink()
    _damage("damaged-page", db)
    before = sha(db)
    spills = []
    for label in ("first", "second"):
        r = mvlm(*bench, "--label", label, cwd=tmp_path, timeout=600)
        line = error_line(r)
        assert r.returncode == 2 and "not saved to the benchmark history" in line and str(db) in line, line
        assert "Eval" in r.stdout  # the report was printed before the save
        new = sorted(set(db.parent.glob("h.sqlite.unsaved-*.json")) - set(spills))
        assert len(new) == 1 and str(new[0]) in line, line
        spills += new
        (e,) = entries_from_json(new[0])
        assert e.label == label and e.repetitions == 2 and all(v > 0 for v in e.samples["eval_tps"])
        assert e.context.model_sha256 == sha(smollm2_gguf) and e.context.runtime_commit
    assert sha(db) == before
    r = mvlm("compare", *spills, cwd=tmp_path)
    assert r.returncode == 0 and "Eval" in r.stdout, r.stderr
    fresh = tmp_path / "fresh.sqlite"
    r = mvlm("history", "import", *spills, "--db", fresh, cwd=tmp_path)
    assert r.returncode == 0 and "imported 2 measurement(s)" in r.stderr, r.stderr
    with History(fresh, create=False) as h:
        assert [(x.label, x.repetitions) for x in h.entries()] == [("first", 2), ("second", 2)]


# --- bench parse: streaming, bounded, and one line for a file without timings -------------------------------------
# a real llama_perf block (tests/data/llama-cpp-outputs/17_…: llama-cli, 2025-05), its 5 lines after the header
PERF = "".join((DATA / "llama-cpp-outputs" / "17_issue9013_llama-cli_llama-perf_interrupted_2025-05.txt")
               .read_text().splitlines(keepends=True)[2:7])


def _check_perf(rec) -> None:
    assert (rec.eval_tps, rec.eval_runs, rec.prompt_tokens, rec.total_ms, rec.sample_runs, rec.load_ms) == (
        12.64, 178, 49, 20699.49, 227, 618.92), rec


def _junk(rng: random.Random, size: int) -> bytes:
    """What made the old parser quadratic: random bytes, '[' lines it tried to decode as JSON, long words before
    ' time', unterminated escape sequences, csv look-alikes."""
    parts = [rng.randbytes(size // 2)]
    lines = []
    n = 0
    while n < size // 2:
        k = rng.randrange(5)
        line = ("[" + "x" * rng.randrange(50) if k == 0 else "w" * rng.randrange(2000, 9000) + " time = 1 ms" if k == 1
                else "\x1b]" * 300 if k == 2 else "avg_ts,n_prompt,x\n1,2" if k == 3 else "{\"avg_ts\": [1,")
        lines.append(line)
        n += len(line) + 1
    parts.append("\n".join(lines).encode())
    rng.shuffle(parts)
    return b"".join(parts)


@pytest.mark.slow
def test_parse_20mb_of_junk_with_one_block_in_bounded_memory(tmp_path):
    rng = random.Random(7)
    p = tmp_path / "big.log"
    with open(p, "wb") as f:
        f.write(_junk(rng, 10_000_000))
        f.write(b"\n" + PERF.encode())
        f.write(_junk(rng, 10_000_000))
    assert p.stat().st_size > 20_000_000
    child = textwrap.dedent("""\
        import json, resource, sys
        from mvlm_bench.records.timings import parse_file
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rec = parse_file(sys.argv[1])
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"growth_kb": after - before, "rec": rec.to_dict()}))
        """)
    r = subprocess.run([sys.executable, "-c", child, str(p)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["growth_kb"] < 200 * 1024, out["growth_kb"]  # the file is 20 MB; the old parser grew by ~20x that
    rec = TimingRecord(**{k: v for k, v in out["rec"].items()})
    _check_perf(rec)
    r = mvlm("bench", "parse", "--json", p, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    _check_perf(TimingRecord(**{k: v for k, v in json.loads(r.stdout)[0].items() if k != "file"}))


def test_timing_line_glued_after_megabytes_of_text_is_found():
    text = "word " * 400_000 + PERF  # 2 MB of generated text without a newline, then the block
    _check_perf(parse_text(text))
    _check_perf(parse_text(("x" * 3_000_000) + "\r\n" + PERF.replace("\n", "\r\n")))


@pytest.mark.parametrize(("name", "content", "says"), [
    ("bench.sql", "CREATE TABLE t (a INTEGER);\nINSERT INTO t VALUES (1);\n", "SQL statements that are not llama-bench"),
    ("notes.txt", "took about 3 s per token\nmodel loaded fine\n", "line(s) of other text, starting 'took about"),
    ("rows.jsonl", '{"a": 1}\n{"a": 2}\n', "JSON lines that are not llama-bench records"),
    ("obj.json", '{"eval_tps": 12.5}', "JSON that is not llama-bench output"),
    ("empty.log", "", "an empty file"),
    ("blob.bin", bytes(range(256)) * 64, "binary data"),
    ("model.gguf", b"GGUF\x03\x00\x00\x00" + bytes(100), "a GGUF model file"),
    ("h.sqlite", "sqlite", "a SQLite database"),
])
def test_bench_parse_refuses_a_file_without_timings(tmp_path, name, content, says):
    p = tmp_path / name
    if content == "sql":
        _write_lb(p, "sql", 1.0)
    elif content == "sqlite":
        good_db(p, reps=2)
    elif isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    r = mvlm("bench", "parse", p, cwd=tmp_path)
    line = error_line(r)
    assert r.returncode == 2 and str(p) in line and says in line and "no llama.cpp timing output" in line, line
    assert r.stdout.strip() == ""  # no empty row


@pytest.mark.slow
def test_bench_parse_device_and_mixed_files(tmp_path):
    r = mvlm("bench", "parse", "/dev/zero", cwd=tmp_path)
    assert "is a character device, not a file" in error_line(r)
    good = tmp_path / "run.log"
    good.write_text(PERF)
    junk = tmp_path / "notes.txt"
    junk.write_text("nothing here\n")
    r = mvlm("bench", "parse", "--json", good, junk, cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # among several files, one without timings keeps its row and a warning
    a, b = json.loads(r.stdout)
    assert a["eval_tps"] == 12.64 and b["source_format"] == "unrecognised"
    assert any("found 1 line(s) of other text" in w for w in b["warnings"])
    r = mvlm("bench", "parse", junk, tmp_path / "empty.txt", cwd=tmp_path)
    assert "does not exist" in error_line(r)


def test_bench_parse_recognises_every_llama_bench_format(tmp_path):
    for fmt in ("json", "jsonl", "csv", "md"):
        rec = parse_file(_write_lb(tmp_path / f"lb.{fmt}", fmt, 1.0))
        assert rec.source_format == f"llama-bench-{fmt}" and (rec.prompt_tokens, rec.eval_runs) == (16, 8), fmt
        assert rec.eval_tps == pytest.approx(60.0) and rec.prompt_tps == pytest.approx(200.0)


# --- inputs that are not regular files, names llama-bench wrote unescaped, metrics the two sides do not share ----------
def _special(tmp_path: Path, kind: str) -> Path:
    """A FIFO or a bound unix socket (opening either for reading would block forever), or /dev/zero (never ends)."""
    if kind == "fifo":
        p = tmp_path / "fifo.log"
        os.mkfifo(p)
        return p
    if kind == "socket":
        import socket

        p = tmp_path / "s.sock"
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()  # the socket file stays
        return p
    return Path("/dev/zero")


_KIND_WORDS = {"fifo": "is a FIFO (named pipe), not a file", "socket": "is a socket, not a file",
               "dev-zero": "is a character device, not a file"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(_KIND_WORDS))
def test_parse_import_and_compare_refuse_fifos_sockets_and_devices_in_one_line(tmp_path, kind):
    p = _special(tmp_path, kind)
    db = good_db(tmp_path / "h.sqlite", reps=5)
    before = sha(db)
    b1 = _write_lb(tmp_path / "b1.json", "json", 1.0)
    for args in (("bench", "parse", p), ("history", "import", p, "--db", db), ("compare", p, b1),
                 ("compare", b1, p, "--db", db)):
        r = mvlm(*args, cwd=tmp_path, timeout=60)  # a blocking open() would time out here
        line = error_line(r)
        assert r.returncode == 2 and f"{p} {_KIND_WORDS[kind]}" in line, (args, line)
    assert sha(db) == before


@pytest.mark.slow
def test_sql_with_a_quote_in_the_model_name_says_llama_bench_did_not_escape_it(tmp_path):
    """llama-bench -o sql writes each value between quotes without escaping (llama-bench.cpp sql_printer), so a model
    file named m'x.gguf makes an INSERT that is not valid SQL (the real binary: test_llama_bench_compat.py)."""
    p = _write_lb(tmp_path / "lb.sql", "sql", 1.0)
    p.write_text(p.read_text().replace("'m.gguf'", "'m'x.gguf'"))
    bad_line = next(n for n, x in enumerate(p.read_text().splitlines(), 1) if "m'x.gguf" in x)
    db = tmp_path / "h.sqlite"
    for args in (("history", "import", p, "--db", db), ("bench", "parse", p), ("compare", p, p)):
        line = error_line(mvlm(*args, cwd=tmp_path))
        assert f"line {bad_line}: an unbalanced quote in a llama-bench INSERT" in line, (args, line)
        assert "does not escape quotes in names: rename the model file or use -o json" in line, line
    assert not db.exists()


def _lb_entry_file(path: Path, tests: list[tuple[int, int]], scale: float) -> Path:
    rows = []
    for n_p, n_g in tests:
        r = _lb_rows(scale)[0] | {"n_prompt": n_p, "n_gen": n_g}
        rows.append(r)
    path.write_text(json.dumps(rows))
    return path


@pytest.mark.slow
def test_compare_refuses_pairs_without_a_shared_or_gated_metric(tmp_path):
    db = tmp_path / "h.sqlite"
    pp = _lb_entry_file(tmp_path / "pp.json", [(16, 0)], 1.0)  # pp16_tps (and prompt_tps)
    tg = _lb_entry_file(tmp_path / "tg.json", [(0, 8)], 1.0)  # tg8_tps (and eval_tps)
    pg1 = _lb_entry_file(tmp_path / "pg1.json", [(16, 8)], 1.0)  # pp16+tg8_tps only: no gated metric
    pg2 = _lb_entry_file(tmp_path / "pg2.json", [(16, 8)], 0.5)
    assert mvlm("history", "import", pp, tg, pg1, pg2, "--db", db, cwd=tmp_path).returncode == 0
    for extra in ((), ("--fail-on-regression", "5%")):
        line = error_line(mvlm("compare", "id:1", "id:2", "--db", db, *extra, cwd=tmp_path))
        assert "no metric in common" in line and "has pp16_tps, prompt_tps" in line and "has eval_tps, tg8_tps" in line
    r = mvlm("compare", "id:3", "id:4", "--db", db, "--fail-on-regression", "5%", cwd=tmp_path)
    line = error_line(r)
    assert r.returncode == 2 and "no gated metric (ve_ms, prompt_tps, eval_tps, total_s) is in both" in line, line
    assert "--metric pp16+tg8_tps" in line and "gate not applied" not in r.stderr
    r = mvlm("compare", "id:3", "id:4", "--db", db, "--fail-on-regression", "5%", "--metric", "eval_tps", cwd=tmp_path)
    assert "no --metric is in both" in error_line(r)
    r = mvlm("compare", "id:3", "id:4", "--db", db, "--json", cwd=tmp_path)  # no gate: the shared metric is compared
    assert r.returncode == 0, r.stderr
    assert [m["key"] for m in json.loads(r.stdout)["comparisons"][0]["metrics"]] == ["pp16+tg8_tps"]


@pytest.mark.slow
def test_escape_sequences_in_stored_text_are_shown_not_sent_to_the_terminal(tmp_path):
    evil = "\x1b]0;PWNED\x07\x1b[2J"
    label = "\x1b[31mred [bold]x"
    rows = _lb_rows(1.0)
    for r in rows:
        r["cpu_info"] = evil
    f1 = tmp_path / "a.json"
    f1.write_text(json.dumps(rows))
    f2 = tmp_path / "b.json"
    f2.write_text(json.dumps([r | {"samples_ts": [v * 0.5 for v in r["samples_ts"]]} for r in rows]))
    db = tmp_path / "h.sqlite"
    assert mvlm("history", "import", f1, f2, "--db", db, "--label", label, cwd=tmp_path).returncode == 0
    outs = [mvlm("history", "--db", db, cwd=tmp_path), mvlm("compare", "id:1", "id:2", "--db", db, cwd=tmp_path),
            mvlm("compare", "id:1", "id:1", "--db", db, cwd=tmp_path),
            mvlm("compare", "id:1", "id:2", "--db", db, "--fail-on-regression", "5%", "--gate", "within-session",
                 cwd=tmp_path)]
    for r in outs:
        text = r.stdout + r.stderr
        assert "\x1b" not in text and "\x07" not in text, text
    assert "\\x1b]0;PWNED\\x07\\x1b[2J" in outs[0].stdout.replace("\n", "")  # shown, readable
    assert "\\x1b[31mred [bold]x" in outs[0].stdout and "\\x1b[31mred [bold]x" in error_line(outs[2])
    assert "\\x1b[31mred [bold]x" in outs[1].stdout.replace("\n", "")
    stored = json.loads(mvlm("history", "--db", db, "--json", cwd=tmp_path).stdout)  # JSON: the exact strings
    assert [e["label"] for e in stored] == [label, label] and stored[0]["device"] == evil
