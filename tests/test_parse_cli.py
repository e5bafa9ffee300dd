"""`mvlm bench parse FILE... [--json]` through typer's CliRunner (local app and the real `mvlm` app)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mvlm_bench.records.timings import FIELDS
from mvlm_core.errors import MvlmError

LLAMA_PERF = """\
some generated text
llama_perf_sampler_print:    sampling time =      24.62 ms /   227 runs   (    0.11 ms per token,  9220.90 tokens per second)
llama_perf_context_print:        load time =     618.92 ms
llama_perf_context_print: prompt eval time =     927.17 ms /    49 tokens (   18.92 ms per token,    52.85 tokens per second)
llama_perf_context_print:        eval time =   14085.85 ms /   178 runs   (   79.13 ms per token,    12.64 tokens per second)
llama_perf_context_print:       total time =   20699.49 ms /   227 tokens
"""  # noqa: E501
MTMD_ONLY = "encoding image slice...\nimage slice encoded in 301 ms\ndecoding image batch 1/1, n_tokens_batch = 666\n"


def _local_app() -> typer.Typer:
    """The mvlm application itself (``mvlm bench parse`` is the door users use)."""
    from mvlm.cli import app

    return app


@pytest.fixture
def logs(tmp_path: Path) -> tuple[Path, Path, Path]:
    a = tmp_path / "cli.log"
    a.write_text(LLAMA_PERF)
    b = tmp_path / "mtmd.log"
    b.write_text(MTMD_ONLY)
    c = tmp_path / "junk.bin"
    c.write_bytes(bytes(range(256)) * 8)
    return a, b, c


def test_json_one_object_per_file(logs):
    res = CliRunner().invoke(_local_app(), ["bench", "parse", "--json", *map(str, logs)])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert [Path(d["file"]).name for d in doc] == ["cli.log", "mtmd.log", "junk.bin"]
    for d in doc:
        assert set(FIELDS) <= set(d) and {"source_format", "missing", "warnings"} <= set(d)
    a, b, c = doc
    assert (a["eval_ms"], a["eval_runs"], a["eval_tps"], a["total_tokens"]) == (14085.85, 178, 12.64, 227)
    assert (a["sample_ms"], a["sample_runs"], a["source_format"]) == (24.62, 227, "llama_perf")
    assert a["vision_encode_ms"] is None and "vision_encode_ms" in a["missing"]
    assert (b["vision_encode_ms"], b["image_tokens"], b["eval_ms"]) == (301.0, 666, None)
    assert c["missing"] == list(FIELDS) and c["warnings"]


def test_table_one_row_per_file(logs):
    res = CliRunner().invoke(_local_app(), ["bench", "parse", *map(str, logs)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for name in ("cli.log", "mtmd.log", "junk.bin"):
        assert name in res.output
    assert "12.64 (178)" in res.output and "52.85 (49)" in res.output and "301.00 (666)" in res.output
    assert "no llama.cpp timing lines found" in res.output  # the junk file's warning, under the table


def test_unreadable_file_is_one_line_mvlm_error(tmp_path: Path):
    res = CliRunner().invoke(_local_app(), ["bench", "parse", str(tmp_path / "missing.log")])
    assert res.exit_code != 0
    assert isinstance(res.exception, MvlmError)
    assert "missing.log" in str(res.exception) and "\n" not in str(res.exception)


def test_wired_into_mvlm_app(logs):
    from mvlm.cli import app

    res = CliRunner().invoke(app, ["bench", "parse", "--json", str(logs[0])])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)[0]["prompt_tokens"] == 49


def test_console_script_prints_one_error_line(tmp_path: Path):
    missing = tmp_path / "nope.log"
    proc = subprocess.run(
        [sys.executable, "-m", "mvlm", "bench", "parse", str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "nope.log" in lines[0] and lines[0].startswith("error:"), proc.stderr
