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
