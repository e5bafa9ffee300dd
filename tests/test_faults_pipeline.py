"""What two outsiders found when they used the redesigned bench pipeline as a careless and as a hostile user would
(issue 22): each finding is a case here, run through the `mvlm` console script as a subprocess (exit codes and
one-line errors as a user sees them), against real SQLite histories, real reports and, where a measurement is needed,
the real SmolLM2 on the real host runtime.

Measurements lost or merged: ``--jsonl`` replacing a file (now appended, one ``session`` per bench), concatenated
JSON Lines merged into one entry, a damaged line reread as llama-bench output, a spill that split one measurement,
``--json-file`` over a history, import dropping bad values silently. Wrong targets: options before a ``history``
subcommand, SQL wildcards in ``--model``, a selector outside its filter, ``prune`` pooling A/B sides, ``latest``
meaning the highest id. Late refusals: a ``--db`` or ``--jsonl`` that cannot be written, a baseline of another setup.
Tracebacks: deep JSON, huge integers, lone surrogates, link loops, deep TOML, long names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from peers import error_line, fill_up, small_gguf

from mvlm_bench.history.database import History
from mvlm_bench.history.entries import Entry, entries_to_records
from mvlm_bench.records.record import RunContext

MVLM = [sys.executable, "-m", "mvlm"]


def mvlm(*args: object, cwd: Path | None = None, timeout: float = 300, **popen):
    env = dict(os.environ) | {"COLUMNS": "200"}
    env.pop("MVLM_HISTORY", None)
    return subprocess.run([*MVLM, *map(str, args)], cwd=cwd, capture_output=True, text=True, errors="replace", env=env,
                          timeout=timeout, **popen)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def profile(tmp_path: Path, name: str = "outsider") -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(f'name = "{name}"\ntransport = "local"\nworkdir = "{tmp_path / "dev"}"\ntarget = "host"\nthreads = 2\n')
    return p


def entry(eval_tps: list[float], *, device="box", model="M", protocol="lm", label="", created="", sha256="",
          **params) -> Entry:
    sha256 = sha256 or hashlib.sha256(model.encode()).hexdigest()
    ctx = RunContext(device=device, model=model, model_file=f"{model}.gguf", model_sha256=sha256, protocol=protocol,
                     params={"n_threads": 2, "n_predict": 8, **params})
    return Entry(ctx, {"eval_tps": list(eval_tps), "total_s": [1.0] * len(eval_tps)}, label=label, created_at=created)


def history(tmp_path: Path, *entries: Entry) -> Path:
    db = tmp_path / "h.sqlite"
    with History(db) as h:
        for e in entries:
            h.save(e, e.created_at or None)
    return db


def json_lines(e: Entry, session: str = "") -> str:
    """``e`` as the lines ``mvlm bench --jsonl`` writes: one record per repetition, its index in ``runs[0]``."""
    (rec,) = entries_to_records([e])
    out = []
    for run in rec["runs"]:
        line = dict(rec) | {"runs": [run], "repetitions": 1} | ({"session": session} if session else {})
        out.append(json.dumps(line))
    return "\n".join(out) + "\n"


# ============================================================================ wrong targets, wrong configurations
@pytest.mark.slow
def test_options_before_a_history_subcommand_are_refused_not_ignored(tmp_path):
    db = history(tmp_path, entry([40, 41]))
    before = sha(db)
    for argv in (["--db", db, "delete", "latest"], ["--model", "M", "prune", "--keep", "1"],
                 ["--label", "x", "import", db]):
        line = error_line(mvlm("history", *argv, cwd=tmp_path))
        assert "would not apply to it: write `mvlm history" in line and "nothing was changed" in line, line
    assert sha(db) == before and not (tmp_path / "mvlm-history.sqlite").exists()


def test_prune_keeps_each_ab_side_apart_from_plain_benches(tmp_path):
    db = history(tmp_path, entry([40, 41], created="2026-01-01T00:00:01+00:00"),
                 entry([40, 42], created="2026-01-01T00:00:02+00:00", ab_side="baseline"),
                 entry([39, 41], created="2026-01-01T00:00:03+00:00", ab_side="candidate"))
    r = mvlm("history", "prune", "--keep", "1", "--dry-run", "--db", db)
    assert r.returncode == 0 and "would delete 0 entries" in r.stderr, r.stderr


def test_prune_and_latest_go_by_when_it_was_measured_not_by_id(tmp_path):
    db = history(tmp_path, entry([40, 41], created="2026-02-01T00:00:00+00:00"),
                 entry([30, 31], created="2026-01-01T00:00:00+00:00"))  # an old report imported afterwards: id 2
    r = mvlm("history", "delete", "latest", "--dry-run", "--db", db)
    assert r.returncode == 0 and "id:1" in r.stderr and "id:2" not in r.stderr, r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("model", ["%", "_", "M%", 1, 4, 7])
def test_model_filters_are_names_or_long_sha_prefixes_never_wildcards(tmp_path, model):
    """``%`` and ``_`` are text, not SQL wildcards; a sha256 prefix counts from 8 hex digits (``b`` matched all)."""
    db = history(tmp_path, entry([40, 41]), entry([30, 31], model="Other"))
    model = hashlib.sha256(b"M").hexdigest()[:model] if isinstance(model, int) else model
    r = mvlm("history", "delete", "--model", model, "--db", db)
    assert r.returncode == 0 and "deleted 0 entries" in r.stderr, r.stderr
    assert len(History(db, create=False).entries()) == 2
    r = mvlm("history", "delete", "--model", hashlib.sha256(b"M").hexdigest()[:8], "--db", db)
    assert r.returncode == 0 and "deleted 1 entry" in r.stderr, r.stderr


def test_a_selector_outside_its_filter_is_refused(tmp_path):
    db = history(tmp_path, entry([40, 41], label="main"), entry([30, 31], label="pr-1"))
    line = error_line(mvlm("history", "delete", "--label", "main", "id:2", "--db", db))
    assert "id:2" in line and "does not match --label main" in line
    assert len(History(db, create=False).entries()) == 2


@pytest.mark.slow
def test_filters_that_match_nothing_say_what_the_history_holds(tmp_path):
    db = history(tmp_path, entry([40, 41], model="Tiny-F32"))
    r = mvlm("history", "--model", "out/Tiny-F32.gguf", "--db", db)
    assert r.returncode == 0 and "no stored entry matches --model out/Tiny-F32.gguf (the history has Tiny-F32)" in \
        r.stderr and "not a path" in r.stderr, r.stderr
    line = error_line(mvlm("history", "plot", "--model", "nope", "--db", db, "--out", tmp_path / "p"))
    assert "no stored entry matches the filters" in line


def test_history_cells_never_read_null_and_partial_entries_say_so(tmp_path):
    db = history(tmp_path, entry([40, 41], repetitions_planned=5, mmproj_precision=None),
                 entry([40, 41], repetitions_planned=2, mmproj_precision="f16"))
    r = mvlm("history", "--db", db)
    assert r.returncode == 0 and "null" not in r.stdout and "2 of 5" in r.stdout, r.stdout


@pytest.mark.slow  # over ~1.3 s: the fast lane stays under 2 minutes
def test_replotting_removes_only_its_own_stale_pictures_and_names_read_well(tmp_path):
    db = history(tmp_path, entry([40, 41]), entry([30, 31], n_threads=4), entry([35, 36], model="Gone"))
    out = tmp_path / "plots"
    out.mkdir()
    (out / "mine.png").write_bytes(b"not mvlm's")
    assert mvlm("history", "plot", "--db", db, "--out", out).returncode == 0
    first = {p.name for p in out.glob("*.png")}
    assert any("t_4" in n for n in first) and not any(n.endswith("_.png") or "side" in n for n in first), first
    assert mvlm("history", "delete", "--model", "Gone", "--db", db).returncode == 0
    assert mvlm("history", "plot", "--db", db, "--out", out).returncode == 0
    second = {p.name for p in out.glob("*.png")}
    assert second == {n for n in first if "Gone" not in n} and (out / "mine.png").read_bytes() == b"not mvlm's"


# ================================================================================== refused before measuring
@pytest.mark.slow  # over ~1.3 s: the fast lane stays under 2 minutes
def test_output_paths_that_cannot_be_outputs_are_refused_before_measuring(tmp_path):
    model = small_gguf(tmp_path / "m.gguf")
    prof = profile(tmp_path)
    hist = history(tmp_path, entry([40, 41]))
    notes = tmp_path / "notes.jsonl"
    notes.write_text("my precious notes\n")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    (tmp_path / "report.md").write_text("# an old report\n")
    cases = [
        (["--json-file", hist], "is a SQLite file (a benchmark history?)"),
        (["--json-file", "-"], "--json prints the JSON report on stdout"),
        (["--jsonl", ""], "--jsonl is empty"),
        (["--csv", ""], "--csv is empty"),
        (["--jsonl", notes], "line 1 is not an mvlm bench record"),
        (["--jsonl", "/proc/version"], "cannot create it in /proc"),
        (["--markdown", tmp_path / "loop1"], "is a symbolic link (to "),
        (["--save", "--db", tmp_path / "report.md"], "is not a SQLite benchmark history"),
        (["--label", "x" * 5000], "give one line of at most 200 characters"),
        (["--label", "a", "--label", "b"], "--label is given twice"),
        (["--jsonl", tmp_path / "a.jsonl", "--jsonl", tmp_path / "b.jsonl"], "--jsonl is given twice"),
    ]
    for extra, words in cases:
        r = mvlm("bench", "--device", prof, "--model", model, *extra, timeout=120)
        line = error_line(r)
        assert words in line, (extra, line)
        assert "run 1/" not in r.stderr and "syncing" not in r.stderr, extra
    assert notes.read_text() == "my precious notes\n" and not (tmp_path / "dev").exists()


@pytest.mark.slow
def test_a_baseline_of_another_setup_is_refused_before_measuring(tmp_path):
    model = small_gguf(tmp_path / "M.gguf")
    db = history(tmp_path, entry([40, 41], device="outsider", model="M", sha256=sha(model), label="main",
                                 n_threads=2, n_gpu_layers=0, ctx_size=2048))
    r = mvlm("bench", "--device", profile(tmp_path), "--model", model, "--threads", 1, "--baseline", "label:main",
             "--db", db, "--fail-on-regression", "5%")
    line = error_line(r)
    assert "no measurement it names has this bench's setup" in line and "n_threads: 2 vs 1" in line, line
    assert "nothing was measured" in line and "run 1/" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("text,words", [
    ("[" * 100_000 + "]" * 100_000, "nests deeper"),
    ('[{"runs": [{"metrics": {"eval_tps": ' + "9" * 400 + "}}]}]", "beyond 64 bits"),
    ('[{"label": "\\ud800x", "runs": [{"metrics": {"eval_tps": 1}}]}]', "not valid Unicode"),
    ('[{"runs": [{"metrics": {"eval_tps": NaN}}]}]', "NaN"),
], ids=["deep", "bigint", "surrogate", "nan"])
def test_crafted_json_is_one_line_in_import_compare_and_as_a_baseline(tmp_path, text, words):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    good = history(tmp_path, entry([40, 41]))
    before = sha(good)
    assert words in error_line(mvlm("history", "import", bad, "--db", good))
    assert sha(good) == before  # the history is not blamed, not touched
    assert words in error_line(mvlm("compare", bad, "id:1", "--db", good))
    r = mvlm("bench", "--device", profile(tmp_path), "--model", small_gguf(tmp_path / "m.gguf"), "--baseline", bad)
    assert words in error_line(r) and "run 1/" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("metrics,words", [
    ({"eval_tps": "fast"}, "not a number"), ({"eval_tps": [1, 2]}, "not a number"), ({"eval_tps": True}, "not a number"),
    ({"eval_tps": -40.0}, "never negative"), ({"total_s": -1.0}, "never negative"),
])
def test_import_refuses_values_a_report_never_holds(tmp_path, metrics, words):
    (rec,) = entries_to_records([entry([40.0])])
    rec["runs"][0]["metrics"] |= metrics
    f = tmp_path / "r.json"
    f.write_text(json.dumps([rec]))
    assert words in error_line(mvlm("history", "import", f, "--db", tmp_path / "h.sqlite"))
    (rec,) = entries_to_records([entry([40.0])])
    rec["runs"] = []
    f.write_text(json.dumps([rec]))
    assert "'runs' is empty" in error_line(mvlm("history", "import", f, "--db", tmp_path / "h.sqlite"))


@pytest.mark.slow
def test_import_refuses_llama_bench_rows_with_damaged_values_or_lines(tmp_path):
    data = Path(__file__).parent / "data" / "llama-bench"
    rows = [json.loads(ln) for ln in (data / "smollm2-q4_1-p8-n4-r2.jsonl").read_text().splitlines() if ln.strip()]
    for change, words in (({"samples_ts": ["fast", None]}, "not numbers"), ({"n_prompt": -5}, "not a count"),
                          ({"model_size": 10 ** 30}, "beyond 64 bits")):
        f = tmp_path / "rows.json"
        f.write_text(json.dumps([rows[0] | change, rows[1]]))
        assert words in error_line(mvlm("history", "import", f, "--db", tmp_path / "h.sqlite"))
    sql = (data / "smollm2-q4_1-p8-n4-r2.sql").read_text().splitlines()
    k = next(i for i, ln in enumerate(sql) if ln.startswith("INSERT INTO"))
    sql[k] = sql[k][:60] + "'); DROP TABLE entry; --"
    f = tmp_path / "rows.sql"
    f.write_text("\n".join(sql) + "\n")
    line = error_line(mvlm("history", "import", f, "--db", tmp_path / "h.sqlite"))
    assert f"line {k + 1} is an INSERT that is not one of llama-bench's rows" in line
    assert not (tmp_path / "h.sqlite").exists() or History(tmp_path / "h.sqlite", create=False).entries() == []


@pytest.mark.slow  # over ~1.3 s: the fast lane stays under 2 minutes
def test_deep_toml_long_names_and_bad_ports_are_one_line(tmp_path):
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    m = small_gguf(tmp_path / "m.gguf")
    assert "nested thousands deep" in error_line(mvlm("bench", "--device", deep, "--model", m))
    assert "characters is no device" in error_line(mvlm("bench", "--device", "a" * 5000, "--model", m))
    assert "bad port" in error_line(mvlm("bench", "--device", "ssh://h:0", "--model", m))
    root = tmp_path / "root.toml"
    root.write_text('name = "root"\ntransport = "local"\nworkdir = "/"\ntarget = "host"\n')
    assert "give a directory of its own" in error_line(mvlm("bench", "--device", root, "--model", m))
    devices = tmp_path / "devices"
    devices.mkdir()
    (devices / "deep.toml").write_text(deep.read_text())
    (devices / "fine.toml").write_text('transport = "local"\ntarget = "host"\n')
    r = subprocess.run([*MVLM, "devices", "--no-check"], capture_output=True, text=True, timeout=120,
                       env=os.environ | {"MVLM_DEVICES_DIR": str(devices), "COLUMNS": "250"})
    assert r.returncode == 0 and "fine" in r.stdout and "invalid" in r.stdout and "Traceback" not in r.stderr, r.stderr
    r = mvlm("devices", "--no-check", profile(tmp_path))  # a path, as --device takes it
    assert r.returncode == 0 and "outsider" in r.stdout, r.stderr
    assert "empty FILE argument" in error_line(mvlm("bench", "parse", ""))


@pytest.mark.slow
def test_compare_says_what_cannot_be_judged(tmp_path):
    db = history(tmp_path, entry([40, 41]), entry([39, 40]))
    with History(db) as h:  # llama-bench's pp64 and tg128 tests: token counts in common, no rate (eval_tps null)
        for test, rates in (("pp64", [300.0, 301.0]), ("tg128", [40.0, 41.0])):
            e = entry([0, 0], protocol="llama-bench", test=test)
            e.samples = {f"{test}_tps": rates, "tks_in": [64, 64], "eval_tps": [None, None]}
            h.save(e)
    assert "no gated metric" in error_line(mvlm("compare", "id:3", "id:4", "--db", db, "--fail-on-regression", "5%"))
    assert "not measured in both" in error_line(mvlm("compare", "id:1", "id:2", "--db", db, "--metric", "Eval_prompt"))
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(entries_to_records([entry([40, 41], n_predict=8), entry([30, 31], model="N")])))
    b.write_text(json.dumps(entries_to_records([entry([40, 41], n_predict=16), entry([30, 31], model="O")])))
    assert "differs in n_predict: 8 vs 16" in error_line(mvlm("compare", a, b))


# =========================================================================== --jsonl, sessions, spills, imports
@pytest.mark.slow  # over ~1.3 s: the fast lane stays under 2 minutes
def test_json_lines_of_several_benches_import_as_several_entries_and_damage_is_refused(tmp_path):
    one, two = entry([40.0, 41.0, 42.0]), entry([40.5, 41.5, 42.5])
    cat = tmp_path / "cat.jsonl"
    cat.write_text(json_lines(one, "s1") + json_lines(two, "s2"))
    r = mvlm("history", "import", cat, "--db", tmp_path / "h.sqlite")
    assert r.returncode == 0 and "imported 2 measurement(s)" in r.stderr, r.stderr
    old = tmp_path / "old.jsonl"  # written before lines carried their session: the repetition index starts again
    old.write_text(json_lines(one) + json_lines(two))
    r = mvlm("history", "import", old, "--db", tmp_path / "h2.sqlite")
    assert r.returncode == 0 and "imported 2 measurement(s)" in r.stderr, r.stderr
    lines = json_lines(one).splitlines()
    for name, text, words in (("garbage.jsonl", f"{lines[0]}\nGARBAGE{{{{\n{lines[1]}\n", "line 2 is not an mvlm"),
                              ("cut.jsonl", f"{lines[0]}\n{lines[1][:-40]}\n", "line 2 is not an mvlm bench record (cut"),
                              ("twice.jsonl", f"{lines[0]}\n{lines[0]}\n{lines[1]}\n", "line 2 repeats line 1")):
        (tmp_path / name).write_text(text)
        line = error_line(mvlm("history", "import", tmp_path / name, "--db", tmp_path / "h3.sqlite"))
        assert words in line and "nothing was imported" in line, line
    assert not (tmp_path / "h3.sqlite").exists() or History(tmp_path / "h3.sqlite", create=False).entries() == []


@pytest.mark.slow
def test_an_import_continues_the_entry_whose_repetitions_it_starts_with(tmp_path):
    """A bench whose history stopped taking repetitions after the first: its spill file and its --jsonl file hold
    every repetition; importing either adds the missing ones to the stored entry, and then adds nothing."""
    whole = entry([40.0, 41.0, 42.0, 43.0])
    first = entry([40.0])
    first.timings = whole.timings[:1]
    db = history(tmp_path, first)
    spill = tmp_path / "h.sqlite.unsaved.json"
    spill.write_text(json.dumps(entries_to_records([whole])))
    r = mvlm("history", "import", spill, "--db", db)
    assert r.returncode == 0 and "the later repetitions of id:1 added to it" in r.stderr, r.stderr
    (stored,) = History(db, create=False).entries()
    assert stored.samples["eval_tps"] == [40.0, 41.0, 42.0, 43.0]
    jl = tmp_path / "r.jsonl"
    jl.write_text(json_lines(whole, "s1"))
    r = mvlm("history", "import", jl, "--db", db)
    assert r.returncode == 0 and "imported 0 measurement(s)" in r.stderr and "1 already stored" in r.stderr, r.stderr


def test_a_full_disk_never_leaves_half_a_json_line(tmp_path, small_fs):
    from mvlm_bench.records.groups import Groups
    from mvlm_bench.records.record import Run
    from mvlm_bench.records.timings import TimingRecord
    from mvlm_bench.sinks.files import JsonLinesFile
    from mvlm_core.errors import MvlmError

    d = small_fs(256 * 1024)
    sink = JsonLinesFile(d / "r.jsonl")
    ctx = RunContext(device="box", model="M", protocol="lm", params={"prompt": "x" * 20_000})
    run = Run(TimingRecord(eval_tps=40.0, eval_runs=8, eval_ms=200.0), ctx, tokens_out=8)
    groups = Groups()
    g = groups.add(run)
    sink.receive(run, g, groups.all())
    size = (d / "r.jsonl").stat().st_size
    fill_up(d / "filler")
    with pytest.raises(MvlmError, match="disk full"):
        sink.receive(run, groups.add(run), groups.all())
    assert (d / "r.jsonl").stat().st_size == size and (d / "r.jsonl").read_bytes().endswith(b"\n")


# ======================================================================= with the real SmolLM2 (measurements)
def _bench(tmp_path, smollm2, *extra, repeat=2):
    return mvlm("bench", "--device", profile(tmp_path), "--model", smollm2, "-n", 4, "--repeat", repeat,
                "--warmup", 0, *extra)


@pytest.mark.slow  # three short benches
def test_jsonl_is_appended_bench_after_bench_and_imports_as_save_stored(tmp_path, smollm2_gguf, host_runtime):
    jl, db = tmp_path / "all.jsonl", tmp_path / "saved.sqlite"
    for _ in range(2):
        assert _bench(tmp_path, smollm2_gguf, "--jsonl", jl, "--save", "--db", db).returncode == 0
    lines = jl.read_text().splitlines()
    assert len(lines) == 4 and len({json.loads(ln)["session"] for ln in lines}) == 2
    r = mvlm("history", "import", jl, "--db", db)
    assert r.returncode == 0 and "imported 0 measurement(s)" in r.stderr and "2 already stored" in r.stderr, r.stderr
    r = mvlm("history", "import", jl, "--db", tmp_path / "fresh.sqlite")
    assert r.returncode == 0 and "imported 2 measurement(s)" in r.stderr, r.stderr


@pytest.mark.slow
def test_llama_bench_protocol_reports_import_as_save_stored(tmp_path, smollm2_gguf, host_runtime):
    db = tmp_path / "h.sqlite"
    r = mvlm("bench", "--device", profile(tmp_path), "-P", "llama-bench", "--model", smollm2_gguf, "--repeat", 2,
             "--json-file", tmp_path / "r.json", "--jsonl", tmp_path / "r.jsonl", "--save", "--db", db)
    assert r.returncode == 0, r.stderr
    for f in ("r.json", "r.jsonl"):
        r = mvlm("history", "import", tmp_path / f, "--db", db)
        assert r.returncode == 0 and "imported 0 measurement(s)" in r.stderr, (f, r.stderr)
    for e in History(db, create=False).entries():
        assert e.context.model_file == smollm2_gguf.name
        assert e.context.params["n_predict"] == (e.context.params["n_gen"] or None)  # a pp test generates nothing


def _stop_when(proc: subprocess.Popen, text: str, then) -> str:
    err = ""
    assert proc.stderr is not None
    for line in proc.stderr:
        err += line
        if text in line:
            then()
            break
    return err + proc.communicate(timeout=300)[1]


@pytest.mark.slow
def test_an_interrupted_bench_marks_its_reports_partial(tmp_path, smollm2_gguf, host_runtime):
    p = subprocess.Popen([*MVLM, "bench", "--device", str(profile(tmp_path)), "--model", str(smollm2_gguf), "-n", "4",
                          "--repeat", "4", "--warmup", "0", "--json-file", str(tmp_path / "r.json"), "--markdown",
                          str(tmp_path / "r.md")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=os.environ | {"COLUMNS": "200"})
    err = _stop_when(p, "run 2/4 done", lambda: p.send_signal(signal.SIGTERM))
    assert p.returncode == 143 and "interrupted by SIGTERM after 2 of 4 repetitions" in err, err
    (rec,) = json.loads((tmp_path / "r.json").read_text())
    assert rec["repetitions"] == 2 and rec["repetitions_planned"] == 4
    assert "**Partial:**" in (tmp_path / "r.md").read_text() and "2 of 4 repetitions" in (tmp_path / "r.md").read_text()


@pytest.mark.slow
def test_a_history_that_stops_taking_repetitions_ends_as_one_entry(tmp_path, smollm2_gguf, host_runtime):
    """A lock held on the history from the second repetition on: the bench spills every repetition, the interrupted
    line names the history and the spill file, and importing the spill completes the one stored entry."""
    db = tmp_path / "h.sqlite"
    locker = None

    def lock() -> None:
        nonlocal locker
        locker = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], "
                                   "isolation_level=None); c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); "
                                   "time.sleep(120)", str(db)], stdout=subprocess.PIPE, text=True)
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"

    p = subprocess.Popen([*MVLM, "bench", "--device", str(profile(tmp_path)), "--model", str(smollm2_gguf), "-n", "4",
                          "--repeat", "4", "--warmup", "0", "--save", "--db", str(db)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=os.environ | {"COLUMNS": "250",
                                                                             "MVLM_HISTORY_LOCK_TIMEOUT": "1"})
    try:
        err = _stop_when(p, "run 1/4 done", lock)
    finally:
        if locker is not None:
            locker.kill()
            locker.wait()
    spills = sorted(tmp_path.glob("h.sqlite.unsaved-*.json"))
    assert p.returncode == 2 and len(spills) == 1 and str(spills[0]) in err, err
    assert "the history took the repetitions before it: id:1" in err, err
    r = mvlm("history", "import", spills[0], "--db", db)
    assert r.returncode == 0 and "the later repetitions of id:1 added to it" in r.stderr, r.stderr
    (stored,) = History(db, create=False).entries()
    assert stored.repetitions == 4


@pytest.mark.slow
def test_a_reader_that_closes_stdout_early_costs_no_exit_code(tmp_path):
    """`mvlm compare ... | head -1`: the gate's exit 4 and its line on stderr survive the closed pipe."""
    db = history(tmp_path, *[entry([40.0 + i % 2, 40.5, 41.0], created=f"2026-01-0{i + 1}T00:00:00+00:00",
                                   label="main") for i in range(4)],
                 entry([20.0, 20.5, 21.0], created="2026-01-09T00:00:00+00:00"))
    env = dict(os.environ) | {"COLUMNS": "200"}
    env.pop("MVLM_HISTORY", None)
    p = subprocess.Popen([*MVLM, "compare", "label:main", "latest", "--db", str(db), "--fail-on-regression", "5%"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert p.stdout is not None
    p.stdout.close()  # the reader is gone before anything is written
    err = p.stderr.read() if p.stderr else ""
    p.wait(timeout=120)
    assert p.returncode == 4 and "performance regression" in err and "Traceback" not in err, err


@pytest.mark.slow
def test_a_stop_signal_after_the_last_repetition_never_kills_silently(tmp_path, smollm2_gguf, host_runtime):
    for delay in (0.0, 0.05, 0.2):
        p = subprocess.Popen([*MVLM, "bench", "--device", str(profile(tmp_path)), "--model", str(smollm2_gguf), "-n",
                              "4", "--repeat", "1", "--warmup", "0", "--save", "--db", str(tmp_path / "h.sqlite")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=os.environ | {"COLUMNS": "200"})
        err = _stop_when(p, "run 1/1 done", lambda d=delay, p=p: (time.sleep(d), p.send_signal(signal.SIGTERM)))
        assert p.returncode in (0, 143), (p.returncode, err)
        if p.returncode == 143:
            assert re.search(r"interrupted by SIGTERM (after 1 of 1|after the measurement)", err), err
        assert "while comparing" not in err
