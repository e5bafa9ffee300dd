"""The bench as one pipeline (docs/architecture.md): every protocol through the same sinks, settings that travel with
the numbers, an import that stores exactly what ``--save`` stores, and the history's own tools (filters, delete,
prune). Real parts: the real host runtime and SmolLM2, real `mvlm` processes, a real SQLite history read back with
sqlite3."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

MVLM = [sys.executable, "-m", "mvlm"]


def mvlm(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*MVLM, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, "COLUMNS": "250"})


def _profile(d: Path, name: str = "pipe") -> Path:
    p = d / f"{name}.toml"
    p.write_text(f'name = "{name}"\ntransport = "local"\nworkdir = "{d / "dev"}"\ntarget = "host"\nthreads = 2\n')
    return p


def _rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return c.execute(sql).fetchall()


# --- every output with every protocol ------------------------------------------------------------------------------
@pytest.mark.slow
def test_llama_bench_goes_through_every_output_like_the_papers_protocols(tmp_path, smollm2_gguf, host_runtime):
    """`--protocol llama-bench` with every output: each is written (Markdown and CSV were silently not), its records
    carry the device as named and the protocol (it was filed as device "local" with --save and as the CPU's name when
    its JSON was imported), one history entry per test."""
    r = mvlm("bench", "--device", _profile(tmp_path), "-P", "llama-bench", "-m", smollm2_gguf, "-p", "64,128", "-n", 8,
             "-r", 2,
             "--json-file", tmp_path / "o.json", "--jsonl", tmp_path / "o.jsonl", "--markdown", tmp_path / "o.md",
             "--csv", tmp_path / "o.csv", "--save", "--db", tmp_path / "h.sqlite", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = json.loads((tmp_path / "o.json").read_text())
    assert [(x["test"], x["device"], x["protocol"], len(x["runs"])) for x in recs] == [
        ("pp64", "pipe", "llama-bench", 2), ("pp128", "pipe", "llama-bench", 2), ("tg8", "pipe", "llama-bench", 2)]
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 6
    rows = list(csv.DictReader(io.StringIO((tmp_path / "o.csv").read_text())))
    assert [r["test"] for r in rows] == ["pp64", "pp64", "pp128", "pp128", "tg8", "tg8"]
    md = (tmp_path / "o.md").read_text()
    assert "| Test |" in md and "| pp128 |" in md
    assert _rows(tmp_path / "h.sqlite", "SELECT device, protocol, repetitions FROM entry") == [
        ("pipe", "llama-bench", 2)] * 3
    imported = mvlm("history", "import", tmp_path / "o.json", "--db", tmp_path / "i.sqlite")
    assert imported.returncode == 0, imported.stderr
    assert _rows(tmp_path / "i.sqlite", "SELECT device, protocol FROM entry") == [("pipe", "llama-bench")] * 3


def _entry_rows(db: Path) -> list[tuple]:
    """Every stored fact of every entry (no ids): context, time, label, commit, repetitions, timings and samples."""
    with sqlite3.connect(db) as c:
        entries = c.execute("SELECT id, created_at, label, project_commit, project_dirty, device, model, precision, "
                            "model_file, model_sha256, mmproj_file, mmproj_sha256, size_bytes, runtime_commit, "
                            "runtime_patches, protocol, cpu_info, gpu_info, params, repetitions FROM entry "
                            "ORDER BY id").fetchall()
        out = []
        for e in entries:
            reps = c.execute("SELECT idx, timing FROM repetition WHERE entry_id = ? ORDER BY idx", (e[0],)).fetchall()
            samples = c.execute("SELECT repetition, metric, value FROM sample WHERE entry_id = ? ORDER BY repetition, "
                                "metric", (e[0],)).fetchall()
            out.append((e[1:], [(i, json.loads(t)) for i, t in reps], samples))
        return out


@pytest.mark.slow
def test_importing_a_report_stores_exactly_what_save_stored(tmp_path, smollm2_gguf, host_runtime):
    """A sweep with --save, --json-file and --jsonl: importing either file into an empty history gives the same rows
    as --save (context, settings, time, label, mvlm's commit, every repetition's timing and metrics); importing into
    the history that --save wrote stores nothing."""
    r = mvlm("bench", "--device", _profile(tmp_path), "-m", smollm2_gguf, "-n", 8, "-r", 2, "-t", "1,2", "--label", "pr-7",
             "--save", "--db", tmp_path / "saved.sqlite", "--json-file", tmp_path / "o.json", "--jsonl",
             tmp_path / "o.jsonl", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = _entry_rows(tmp_path / "saved.sqlite")
    assert len(saved) == 2 and [json.loads(e[0][17])["n_threads"] for e in saved] == [1, 2]
    for f in ("o.json", "o.jsonl"):
        db = tmp_path / f"{f}.sqlite"
        imp = mvlm("history", "import", tmp_path / f, "--db", db)
        assert imp.returncode == 0, imp.stderr
        assert _entry_rows(db) == saved, f
    again = mvlm("history", "import", tmp_path / "o.json", "--db", tmp_path / "saved.sqlite")
    assert again.returncode == 0 and "2 already stored" in again.stderr


# --- settings travel with the numbers ------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_sweeps_settings_are_columns_everywhere_and_never_pooled(tmp_path, smollm2_gguf, host_runtime):
    r = mvlm("bench", "--device", _profile(tmp_path), "-m", smollm2_gguf, "-n", 8, "-r", 2, "-t", "1,2", "--save",
             "--db", tmp_path / "h.sqlite", "--markdown", tmp_path / "o.md", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Threads" in r.stdout  # the terminal table
    md = (tmp_path / "o.md").read_text().splitlines()
    assert md[0].startswith("| Model | Threads | Hardware |") and md[2].split("|")[2].strip() == "1"
    hist = mvlm("history", "--db", tmp_path / "h.sqlite")
    assert hist.returncode == 0 and "Threads" in hist.stdout, hist.stdout
    plots = mvlm("history", "plot", "--db", tmp_path / "h.sqlite", "--out", tmp_path / "plots")
    assert plots.returncode == 0, plots.stderr
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert len(pngs) == 2 and any("t_1" in p for p in pngs) and any("t_2" in p for p in pngs), pngs
    cmp = mvlm("compare", "id:1", "id:2", "--db", tmp_path / "h.sqlite")
    assert cmp.returncode == 0 and "n_threads: 1 vs 2" in cmp.stderr, cmp.stderr  # said, not pooled


# --- the history's own tools -------------------------------------------------------------------------------------
def _cli(*args) -> tuple[int, str, str]:
    """``mvlm ARGS`` in this process (typer's CliRunner on the mvlm application): (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from mvlm.cli import app
    from mvlm_core.errors import MvlmError

    res = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})
    err = res.stderr
    if isinstance(res.exception, MvlmError):  # what `mvlm` prints for it: one line, its exit code
        return res.exception.exit_code, res.stdout, err + f"error: {res.exception}\n"
    return res.exit_code, res.stdout, err


def _history(tmp_path: Path) -> Path:
    from mvlm_bench.history.database import History
    from mvlm_bench.history.entries import Entry
    from mvlm_bench.records.record import RunContext

    db = tmp_path / "h.sqlite"
    with History(db) as h:
        for i, (label, threads) in enumerate([("main", 1), ("main", 1), ("main", 2), ("pr-1", 1), ("main", 1),
                                              ("pr-1", 1), ("main", 2)]):
            ctx = RunContext(device="d1", model="M", model_sha256="ab" * 32, protocol="lm", runtime_commit=f"r{i}",
                             params={"n_threads": threads, "n_predict": 8})
            h.save(Entry(ctx, {"eval_tps": [40.0 + i, 41.0 + i]}, label=label, created_at=f"2026-01-0{i + 1}T00:00:00+00:00"))
    return db


def test_history_filters_by_label_device_and_model(tmp_path):
    db = _history(tmp_path)
    rc, out, err = _cli("history", "--db", db, "--label", "pr-1", "--json")
    assert rc == 0 and [e["id"] for e in json.loads(out)] == [4, 6]
    rc, out, err = _cli("history", "--db", db, "--device", "nope", "--json")
    assert rc == 0 and json.loads(out) == []
    rc, out, err = _cli("history", "--db", db, "--model", "M")
    assert rc == 0 and "Threads" in out  # the entries differ in threads: a column of its own


def test_history_delete_by_selector_or_filter(tmp_path):
    db = _history(tmp_path)
    rc, out, err = _cli("history", "delete", "id:2", "latest", "--db", db, "--dry-run")
    assert rc == 0 and "would delete 2 entries" in err and "id:2, id:7" in err
    assert len(_rows(db, "SELECT id FROM entry")) == 7
    rc, out, err = _cli("history", "delete", "id:2", "--db", db)
    assert rc == 0 and "deleted 1 entry" in err
    assert [x[0] for x in _rows(db, "SELECT id FROM entry")] == [1, 3, 4, 5, 6, 7]
    assert _rows(db, "SELECT COUNT(*) FROM sample WHERE entry_id = 2") == [(0,)]  # its repetitions went too
    rc, out, err = _cli("history", "delete", "--label", "pr-1", "--db", db)
    assert rc == 0 and [x[0] for x in _rows(db, "SELECT id FROM entry")] == [1, 3, 5, 7]
    rc, out, err = _cli("history", "delete", "--db", db)
    assert rc == 2 and "needs selectors" in err and len(err.strip().splitlines()) == 1
    rc, out, err = _cli("history", "delete", "id:99", "--db", db)
    assert rc == 2 and "no entry id:99" in err


def test_history_prune_keeps_the_newest_of_each_configuration(tmp_path):
    db = _history(tmp_path)
    # configurations: (main, t=1): 1 2 5; (main, t=2): 3 7; (pr-1, t=1): 4 6
    rc, out, err = _cli("history", "prune", "--keep", "1", "--db", db, "--dry-run")
    assert rc == 0 and "would delete 4 entries" in err, err
    rc, out, err = _cli("history", "prune", "--keep", "1", "--db", db)
    assert rc == 0, err
    assert [x[0] for x in _rows(db, "SELECT id FROM entry ORDER BY id")] == [5, 6, 7]
    rc, out, err = _cli("history", "prune", "--keep", "0", "--db", db)
    assert rc == 2


# --- one vocabulary of columns -------------------------------------------------------------------------------------
def test_every_view_takes_its_columns_from_the_one_table():
    from mvlm_bench.decide import stats
    from mvlm_bench.records import columns
    from mvlm_bench.views import plots

    assert stats.DEFAULT_METRICS == columns.keys("compare") and stats.GATE_METRICS == columns.keys("gate")
    assert plots.PLOT_METRICS == columns.keys("plot")
    assert [columns.resolve_metric(x) for x in ("Eval", "eval", "Eval_prompt", "Eval (tokens/s)", "eval_tps")] == [
        "eval_tps", "eval_tps", "prompt_tps", "eval_tps", "eval_tps"]
    assert columns.resolve_metric("nonsense") is None
    assert columns.direction("pp512_tps") == 1 and columns.direction("total_s") == -1


def test_a_transport_says_what_it_can_do():
    from mvlm_bench.device.transports import transport_kinds

    kinds = transport_kinds()
    assert list(kinds)[:3] == ["local", "ssh", "adb"]
    local, ssh, adb = (kinds[k].capabilities for k in ("local", "ssh", "adb"))
    assert local.wall_clock and local.same_host and local.port_forward
    assert ssh.port_forward and not ssh.same_host and not ssh.wall_clock
    assert adb.port_forward and adb.push and adb.exec and not adb.same_host and not adb.wall_clock  # adb forward
