"""mvlm's bench JSON in llama-bench's world (docs/reports.md, "llama-bench fields").

The oracle is the real llama-bench of the pinned build and llama.cpp's own scripts/compare-llama-bench.py, run from
the source tree that build was made from (in the runtime cache the ``host_runtime`` fixture builds): every
`mvlm bench` record carries every llama-bench field, agrees with llama-bench on the same model and machine, and the
script compares two mvlm runs. `mvlm history import` stores llama-bench's json / jsonl / sql output, and refuses
anything else in one line.
"""

from __future__ import annotations

import ast
import json
import os
import sqlite3
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from mvlm.cli import _json_file_alias
from mvlm_bench.records.llama_bench_output import parse_llama_bench_file
from mvlm_bench.views.exports import LLAMA_BENCH_FIELDS

MVLM = [sys.executable, "-m", "mvlm"]
DATA = Path(__file__).resolve().parent / "data" / "llama-bench"


def mvlm(*args, cwd: Path | None = None, timeout: float = 600):
    return subprocess.run([*MVLM, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"})


def _script(host_runtime: Path) -> Path:
    """llama.cpp's scripts/compare-llama-bench.py in the source tree the host build was made from."""
    script = host_runtime.parent / "src" / "scripts" / "compare-llama-bench.py"
    assert script.is_file(), script
    return script


def _script_list(script: Path, name: str) -> list[str]:
    """A list constant of the pinned compare-llama-bench.py, read from its source (not imported: it runs on import)."""
    tree = ast.parse(script.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == name for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"{name} not in {script}")


def _llama_bench(host_runtime: Path, model: Path, fmt: str, out: Path, *extra: str) -> Path:
    env = {**os.environ, "LD_LIBRARY_PATH": str(host_runtime / "lib")}
    r = subprocess.run([str(host_runtime / "bin" / "llama-bench"), "-m", str(model), "-t", "2", "-o", fmt, *extra],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out.write_text(r.stdout)
    return out


@pytest.fixture(scope="module")
def runs(host_runtime, smollm2_gguf, tmp_path_factory):
    """Two real `mvlm bench` runs (JSON files) and one real llama-bench -o json on the same model, 2 threads."""
    d = tmp_path_factory.mktemp("compat")
    files = []
    for i in range(2):
        out = d / f"mvlm-{i}.json"
        r = mvlm("bench", "--device", "local", "--model", smollm2_gguf, "-n", 8, "--repeat", 2, "--warmup", 0,
                 "--threads", 2, "--json-file", out, cwd=d)
        assert r.returncode == 0, r.stderr[-2000:]
        files.append(out)
    bench = _llama_bench(host_runtime, smollm2_gguf, "json", d / "llama-bench.json", "-p", "8", "-n", "4", "-r", "1")
    return d, files, json.loads(bench.read_text())


@pytest.mark.slow
def test_every_record_carries_every_llama_bench_field(runs, host_runtime):
    _, files, _ = runs
    db_fields = _script_list(_script(host_runtime), "LLAMA_BENCH_DB_FIELDS")
    assert set(db_fields) <= set(LLAMA_BENCH_FIELDS)
    for f in files:
        (rec,) = json.loads(f.read_text())
        assert list(rec)[: len(LLAMA_BENCH_FIELDS)] == list(LLAMA_BENCH_FIELDS)  # llama-bench's order, then mvlm's
        missing = [k for k in db_fields + ["samples_ns", "samples_ts"] if rec.get(k) is None]
        assert not missing, missing
        assert rec["cpu_info"] and rec["device"] == "local" and rec["runs"]
        # the pg test: n_prompt / n_gen are llama.cpp's prompt-eval and eval counts; t/s over their decode time
        t = rec["runs"][0]["timing"]
        assert (rec["n_prompt"], rec["n_gen"]) == (t["prompt_tokens"], t["eval_runs"])
        ts = [(t["prompt_tokens"] + t["eval_runs"]) * 1000 / (t["prompt_eval_ms"] + t["eval_ms"])
              for t in (r["timing"] for r in rec["runs"])]
        assert rec["samples_ts"] == pytest.approx(ts) and rec["avg_ts"] == pytest.approx(statistics.mean(ts))
        assert rec["samples_ns"] == [round((r["timing"]["prompt_eval_ms"] + r["timing"]["eval_ms"]) * 1e6)
                                     for r in rec["runs"]]


@pytest.mark.slow
def test_record_agrees_with_the_real_llama_bench(runs):
    _, files, bench_rows = runs
    (rec,) = json.loads(files[0].read_text())
    ref = bench_rows[0]
    same = ("build_commit", "build_number", "cpu_info", "gpu_info", "backends", "model_type", "model_size",
            "model_n_params", "n_batch", "n_ubatch", "n_threads", "type_k", "type_v", "flash_attn", "cpu_mask",
            "cpu_strict", "poll", "split_mode", "main_gpu", "no_kv_offload", "tensor_split", "embeddings")
    assert {k: rec[k] for k in same} == {k: ref[k] for k in same}
    assert rec["model_filename"] == Path(ref["model_filename"]).name
    assert {type(rec[k]) for k in ref if k in rec and rec[k] is not None and ref[k] is not None
            and not isinstance(ref[k], float)} <= {type(ref[k]) for k in ref}  # the same JSON types


@pytest.mark.slow
def test_compare_llama_bench_script_compares_two_mvlm_runs(runs, host_runtime):
    d, files, _ = runs
    recs = [json.loads(f.read_text())[0] for f in files]
    commit = recs[0]["build_commit"]
    argv = [sys.executable, str(_script(host_runtime)), "-i", str(files[0]), "-i", str(files[1]), "--tool", "llama-bench",
            "-b", commit, "-c", commit]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=d)
    assert r.returncode == 0, r.stderr
    test = f"pp{recs[0]['n_prompt']}+tg{recs[0]['n_gen']}"
    row = next(line for line in r.stdout.splitlines() if test in line)
    # the script averages avg_ts over every row of a build: both runs here, on either side of the comparison
    speed = f"{statistics.mean(rec['avg_ts'] for rec in recs):.2f}"
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells.count(speed) == 2 and "llama 256M Q4_1" in row, r.stdout
    assert cells[-1] == "1.00"  # the same build against itself


@pytest.mark.slow
def test_history_import_stores_real_llama_bench_json_jsonl_sql(host_runtime, smollm2_gguf, tmp_path):
    db = tmp_path / "h.sqlite"
    files = {fmt: _llama_bench(host_runtime, smollm2_gguf, fmt, tmp_path / f"lb.{fmt}", "-p", "8", "-n", "4",
                               "-r", "2") for fmt in ("json", "jsonl", "sql")}
    r = mvlm("history", "import", *files.values(), "--db", db, "--device", "here", "--label", "lb")
    assert r.returncode == 0, r.stderr
    h = mvlm("history", "--db", db, "--json")
    entries = json.loads(h.stdout)
    assert len(entries) == 3 and {e["label"] for e in entries} == {"lb"} and {e["device"] for e in entries} == {"here"}
    for e, (fmt, f) in zip(entries, files.items(), strict=True):
        rows = parse_llama_bench_file(f)
        assert len(rows) == 2 and e["protocol"] == "llama-bench", fmt
        for row in rows:
            key = f"pp{row['n_prompt']}_tps" if row["n_gen"] == 0 else f"tg{row['n_gen']}_tps"
            want = row.get("samples_ts") or [row["avg_ts"]]  # -o sql has no samples: its mean
            assert e["samples"][key] == pytest.approx(want, rel=1e-4), fmt
    table = mvlm("history", "--db", db).stdout  # the tg test's median is the entries' Eval column
    for e in entries:
        assert f"{statistics.median(e['samples']['tg4_tps']):.2f}" in table
    c = mvlm("compare", "id:1", "id:2", "--db", db, "--json")
    assert c.returncode == 0, c.stderr
    names = {m["key"] for m in json.loads(c.stdout)["comparisons"][0]["metrics"]}
    assert {"pp8_tps", "tg4_tps"} <= names


@pytest.mark.slow
def test_history_import_stores_mvlm_json(runs, tmp_path):
    _, files, _ = runs
    db = tmp_path / "h.sqlite"
    r = mvlm("history", "import", files[0], "--db", db)
    assert r.returncode == 0, r.stderr
    (e,) = json.loads(mvlm("history", "--db", db, "--json").stdout)
    (rec,) = json.loads(files[0].read_text())
    assert e["created_at"].startswith(rec["test_time"].rstrip("Z")) and e["samples"]["eval_tps"] == [
        r["metrics"]["eval_tps"] for r in rec["runs"]]
    # `bench parse` (for llama.cpp's own output) names the file for what it is and what reads it
    r = mvlm("bench", "parse", files[0])
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "is an `mvlm bench` report" in errors[0], r.stderr
    assert "mvlm history import" in errors[0] and "mvlm compare" in errors[0]


@pytest.mark.slow
def test_history_import_refuses_what_is_not_a_benchmark(tmp_path):
    real = (DATA / "smollm2-q4_1-p8-n4-r2.json").read_text()
    bad = {"empty.json": b"", "other.json": b'{"name": "x", "values": [1, 2]}', "binary.bin": os.urandom(512),
           "truncated.json": real[: len(real) // 2].encode(), "truncated.jsonl": b'{"build_commit": "0c1e5'}
    db = tmp_path / "h.sqlite"
    for name, content in bad.items():
        p = tmp_path / name
        p.write_bytes(content)
        r = mvlm("history", "import", DATA / "smollm2-q4_1-p8-n4-r2.jsonl", p, "--db", db, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr, (name, r.stderr)
        assert str(p) in lines[0] and "Extra data" not in lines[0], lines[0]
        assert not db.exists() or not sqlite3.connect(db).execute("SELECT * FROM sqlite_master").fetchall()


@pytest.mark.slow
def test_bench_parse_reads_llama_bench_rows_in_every_output_form(tmp_path):
    for fmt in ("json", "jsonl", "sql"):
        f = DATA / f"smollm2-q4_1-p8-n4-r2.{fmt}"
        r = mvlm("bench", "parse", "--json", f, timeout=120)
        assert r.returncode == 0, r.stderr
        (out,) = json.loads(r.stdout)
        assert out["source_format"] == f"llama-bench-{fmt}"
        rows = out["llama_bench_rows"]
        assert [(x["n_prompt"], x["n_gen"]) for x in rows] == [(8, 0), (0, 4)]
        assert out["prompt_tps"] == pytest.approx(rows[0]["avg_ts"]) and out["eval_tps"] == pytest.approx(rows[1]["avg_ts"])
    # JSON lines that are not llama-bench records: one line, no "Extra data"
    p = tmp_path / "other.jsonl"
    p.write_text('{"a": 1}\n{"b": 2}\n')
    r = mvlm("bench", "parse", p, timeout=120)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "Extra data" not in r.stderr


def test_json_file_alias_rewrites_only_bench_with_a_value():
    assert _json_file_alias(["mvlm", "bench", "-m", "a.gguf", "--json", "r.json"]) == [
        "mvlm", "bench", "-m", "a.gguf", "--json-file", "r.json"]
    for argv in (["mvlm", "bench", "-m", "a.gguf", "--json"], ["mvlm", "bench", "--json", "--csv", "x.csv"],
                 ["mvlm", "bench", "parse", "--json", "log.txt"], ["mvlm", "history", "--json"],
                 ["mvlm", "compare", "a.json", "b.json", "--json"], ["mvlm", "bench", "--json", "parse", "lb.sql"]):
        assert _json_file_alias(argv) == argv
    assert _json_file_alias(["mvlm", "bench", "-m", "a.gguf", "--json=r.json"]) == [
        "mvlm", "bench", "-m", "a.gguf", "--json-file=r.json"]


def test_old_json_spelling_still_works_with_a_deprecation_line(tmp_path):
    r = mvlm("bench", "--model", tmp_path / "missing.gguf", "--json", tmp_path / "r.json", timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 2 and "deprecated" in lines[0] and "--json-file" in lines[0]
    assert "missing.gguf does not exist" in lines[1]


@pytest.mark.slow
def test_imported_llama_bench_rows_fill_prompt_and_eval_tps_which_the_gate_judges(tmp_path):
    """Real llama-bench output (-p 8 -n 4 -r 2, json / jsonl / sql) as three sessions of `main`, and the json one with
    its tg samples halved as `pr`: the one pp and one tg test are also prompt_tps / eval_tps, so `mvlm history` and
    the gate see them (before, the gate had no metric to judge: "gate not applied", exit 0)."""
    files = [DATA / f"smollm2-q4_1-p8-n4-r2.{fmt}" for fmt in ("json", "jsonl", "sql")]
    slow = json.loads(files[0].read_text())
    for row in slow:
        if row["n_gen"]:
            row["samples_ts"] = [v * 0.5 for v in row["samples_ts"]]
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    db = tmp_path / "h.sqlite"
    assert mvlm("history", "import", *files, "--db", db, "--label", "main").returncode == 0
    assert mvlm("history", "import", tmp_path / "slow.json", "--db", db, "--label", "pr").returncode == 0
    stored = sorted(json.loads(mvlm("history", "--db", db, "--json").stdout), key=lambda e: e["id"])  # import order
    # (listed by when each was measured: the copies of one run share its time)
    for e, f in zip(stored, [*files, tmp_path / "slow.json"], strict=True):
        rows = parse_llama_bench_file(f)
        pp, tg = (next(r for r in rows if r[k]) for k in ("n_prompt", "n_gen"))
        assert e["samples"]["prompt_tps"] == e["samples"]["pp8_tps"] == pytest.approx(pp.get("samples_ts") or [pp["avg_ts"]])
        assert e["samples"]["eval_tps"] == e["samples"]["tg4_tps"] == pytest.approx(tg.get("samples_ts") or [tg["avg_ts"]])
    c = mvlm("compare", "id:1", "id:4", "--db", db, "--metric", "eval_tps", "--json")
    (m,) = json.loads(c.stdout)["comparisons"][0]["metrics"]
    assert m["baseline_median"] == pytest.approx(statistics.median(stored[0]["samples"]["tg4_tps"]))
    assert m["candidate_median"] == pytest.approx(statistics.median(stored[3]["samples"]["tg4_tps"]))
    g = mvlm("compare", "label:main", "label:pr", "--db", db, "--fail-on-regression", "5%", "--json")
    gate = json.loads(g.stdout)["comparisons"][0]["gate"]
    assert gate["judged"] and {v["key"] for v in gate["history"]} == {"prompt_tps", "eval_tps"}, gate
    r = mvlm("compare", "label:main", "label:pr", "--db", db, "--fail-on-regression", "5%")
    assert "gate not applied" not in r.stderr and ("gate passed" in r.stderr or r.returncode == 4), r.stderr


@pytest.mark.slow
def test_real_llama_bench_sql_of_a_model_name_with_a_quote_is_refused_saying_why(host_runtime, smollm2_gguf, tmp_path):
    model = tmp_path / "Bob's model.gguf"
    model.symlink_to(smollm2_gguf)
    sql = _llama_bench(host_runtime, model, "sql", tmp_path / "lb.sql", "-p", "8", "-n", "0", "-r", "1")
    n = next(i for i, x in enumerate(sql.read_text().splitlines(), 1) if x.startswith("INSERT INTO llama_bench"))
    db = tmp_path / "h.sqlite"
    r = mvlm("history", "import", sql, "--db", db)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert f"line {n}: an unbalanced quote in a llama-bench INSERT" in lines[0] and "use -o json" in lines[0], lines[0]
    assert not db.exists()
    real = _llama_bench(host_runtime, model, "json", tmp_path / "lb.json", "-p", "16", "-n", "4", "-r", "2")
    assert mvlm("history", "import", real, real, "--db", db).returncode == 0  # -o json names it fine
    (e,) = json.loads(mvlm("history", "--db", db, "--json").stdout)
    assert e["model"] == "Bob's model" and e["samples"]["eval_tps"] == e["samples"]["tg4_tps"]


@pytest.mark.slow  # gguf-py's reader takes seconds over the 49k-token vocabulary
def test_precision_comes_from_the_name_else_from_the_files_own_file_type(tmp_path, smollm2_gguf):
    """The precision is the file's own general.file_type (what llama-bench's model_type says): a model saved as plain
    ``model.gguf`` is not "unknown", and a misleading name does not relabel it; without one, the name decides."""
    import gguf

    from mvlm_core.gguf_header import precision_of

    plain = tmp_path / "model.gguf"
    plain.symlink_to(smollm2_gguf)
    stored = gguf.GGUFReader(smollm2_gguf).fields["general.file_type"]
    assert gguf.LlamaFileType(int(stored.parts[-1][0])).name == "MOSTLY_Q4_1"  # independently: the file says Q4_1
    assert precision_of(plain) == "q4_1" == precision_of(smollm2_gguf)
    named = tmp_path / "Other-Q8_0.gguf"
    named.symlink_to(smollm2_gguf)
    assert precision_of(named) == "q4_1"  # the file, not its name
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\x03\x00")
    assert precision_of(broken) == "unknown"


# llama-bench's flags on `mvlm bench`: the same meaning, the same rows
_FLAGS = ["-p", "8", "-n", "4", "-pg", "8,4", "-d", "0,16", "-t", "1,2", "-ngl", "0", "-b", "64", "-ub", "32", "-fa",
          "off", "-ctk", "q8_0", "-ctv", "f16", "-C", "0x3", "--cpu-strict", "1", "--poll", "10"]
_CONFIG_FIELDS = ("n_batch", "n_ubatch", "n_threads", "cpu_mask", "cpu_strict", "poll", "type_k", "type_v",
                  "n_gpu_layers", "flash_attn", "n_prompt", "n_gen", "n_depth", "model_type", "model_size",
                  "model_n_params", "build_commit", "backends", "split_mode", "no_kv_offload", "embeddings", "repack")


@pytest.mark.slow
def test_llama_bench_flags_give_the_rows_the_real_llama_bench_gives(host_runtime, smollm2_gguf, tmp_path):
    """The same flags to the real llama-bench and to `mvlm bench --protocol llama-bench -o json`: the same tests, and
    every configuration field of every row equal (a sweep over -t included)."""
    env = {**os.environ, "LD_LIBRARY_PATH": str(host_runtime / "lib")}
    lb = subprocess.run([str(host_runtime / "bin" / "llama-bench"), "-m", str(smollm2_gguf), *_FLAGS, "-r", "1", "-o",
                         "json"], capture_output=True, text=True, timeout=300, env=env)
    assert lb.returncode == 0, lb.stderr[-2000:]
    ref = json.loads(lb.stdout)
    r = mvlm("bench", "-P", "llama-bench", "-m", smollm2_gguf, *_FLAGS, "-r", "1", "--warmup", "0", "-o", "json",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    mine = json.loads(r.stdout)

    def key(row):
        return row["n_threads"], row["n_depth"], row["n_prompt"], row["n_gen"]

    assert len(mine) == len(ref) == 12  # (pp8, tg4, pp8+tg4) x 2 depths x 2 thread counts
    assert sorted(map(key, mine)) == sorted(map(key, ref))
    for a, b in zip(sorted(mine, key=key), sorted(ref, key=key), strict=True):
        assert {f: a[f] for f in _CONFIG_FIELDS} == {f: b[f] for f in _CONFIG_FIELDS}, key(a)
    assert {m["test"] for m in mine} >= {"pp8", "tg4", "pp8+tg4", "pp8@d16", "tg4@d16", "pp8+tg4@d16"}


@pytest.mark.slow
def test_output_formats_on_stdout_are_llama_benchs_and_hold_the_same_records_as_the_json_file(smollm2_gguf,
                                                                                              host_runtime, tmp_path):
    """-o sql runs in sqlite3 into llama-bench's table, a row per record of --json-file; -o jsonl is a line per test
    (as llama-bench's) that `mvlm history import` stores as the JSON file stores; -o csv is llama-bench's CSV, which
    compare-llama-bench.py reads; -o md is llama-bench's table, which `mvlm history import` reads; -r defaults to 5."""
    base = ["bench", "-P", "llama-bench", "-m", smollm2_gguf, "-p", "8", "-n", "4", "-t", "2", "--warmup", "0"]
    js = tmp_path / "r.json"
    r = mvlm(*base, "-r", "2", "-o", "sql", "--json-file", js, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    con = sqlite3.connect(":memory:")
    con.executescript(r.stdout)
    con.row_factory = sqlite3.Row
    rows = [dict(x) for x in con.execute("SELECT * FROM llama_bench ORDER BY n_prompt DESC")]
    recs = sorted(json.loads(js.read_text()), key=lambda x: -x["n_prompt"])
    assert len(rows) == len(recs) == 2
    for row, rec in zip(rows, recs, strict=True):
        assert (row["n_prompt"], row["n_gen"], row["n_threads"], row["avg_ns"]) == \
            (rec["n_prompt"], rec["n_gen"], rec["n_threads"], rec["avg_ns"])
        assert row["avg_ts"] == pytest.approx(rec["avg_ts"]) and row["model_type"] == rec["model_type"]
    r = mvlm(*base, "-o", "jsonl", "--json-file", js, cwd=tmp_path)  # no -r: llama-bench's 5
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == 2 and [len(x["samples_ts"]) for x in lines] == [5, 5]
    assert {len(rec["runs"]) for rec in json.loads(js.read_text())} == {5}
    (tmp_path / "r.jsonl").write_text(r.stdout)
    for src, db in ((js, "a.sqlite"), (tmp_path / "r.jsonl", "b.sqlite")):
        assert mvlm("history", "import", src, "--db", tmp_path / db).returncode == 0
    stored = [json.loads(mvlm("history", "--db", tmp_path / db, "--json").stdout) for db in ("a.sqlite", "b.sqlite")]
    assert [e["samples"] for e in stored[0]] == [e["samples"] for e in stored[1]]
    csv_out = tmp_path / "r.csv"
    r = mvlm(*base, "-r", "1", "-o", "csv", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("build_commit,build_number,"), r.stdout[:300]
    csv_out.write_text(r.stdout)
    commit = json.loads(js.read_text())[0]["build_commit"]
    script = subprocess.run([sys.executable, str(_script(host_runtime)), "--tool", "llama-bench", "-i", str(csv_out),
                             "-b", commit, "-c", commit], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert script.returncode == 0 and "pp8" in script.stdout and "tg4" in script.stdout, script.stderr[-2000:]
    r = mvlm(*base, "-r", "2", "-o", "md", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("| model | size | params | backend | threads | test | t/s |")
    (tmp_path / "r.md").write_text(r.stdout)
    imp = mvlm("history", "import", tmp_path / "r.md", "--device", "local", "--db", tmp_path / "c.sqlite")
    assert imp.returncode == 0, imp.stderr


@pytest.mark.slow
def test_llama_cpp_settings_reach_the_papers_protocols_programs(smollm2_gguf, tmp_path):
    """-fa, -ctk, -ctv, -b, -ub reach llama-completion: its own log (what the record's llama-bench fields are read
    from) says it ran with them."""
    r = mvlm("bench", "-m", smollm2_gguf, "-n", "4", "-r", "1", "--warmup", "0", "-t", "2", "-fa", "on", "-ctk",
             "q8_0", "-ctv", "q8_0", "-b", "64", "-ub", "32", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (rec,) = json.loads(r.stdout)
    assert (rec["flash_attn"], rec["type_k"], rec["type_v"], rec["n_batch"], rec["n_ubatch"]) == \
        (1, "q8_0", "q8_0", 64, 32)
    r = mvlm("bench", "-m", smollm2_gguf, "-n", "4", "-r", "1", "--warmup", "0", "-t", "2", "--json", cwd=tmp_path)
    (rec,) = json.loads(r.stdout)
    assert (rec["type_k"], rec["n_batch"]) == ("f16", 2048)  # llama.cpp's defaults when not given


# the flags as typed -> words of the one-line refusal
_REFUSED = {
    "-p 512": "-p shapes llama-bench's tests",
    "-d 128": "-d shapes llama-bench's tests",
    "-n 4,8": "a list of lengths is llama-bench's",
    "-fa maybe": "give on, off or auto",
    "-ctk q9_9": "is not one of",
    "-b 64 -ub 128": "-ub 128 is larger than the batch size (64)",
    "-fa off -ctv q4_0": "needs flash attention",
    "-C zz": "is not a CPU mask",
    "--prio 1,2": "takes one value",
    "-o xml": "choose one of json, jsonl, csv, md, sql",
    "-P llama-bench -p 0 -n 0": "no test to run",
    "-P llama-bench -pg 512": "give one prompt+generation pair as PP,TG",
}


@pytest.mark.slow
@pytest.mark.parametrize("flags", sorted(_REFUSED))
def test_llama_bench_flags_refused_in_one_line(smollm2_gguf, tmp_path, flags):
    r = mvlm("bench", "-m", smollm2_gguf, *flags.split(), cwd=tmp_path, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and _REFUSED[flags] in lines[0], r.stderr
