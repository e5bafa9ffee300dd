"""What a careless outsider who knows llama-bench and llama-server tripped over in mvlm's llama-bench vocabulary,
serve and convert by Hub id (issue 23), each a case through the `mvlm` command: llama-bench's repeated options and
ranges, `-ngl -1`, the protocol named wrong, compare on mvlm's own llama-bench reports and on llama-bench test names,
log options that would hide llama-server's port, `-np` beyond the front's concurrency, verify by Hub id."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from peers import error_line, mvlm_cli, small_gguf


def mvlm(*args: object, cwd: Path | None = None, timeout: float = 300, env: dict | None = None):
    return mvlm_cli(*args, cwd=cwd, timeout=timeout, env=env)


@pytest.mark.slow
def test_repeated_options_and_ranges_give_the_configurations_llama_bench_gives(host_runtime, smollm2_gguf, tmp_path):
    """`-p 8 -p 16` (an option given twice) and `-t 1-2` (a range) as llama-bench reads them, with its -ngl -1."""
    flags = ["-p", "8", "-p", "16", "-n", "0", "-t", "1-2", "-ngl", "-1", "-r", "1"]
    env = {**os.environ, "LD_LIBRARY_PATH": str(host_runtime / "lib")}
    lb = subprocess.run([str(host_runtime / "bin" / "llama-bench"), "-m", str(smollm2_gguf), *flags, "-o", "json"],
                        capture_output=True, text=True, timeout=300, env=env)
    assert lb.returncode == 0, lb.stderr[-2000:]
    r = mvlm("bench", "-P", "llama-bench", "-m", smollm2_gguf, *flags, "--warmup", "0", "-o", "json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]

    def configs(rows):
        return sorted((x["n_threads"], x["n_prompt"], x["n_gen"], x["n_gpu_layers"]) for x in rows)

    assert configs(json.loads(r.stdout)) == configs(json.loads(lb.stdout)) == \
        [(1, 8, 0, -1), (1, 16, 0, -1), (2, 8, 0, -1), (2, 16, 0, -1)]


@pytest.mark.slow
@pytest.mark.parametrize("flags,says", [
    ("-P llama_bench -p 8", "unknown protocol 'llama_bench'"),
    ("-P llama-bench -t 4-2", "is not a range llama-bench reads"),
    ("-P llama-bench -p 1-100000*2", "out of range"),
])
def test_the_protocol_is_checked_first_and_ranges_are_checked(tmp_path, flags, says):
    assert says in error_line(mvlm("bench", "-m", small_gguf(tmp_path / "m.gguf"), *flags.split()))


@pytest.mark.slow
def test_compare_takes_the_metric_names_of_llama_bench_tests_and_judges_each_test_on_what_it_measured(smollm2_gguf,
                                                                                                      tmp_path):
    """mvlm's llama-bench report has one record per test: `--metric eval_tps` judges the tg test and leaves the pp
    test out (it refused the whole comparison); a llama-bench test is named as the table names it (pp8)."""
    r = mvlm("bench", "-P", "llama-bench", "-m", smollm2_gguf, "-p", "8", "-n", "4", "-t", "2", "-r", "3",
             "--warmup", "0", "--json-file", tmp_path / "a.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    a = tmp_path / "a.json"
    for metric, row in (("eval_tps", "Eval"), ("Eval_prompt", "Eval_prompt")):
        c = mvlm("compare", a, a, "--metric", metric, "--fail-on-regression", "5%", "--json", cwd=tmp_path)
        assert c.returncode == 0, c.stderr
        pairs = json.loads(c.stdout)["comparisons"]
        assert len(pairs) == 1 and [m["name"] for m in pairs[0]["metrics"]] == [row]
    # each test's rate under its own name too (llama-bench's files name it so): --metric pp8 on mvlm's own records,
    # equal to llama-bench's avg_ts field of the same record
    for rec in json.loads(a.read_text()):  # each repetition's rate is llama-bench's sample of it (samples_ts)
        mine = sorted(run["metrics"][f"{rec['test']}_tps"] for run in rec["runs"])
        assert mine == pytest.approx(sorted(rec["samples_ts"]), rel=1e-6), rec["test"]
    c = mvlm("compare", a, a, "--metric", "pp8", "--json", cwd=tmp_path)
    assert c.returncode == 0, c.stderr
    assert [m["name"] for m in json.loads(c.stdout)["comparisons"][0]["metrics"]] == ["pp8"]
    imported = tmp_path / "lb.sqlite"
    assert mvlm("history", "import", a, "--db", imported).returncode == 0
    from mvlm_bench.decide.verdict import check_metrics

    assert check_metrics(["pp8", "pp8 (tokens/s)", "tg128_tps", "pp512+tg128"]) == \
        ["pp8_tps", "pp8_tps", "tg128_tps", "pp512+tg128_tps"]


@pytest.mark.parametrize("extra", [["--", "--log-disable"], ["--", "-lv", "0"], ["--", "--verbosity=0"]])
def test_serve_refuses_llama_server_options_that_would_hide_its_port(tmp_path, extra):
    line = error_line(mvlm("serve", "--model", small_gguf(tmp_path / "m.gguf"), *extra, timeout=60))
    assert "mvlm reads llama-server's log to find its port" in line, line


@pytest.mark.slow
def test_serve_lets_as_many_requests_through_at_once_as_it_has_slots(smollm2_gguf, host_runtime):
    from peers import Served, _free_port

    s = Served("--model", smollm2_gguf, "--port", _free_port(), "--ctx-size", 2048, "-np", 12)
    try:
        assert "12 requests at once" in s.out, s.out
    finally:
        s.stop()


@pytest.mark.slow
def test_verify_takes_the_hub_id_convert_takes(tmp_path):
    """The same OWNER/NAME as `mvlm convert`, through huggingface_hub's cache: offline and not cached, the same one
    line naming the download; cached, verify reads the checkpoint (and goes on to its own checks)."""
    from test_hub import fill_hub_cache

    cache = tmp_path / "hub"
    cache.mkdir()
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    line = error_line(mvlm("verify", "tester/tiny", "--gguf", tmp_path / "x.gguf", env=env, cwd=tmp_path))
    assert "hf download tester/tiny" in line, line
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text("{}")
    fill_hub_cache(cache, "tester/tiny", ck)
    r = mvlm("verify", "tester/tiny", "--gguf", tmp_path / "x.gguf", "--image-threshold", "nan", env=env, cwd=tmp_path)
    assert "is not a threshold" in error_line(r)  # past the checkpoint: the Hub id was resolved to the cached copy


def test_metric_names_as_every_table_heads_them():
    """`mvlm history` heads its columns "Eval tok/s", the bench table "VE" over "ms", compare "Eval (tokens/s)"."""
    from mvlm_bench.records.columns import resolve_metric

    said = {t: resolve_metric(t) for t in ("Eval tok/s", "Eval_prompt tok/s", "Total s", "VE ms", "VE ms/patch",
                                           "Peak RSS MB", "Eval (tokens/s)", "eval", "Evalx", "s")}
    assert said == {"Eval tok/s": "eval_tps", "Eval_prompt tok/s": "prompt_tps", "Total s": "total_s",
                    "VE ms": "ve_ms", "VE ms/patch": "ve_ms_per_patch", "Peak RSS MB": "peak_rss_mb",
                    "Eval (tokens/s)": "eval_tps", "eval": "eval_tps", "Evalx": None, "s": None}


@pytest.mark.slow
@pytest.mark.parametrize("flag,says", [(["-nkvo", "1"], "offload placement"), (["-sm", "none"], "offload"),
                                       (["--no-warmup"], "use --warmup 0"), (["-mmp", "0"], "default"),
                                       (["-oe", "md"], "-o picks")])
def test_llama_bench_flags_mvlm_lacks_are_named_not_misread(tmp_path, flag, says):
    """`-nkvo 1` was read as `-n kvo` ("No such command '1'"): a llama-bench option mvlm does not take is named."""
    r = mvlm("bench", "-P", "llama-bench", "-m", small_gguf(tmp_path / "m.gguf"), "-p", "8", *flag)
    line = error_line(r)
    assert r.returncode == 2 and line.startswith(f"error: {flag[0]} is llama-bench's") and says in line, r.stderr


@pytest.mark.slow
def test_dash_h_is_help_everywhere_as_in_llama_cpp_tools():
    for cmd in ([], ["bench"], ["history", "plot"], ["serve"]):
        r = mvlm(*cmd, "-h")
        assert r.returncode == 0 and "Usage:" in r.stdout and "--help" in r.stdout, (cmd, r.stderr)


@pytest.mark.slow
def test_a_narrow_terminal_cuts_cells_visibly_and_never_folds_a_number(tmp_path, data_dir):
    """On an 80-column terminal, a table too wide for it had 36397 printed as 363 over 97: now a cell is cut with an
    ellipsis and a note says so (through a pipe the table is whole: test_cli)."""
    import fcntl
    import pty
    import struct
    import sys
    import termios

    db = tmp_path / "h.sqlite"
    assert mvlm("history", "import", data_dir / "llama-bench" / "smollm2-q4_1-p8-n4-r2.json", "--db", db,
                "--device", "a-device-with-a-long-name").returncode == 0
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "MVLM_HISTORY")} | {"TERM": "dumb"}
    p = subprocess.Popen([sys.executable, "-m", "mvlm", "history", "--db", str(db)], stdout=secondary,
                         stderr=secondary, env=env)
    os.close(secondary)
    out = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    assert p.wait(timeout=60) == 0
    text = out.decode(errors="replace")
    rows = [ln for ln in text.splitlines() if ln.startswith("│")]
    assert rows and all(len(ln.rstrip()) <= 80 for ln in text.splitlines()), text
    assert "…" in text and "columns are too few for this table" in text, text
    assert len(rows) == 1, text  # one line for the one entry: nothing folded onto a second line
