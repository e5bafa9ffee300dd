"""The parser against output captured now from the project's own pinned runtime (real binaries, real model).

Expected counts come from what was asked (-n, -p, -c/--chunks) and from llama.cpp's source:
- llama-completion decodes each sampled token on the next loop pass; the loop ends when n_remain hits 0, so the last
  sampled token is never decoded: eval runs = n - 1 (tools/completion/completion.cpp:544-700), unless generation
  ended early at an end-of-generation token ("[end of text]").
- the sampler chain counts one accept per prompt token and per generated token (src/llama-sampler.cpp:669).
- the prompt token count is printed by --verbose-prompt ("number of tokens in prompt = N"), a line the parser
  does not read, so it is an independent witness.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from mvlm_bench.records.llama_bench_output import parse_llama_bench
from mvlm_bench.records.metrics import run_metrics
from mvlm_bench.records.record import Run, RunContext
from mvlm_bench.records.timings import parse_text

pytestmark = pytest.mark.slow

PROMPT = "Building a website can be done in 10 simple steps:\nStep 1:"
N_PREDICT = 16


def _run(host_runtime: Path, binary: str, args: list[str], timeout: int = 600, wall: list | None = None) -> str:
    exe = host_runtime / "bin" / binary
    assert exe.is_file(), f"{exe} missing from the host runtime"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(host_runtime / "lib"), env.get("LD_LIBRARY_PATH")]))
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(exe), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # merged, as a user's `2>&1 | tee run.log` would capture it
        stdin=subprocess.DEVNULL,
        env=env,
        timeout=timeout,
    )
    if wall is not None:
        wall.append(time.monotonic() - t0)
    text = proc.stdout.decode("utf-8", errors="replace")
    assert proc.returncode == 0, f"{binary} exited {proc.returncode}:\n{text[-3000:]}"
    return text


@pytest.mark.parametrize(
    "extra",
    [["-lv", "4"], [], ["-lv", "4", "--log-colors", "on"]],
    ids=["lv4", "default", "lv4-colors"],
)
def test_llama_completion_counts(host_runtime: Path, smollm2_gguf: Path, extra: list[str]):
    args = ["-m", str(smollm2_gguf), "-p", PROMPT, "-n", str(N_PREDICT), "-no-cnv", "--temp", "0", "-t", "2"]
    wall: list[float] = []
    text = _run(host_runtime, "llama-completion", args + ["--verbose-prompt"] + extra, wall=wall)
    m = re.search(r"number of tokens in prompt = (\d+)", re.sub(r"\x1b\[[0-9;]*m", "", text))
    assert m, f"--verbose-prompt printed no token count:\n{text[-3000:]}"
    n_prompt = int(m.group(1))

    rec = parse_text(text)
    assert rec.source_format == "common_perf_print", (rec.source_format, rec.warnings, text[-2000:])
    assert rec.prompt_tokens == n_prompt
    ended_early = "[end of text]" in text
    if ended_early:
        assert 1 <= rec.eval_runs <= N_PREDICT - 1
    else:
        assert rec.eval_runs == N_PREDICT - 1
        assert rec.sample_runs == n_prompt + N_PREDICT
    assert rec.total_tokens == rec.prompt_tokens + rec.eval_runs
    for f in ("load_ms", "sample_ms", "prompt_eval_ms", "eval_ms", "total_ms", "prompt_tps", "eval_tps", "sample_tps"):
        v = getattr(rec, f)
        assert v is not None and v > 0, f"{f}={v!r}; warnings={rec.warnings}"
    assert rec.total_ms >= rec.prompt_eval_ms + rec.eval_ms
    assert rec.vision_encode_ms is None and rec.image_tokens is None
    assert not any("printed as" in w for w in rec.warnings), rec.warnings
    # the paper's Total (loading included) rebuilt from llama.cpp's numbers vs the process's wall time
    m = run_metrics(Run(rec, RunContext(), tokens_out=N_PREDICT))
    assert m["total_source"] == "llama.cpp total + load"
    # (no timing ratio here: on a fast machine process start-up and teardown are a large share of a 16-token run)
    assert m["total_s"] == pytest.approx((rec.total_ms + rec.load_ms) / 1000, rel=1e-9)
    assert m["total_s"] <= wall[0], (m["total_s"], wall[0])


def test_llama_perplexity_prompt_only(host_runtime: Path, smollm2_gguf: Path, tmp_path: Path):
    n_ctx, chunks = 64, 2
    corpus = tmp_path / "text.txt"
    corpus.write_text((PROMPT.replace("\n", " ") + " First, choose a domain name and a hosting plan. ") * 40)
    text = _run(
        host_runtime,
        "llama-perplexity",
        ["-m", str(smollm2_gguf), "-f", str(corpus), "-c", str(n_ctx), "--chunks", str(chunks), "-t", "2", "-lv", "4"],
    )
    rec = parse_text(text)
    assert rec.source_format == "llama_perf", (rec.source_format, text[-2000:])
    assert rec.prompt_tokens == n_ctx * chunks  # every chunk is one batched decode of n_ctx tokens
    assert rec.prompt_eval_ms > 0 and rec.total_ms > 0 and rec.load_ms > 0
    # no single-token decode happened: llama.cpp prints 0 ms / 1 runs and "inf" (or nan) tokens per second
    assert rec.eval_runs == 1 and rec.eval_ms == 0.0 and rec.eval_tps is None
    assert any("eval" in w for w in rec.warnings)


@pytest.fixture(scope="module")
def bench_outputs(host_runtime: Path, smollm2_gguf: Path) -> dict[str, str]:
    out = {}
    for fmt in ("json", "md", "csv", "jsonl"):
        args = ["-m", str(smollm2_gguf), "-p", "16", "-n", "8", "-r", "1", "-t", "2", "-o", fmt]
        out[fmt] = _run(host_runtime, "llama-bench", args)
    return out


@pytest.mark.parametrize("fmt", ["json", "md", "csv", "jsonl"])
def test_llama_bench_formats(bench_outputs: dict[str, str], fmt: str):
    text = bench_outputs[fmt]
    rows = parse_llama_bench(text)
    assert [(r["n_prompt"], r["n_gen"]) for r in rows] == [(16, 0), (0, 8)], text[-2000:]
    for r in rows:
        assert r["avg_ts"] > 0 and r["stddev_ts"] == 0  # one repetition: no spread
        assert r["n_threads"] == 2
    rec = parse_text(text)
    assert rec.source_format == f"llama-bench-{fmt}"
    assert (rec.prompt_tokens, rec.eval_runs) == (16, 8)
    assert rec.prompt_tps == pytest.approx(rows[0]["avg_ts"]) and rec.eval_tps == pytest.approx(rows[1]["avg_ts"])


def test_llama_bench_formats_agree(bench_outputs: dict[str, str]):
    """The JSON and JSONL runs are separate measurements, but describe the same tests and build."""
    raw = bench_outputs["json"]
    js, _ = json.JSONDecoder().raw_decode(raw, re.search(r"^\[", raw, re.M).start())
    rows = {fmt: parse_llama_bench(bench_outputs[fmt]) for fmt in ("json", "md", "csv", "jsonl")}
    commit = js[0]["build_commit"]
    for fmt, rs in rows.items():
        assert all(r.get("build_commit") == commit for r in rs), fmt
    assert rows["md"][0]["model_type"] == js[0]["model_type"]
