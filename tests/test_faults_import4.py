"""Files `mvlm history import` (and `mvlm compare`, which reads the same files) used to take in part or misread: llama-bench
CSV rows of another width, NaN rates, JSON lines repeated, cut short or of mvlm's kind among llama-bench's, mvlm runs
that measure nothing, repeat or hold impossible readings, llama-bench rows without a test, a time or a sample, rows
without a device name, and a `--device` of two lines. Each is refused in one line naming the line or record (exit 2,
nothing stored). Also `mvlm bench parse` on a log with a negative time: the value is left empty, with a warning.

Every file starts from real llama-bench output (tests/data/llama-bench: SmolLM2 on a CPU, -p 8 -n 4 -r 2, as json,
jsonl and sql; its CSV is the same values in llama-bench's csv_printer layout) or from the records `mvlm bench
--json-file` writes (views.exports.render_json); the real `mvlm` runs as a subprocess.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from peers import error_line, small_gguf

from mvlm_bench.history.database import History
from mvlm_bench.records.groups import aggregate
from mvlm_bench.records.record import Run, RunContext
from mvlm_bench.records.timings import TimingRecord
from mvlm_bench.views.exports import render_json

MVLM = [sys.executable, "-m", "mvlm"]
DATA = Path(__file__).parent / "data" / "llama-bench"


def mvlm(*args: object, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ) | {"COLUMNS": "200"}
    env.pop("MVLM_HISTORY", None)
    return subprocess.run([*MVLM, *map(str, args)], cwd=cwd, capture_output=True, text=True, errors="replace", env=env,
                          timeout=timeout)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def db(tmp_path) -> Path:
    """A history that already holds one measurement (the real llama-bench JSON): a refused import must leave it as is."""
    p = tmp_path / "h.sqlite"
    r = mvlm("history", "import", DATA / "smollm2-q4_1-p8-n4-r2.json", "--db", p, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return p


def refused(tmp_path: Path, db: Path, f: Path, *extra: object, compare: bool = True) -> str:
    """`history import f` fails in one line and stores nothing; `compare f f` (the same reader) fails in one line too.
    Returns the import's line."""
    before = sha(db)
    line = error_line(mvlm("history", "import", f, "--db", db, *extra, cwd=tmp_path))
    assert sha(db) == before
    with History(db, create=False) as h:
        assert len(h.entries()) == 1
    if compare:
        error_line(mvlm("compare", f, f, cwd=tmp_path))
    return line


def imported(tmp_path: Path, f: Path, *extra: object) -> list[dict]:
    """The control: `f` imports (exit 0); the stored entries."""
    db = tmp_path / f"ok-{f.stem}.sqlite"
    r = mvlm("history", "import", f, "--db", db, *extra, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return json.loads(mvlm("history", "--db", db, "--json", cwd=tmp_path).stdout)


# --- real llama-bench output, edited --------------------------------------------------------------------------------
def jsonl_lines() -> list[str]:
    return [ln for ln in (DATA / "smollm2-q4_1-p8-n4-r2.jsonl").read_text().splitlines() if ln.strip()]


def jsonl_rows() -> list[dict]:
    return [json.loads(ln) for ln in jsonl_lines()]


def sql_rows() -> tuple[list[str], list[list[str]]]:
    """The columns and the values (as llama-bench's get_values wrote them) of the real -o sql output."""
    cols, rows = [], []
    for ln in (DATA / "smollm2-q4_1-p8-n4-r2.sql").read_text().splitlines():
        if m := re.match(r"INSERT INTO llama_bench \((.*?)\) VALUES \((.*)\);$", ln):
            cols = [c.strip() for c in m[1].split(",")]
            rows.append(re.findall(r"'((?:[^']|'')*)'", m[2]))
    assert rows and all(len(r) == len(cols) for r in rows)
    return cols, rows


def csv_text(rows: list[list[str]] | None = None, cols: list[str] | None = None) -> str:
    """llama-bench -o csv (tools/llama-bench/llama-bench.cpp csv_printer): the field names, then every value quoted."""
    c, r = sql_rows()
    cols, rows = cols or c, rows if rows is not None else r
    return ",".join(cols) + "\n" + "".join(",".join(f'"{v}"' for v in row) + "\n" for row in rows)


def set_csv(row: list[str], field: str, value: str) -> list[str]:
    cols, _ = sql_rows()
    out = list(row)
    out[cols.index(field)] = value
    return out


# 1. CSV rows of another width
@pytest.mark.slow
@pytest.mark.parametrize("how", ["extra column", "cut short"])
def test_csv_row_of_another_width_is_refused_naming_its_line(tmp_path, db, how):
    _, rows = sql_rows()
    good = tmp_path / "good.csv"
    good.write_text(csv_text())
    assert {k for e in imported(tmp_path, good) for k in e["samples"]} >= {"pp8_tps", "tg4_tps"}
    lines = csv_text().splitlines()
    bad_line = lines[1] + ',"extra"' if how == "extra column" else ",".join(lines[1].split(",")[:12])
    f = tmp_path / "bench.csv"
    f.write_text("\n".join([lines[0], bad_line, lines[2]]) + "\n")  # the row at line 2 is the bad one
    line = refused(tmp_path, db, f)
    assert "line 2 is a CSV row of" in line and "under a header of" in line and "nothing" not in line.split("line 2")[0]


# 2. NaN / inf rates
@pytest.mark.slow
@pytest.mark.parametrize("value", ["nan", "inf", "-nan"])
def test_csv_avg_ts_that_is_not_a_number_is_refused(tmp_path, db, value):
    _, rows = sql_rows()
    f = tmp_path / "bench.csv"
    f.write_text(csv_text([rows[0], set_csv(rows[1], "avg_ts", value)]))
    line = refused(tmp_path, db, f)
    assert f"llama-bench row 1 has avg_ts = {value}, not a finite number" in line


@pytest.mark.slow
def test_sql_avg_ts_of_nan_is_refused(tmp_path, db):
    lines = (DATA / "smollm2-q4_1-p8-n4-r2.sql").read_text().splitlines()
    last = max(i for i, ln in enumerate(lines) if ln.startswith("INSERT"))
    m = re.search(r"'[^']*', '[^']*'\);$", lines[last])  # avg_ts, stddev_ts: the last two values
    assert m
    lines[last] = lines[last][:m.start()] + "'nan', '0.000000');"
    f = tmp_path / "bench.sql"
    f.write_text("\n".join(lines) + "\n")
    assert "llama-bench row 1 has avg_ts = nan, not a finite number" in refused(tmp_path, db, f)


# 3. llama-bench JSON lines: a line twice, a line cut short, an mvlm record among them
@pytest.mark.slow
def test_jsonl_line_repeated_is_refused(tmp_path, db):
    lines = jsonl_lines()
    f = tmp_path / "bench.jsonl"
    f.write_text("\n".join([lines[0], lines[1], lines[0]]) + "\n")
    assert "line 3 is a repeat of line 1 (edited or cut short?)" in refused(tmp_path, db, f)
    g = tmp_path / "rows.json"  # the same in llama-bench's -o json: an array with one row twice
    g.write_text(json.dumps([*jsonl_rows(), jsonl_rows()[1]], indent=2))
    assert "llama-bench row 2 repeats row 1" in refused(tmp_path, db, g)


@pytest.mark.slow
@pytest.mark.parametrize("cut", [300, -40])
def test_jsonl_last_line_cut_short_is_refused(tmp_path, db, cut):
    lines = jsonl_lines()
    f = tmp_path / "bench.jsonl"
    f.write_text("\n".join([lines[0], lines[1], lines[0][:cut]]))  # no closing brace, no newline: a write cut short
    assert "line 3 is a JSON line that is not valid JSON (edited or cut short?)" in refused(tmp_path, db, f)


def mvlm_records(temps: tuple[float | None, float | None] = (None, None)) -> list[dict]:
    """What `mvlm bench --json-file` writes for two repetitions (views.exports.render_json)."""
    ctx = RunContext(device="orin", model="MobileVLM-1.7B", precision="q4_k_s", model_file="m.Q4_K_S.gguf",
                     model_sha256="ab" * 32, size_bytes=123, runtime_commit="0c1e570", protocol="lm",
                     params={"n_predict": 400, "n_threads": 4, "n_gpu_layers": 0, "ctx_size": 2048})
    runs = []
    for i, e in enumerate((40.0, 41.0)):
        t = TimingRecord(load_ms=800.0, prompt_eval_ms=200.0, prompt_tokens=24, prompt_tps=120.0, eval_ms=399_000 / e,
                         eval_runs=399, eval_tps=e, sample_ms=40.0, sample_runs=400, sample_tps=10_000.0,
                         total_ms=1000 + 399_000 / e, source_format="llama_perf")
        runs.append(Run(t, ctx, tokens_out=400, wall_s=1.2 + 400 / e, started_at=1.8e9 + 10 * i,
                        ended_at=1.8e9 + 10 * i + 5, peak_rss_mb=900.0, temp_start_c=temps[0], temp_end_c=temps[1]))
    return json.loads(render_json(aggregate(runs)))


@pytest.mark.slow
@pytest.mark.parametrize("mvlm_first", [False, True])
def test_mvlm_record_among_llama_bench_lines_is_refused(tmp_path, db, mvlm_first):
    lines = jsonl_lines()
    rec = json.dumps(mvlm_records()[0])
    f = tmp_path / "bench.jsonl"
    f.write_text("\n".join([rec, *lines] if mvlm_first else [*lines, rec]) + "\n")
    line = refused(tmp_path, db, f)
    assert "a file holds one kind or the other" in line
    assert ("line 1 is an mvlm bench record and line 2 a llama-bench row" if mvlm_first else
            "line 3 is an mvlm bench record and line 1 a llama-bench row") in line


# 4. mvlm JSON: a run that measures nothing, a run twice, readings that are no readings
@pytest.mark.slow
def test_run_without_metrics_or_timing_is_refused(tmp_path, db):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(mvlm_records()))
    assert imported(tmp_path, good)[0]["samples"]["eval_tps"] == [40.0, 41.0]
    for runs in ([{}], [{"repetition": 0, "metrics": {}, "timing": {}}]):
        (rec,) = mvlm_records()
        rec["runs"] = runs
        f = tmp_path / "r.json"
        f.write_text(json.dumps([rec]))
        assert "record 0 is malformed (run 0 has neither 'metrics' nor 'timing'" in refused(tmp_path, db, f)


@pytest.mark.slow
def test_the_same_run_twice_is_refused(tmp_path, db):
    (rec,) = mvlm_records()
    rec["runs"].append(copy.deepcopy(rec["runs"][0]))
    f = tmp_path / "r.json"
    f.write_text(json.dumps([rec]))
    assert "record 0 is malformed (run 2 repeats run 0 exactly" in refused(tmp_path, db, f)


@pytest.mark.slow
@pytest.mark.parametrize(("where", "key", "value", "says"), [
    ("metrics", "tks_out", -4, "run 1: metric 'tks_out' is -4: a count is never negative"),
    ("metrics", "tks_in", -1, "a count is never negative"),
    ("metrics", "temp_start_c", -500.0, "is -500 °C: not a device temperature"),
    ("metrics", "temp_end_c", 900.0, "is 900 °C: not a device temperature"),
    ("run", "temp_start_c", -500.0, "run 1: 'temp_start_c' is -500 °C"),
    ("metrics", "peak_rss_mb", -3.0, "a size is never negative"),
    ("metrics", "t_end", 1.7e9, "run 1: t_end 1.7e+09 is before t_start"),
    ("run", "t_end", 1.7e9, "run 1: t_end 1.7e+09 is before t_start"),
    ("timing", "eval_runs", -3, "run 1: timing 'eval_runs' is -3"),
])
def test_impossible_readings_are_refused(tmp_path, db, where, key, value, says):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(mvlm_records(temps=(45.0, 52.5))))
    assert imported(tmp_path, good)[0]["samples"]["temp_start_c"] == [45.0, 45.0]
    (rec,) = mvlm_records(temps=(45.0, 52.5))
    run = rec["runs"][1]
    (run if where == "run" else run[where])[key] = value
    f = tmp_path / "r.json"
    f.write_text(json.dumps([rec]))
    line = refused(tmp_path, db, f)
    assert "record 0 is malformed" in line and says in line


# 5. llama-bench rows: a time, samples, a test, a device
@pytest.mark.slow
@pytest.mark.parametrize("value", ["not-a-time", 12345])
def test_test_time_that_is_not_a_time_is_refused(tmp_path, db, value):
    a, b = jsonl_rows()
    b["test_time"] = value
    f = tmp_path / "bench.jsonl"
    f.write_text(json.dumps(a) + "\n" + json.dumps(b) + "\n")
    assert f"llama-bench row 1 has test_time = {str(value)!r}, not an ISO 8601 time" in refused(tmp_path, db, f)
    _, rows = sql_rows()
    g = tmp_path / "bench.csv"
    g.write_text(csv_text([rows[0], set_csv(rows[1], "test_time", str(value))]))
    assert "llama-bench row 1 has test_time" in refused(tmp_path, db, g)


@pytest.mark.slow
def test_samples_ts_and_samples_ns_of_different_lengths_are_refused(tmp_path, db):
    a, b = jsonl_rows()
    b["samples_ts"] = [*b["samples_ts"], 50.0]
    f = tmp_path / "bench.jsonl"
    f.write_text(json.dumps(a) + "\n" + json.dumps(b) + "\n")
    assert "llama-bench row 1 has 3 samples_ts but 2 samples_ns" in refused(tmp_path, db, f)


@pytest.mark.slow
def test_row_that_names_no_test_is_refused(tmp_path, db):
    a, b = jsonl_rows()
    b["n_prompt"] = b["n_gen"] = 0
    f = tmp_path / "bench.jsonl"
    f.write_text(json.dumps(a) + "\n" + json.dumps(b) + "\n")
    assert "llama-bench row 1 names no test (n_prompt and n_gen are both 0" in refused(tmp_path, db, f)


@pytest.mark.slow
@pytest.mark.parametrize("test", ["pp-8", "xx8"])
def test_markdown_row_with_a_malformed_test_is_refused(tmp_path, db, test):
    a, b = jsonl_rows()

    def md(t: str) -> str:  # llama-bench -o md (markdown_printer), the real rows' values
        return ("| model | size | params | backend | threads | test | t/s |\n"
                "| --- | ---: | ---: | --- | ---: | ---: | ---: |\n"
                f"| llama 256M Q4_1 | 92.10 MiB | 134.52 M | CPU | 2 | pp8 | {a['avg_ts']:.2f} ± {a['stddev_ts']:.2f} |\n"
                f"| llama 256M Q4_1 | 92.10 MiB | 134.52 M | CPU | 2 | {t} | {b['avg_ts']:.2f} ± {b['stddev_ts']:.2f} |\n"
                "\nbuild: 0c1e570 (0)\n")
    good = tmp_path / "good.md"
    good.write_text(md("tg4"))
    assert {"pp8_tps", "tg4_tps"} <= set(imported(tmp_path, good, "--device", "xeon")[0]["samples"])
    f = tmp_path / "bench.md"
    f.write_text(md(test))
    line = refused(tmp_path, db, f, "--device", "xeon")
    assert f"llama-bench row 1 has test '{test}', not a llama-bench test" in line


@pytest.mark.slow
def test_row_without_samples_is_refused(tmp_path, db):
    a, b = jsonl_rows()
    b["samples_ts"], b["samples_ns"] = [], []  # what llama-bench -r 0 would write
    f = tmp_path / "bench.jsonl"
    f.write_text(json.dumps(a) + "\n" + json.dumps(b) + "\n")
    assert "llama-bench row 1 has no samples (samples_ts is empty)" in refused(tmp_path, db, f)
    _, rows = sql_rows()
    zero = set_csv(set_csv(set_csv(set_csv(rows[1], "avg_ts", "0.000000"), "avg_ns", "0"), "stddev_ts", "0.000000"),
                   "stddev_ns", "0")
    g = tmp_path / "bench.csv"  # the same as CSV: no samples, an average over none (llama-bench's avg of [] is 0)
    g.write_text(csv_text([rows[0], zero]))
    assert "llama-bench row 1 has no samples (no samples_ts and avg_ts = 0)" in refused(tmp_path, db, g)


@pytest.mark.slow
def test_rows_without_a_device_name_need_device(tmp_path, db):
    rows = jsonl_rows()
    for r in rows:
        r["cpu_info"] = r["gpu_info"] = ""
    f = tmp_path / "bench.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = refused(tmp_path, db, f, compare=False)
    assert "llama-bench row 0 has an empty cpu_info and gpu_info" in line and "pass --device NAME" in line
    (e,) = imported(tmp_path, f, "--device", "xeon-box")
    assert e["device"] == "xeon-box"
    assert mvlm("compare", f, f, cwd=tmp_path).returncode == 0  # a comparison stores nothing: no name needed


@pytest.mark.slow
@pytest.mark.parametrize("device", ["a\nb", "a\rb", "", "x" * 101, "tab\there"])
def test_device_option_is_checked_like_a_label(tmp_path, db, device):
    line = refused(tmp_path, db, DATA / "smollm2-q4_1-p8-n4-r2.jsonl", "--device", device, compare=False)
    assert line.startswith("error: --device is ") and "one line of at most 100 characters" in line


# 6. the same reader before a bench measures
@pytest.mark.slow
def test_baseline_with_a_run_that_measures_nothing_is_refused_before_measuring(tmp_path):
    (rec,) = mvlm_records()
    rec["runs"] = [{}]
    f = tmp_path / "base.json"
    f.write_text(json.dumps([rec]))
    prof = tmp_path / "outsider.toml"
    prof.write_text(f'name = "outsider"\ntransport = "local"\nworkdir = "{tmp_path / "dev"}"\ntarget = "host"\n'
                    "threads = 2\n")
    t0 = time.monotonic()
    r = mvlm("bench", "--device", prof, "--model", small_gguf(tmp_path / "m.gguf"), "--baseline", f, cwd=tmp_path)
    line = error_line(r)
    assert "run 0 has neither 'metrics' nor 'timing'" in line and "run 1/" not in r.stderr
    assert time.monotonic() - t0 < 60


# 7. `bench parse`: a negative time is no measurement
@pytest.mark.slow
def test_bench_parse_leaves_a_negative_time_empty_with_one_warning(tmp_path):
    log = tmp_path / "run.log"
    log.write_text(
        "llama_perf_context_print:        load time =     100.00 ms\n"
        "llama_perf_context_print: prompt eval time =      50.00 ms /     8 tokens (    6.25 ms per token,   160.00 tokens "
        "per second)\n"
        "llama_perf_context_print:        eval time =      -5.00 ms /     3 runs   (   -1.67 ms per token,  -600.00 "
        "tokens per second)\n"
        "llama_perf_context_print:       total time =     200.00 ms /    11 tokens\n")
    r = mvlm("bench", "parse", log, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (rec,) = json.loads(r.stdout)
    assert rec["eval_ms"] is None and rec["eval_tps"] is None and rec["prompt_tps"] == 160.0
    warned = [ln for ln in r.stderr.splitlines() if "negative" in ln]
    assert len(warned) == 1 and "run.log" in warned[0], r.stderr
    assert "eval time -5 and eval tok/s -600 are negative: not a measurement; the values are left empty" in warned[0]
    r = mvlm("bench", "parse", log, cwd=tmp_path)  # the table: the same line on stderr, the cell empty
    assert r.returncode == 0 and "-600" not in r.stdout and len([x for x in r.stderr.splitlines() if "negative" in x]) == 1
