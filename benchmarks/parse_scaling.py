"""Benchmark: `mvlm bench parse` (mvlm_bench.timings.parse_file) on large inputs: linear time, bounded memory.

Input: N MB of junk with one real llama.cpp timing block in the middle (the llama_perf block of a real llama-cli run),
for N = 4, 40 and 200 by default. Junk kinds: ``random`` (bytes from os.urandom: about one line break per 40 bytes,
invalid UTF-8, lines starting with ``[`` and ``{``) and ``text`` (log-like lines: ``[`` lines that start JSON-like
arrays, csv/markdown look-alikes, long words followed by " time =", ANSI escapes). Each file is parsed in a fresh
child process, which reports the parse time and its peak RSS (resource.getrusage) before and after parsing.

Reported per run: seconds, seconds per MB (the ratio that must stay flat for linear time), peak RSS growth during the
parse, and whether the block's numbers came out right. Target: s/MB roughly constant from 4 to 200 MB; RSS growth a
few MB, independent of the size.

    python benchmarks/parse_scaling.py [--sizes 4 40 200] [--kinds random text] [--json-file out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The perf block of a real llama-cli run (llama_perf era), as it printed it: tests/data/llama-cpp-outputs/17_…
BLOCK = "".join((REPO / "tests" / "data" / "llama-cpp-outputs" / "17_issue9013_llama-cli_llama-perf_interrupted_2025-05.txt")
                .read_text().splitlines(keepends=True)[2:7])
EXPECTED = {"eval_tps": 12.64, "eval_runs": 178, "prompt_tokens": 49, "total_ms": 20699.49, "sample_runs": 227}

CHILD = r"""
import json, resource, sys, time
from mvlm_bench.records.timings import parse_file
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
rec = parse_file(sys.argv[1])
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": dt, "rss_before_kb": before, "rss_peak_kb": peak,
                  "record": {k: getattr(rec, k) for k in ("eval_tps", "eval_runs", "prompt_tokens", "total_ms",
                                                           "sample_runs")}}))
"""


def _text_chunk(rng: random.Random, size: int) -> bytes:
    """Log-like junk that walks every path of the parser (none of it a timing line)."""
    words = ["the", "model", "load", "tensor", "time", "eval", "token", "image", "batch", "avg_ts", "n_prompt"]
    lines: list[str] = []
    n = 0
    while n < size:
        k = rng.randrange(8)
        if k == 0:
            line = "[" + " ".join(rng.choices(words, k=6))
        elif k == 1:
            line = "{" + '"avg_' + "x" * rng.randrange(40) + '": ' + str(rng.random())
        elif k == 2:
            line = "| test | t/s | " + " | ".join(rng.choices(words, k=4)) + " |"
        elif k == 3:
            line = "a" * rng.randrange(1000, 4000) + " time = " + str(rng.randrange(100)) + " ms"
        elif k == 4:
            line = "\x1b[32m" + " ".join(rng.choices(words, k=10)) + "\x1b]0;" + "t" * 50
        elif k == 5:
            line = ",".join(rng.choices(words, k=8))
        else:
            line = " ".join(rng.choices(words, k=rng.randrange(3, 20)))
        lines.append(line)
        n += len(line) + 1
    return ("\n".join(lines) + "\n").encode()


def make_file(path: Path, mb: int, kind: str, seed: int = 0) -> None:
    """mb MB of junk of this kind with BLOCK in the middle."""
    rng = random.Random(seed)
    total = mb * 1_000_000
    text_chunk = _text_chunk(rng, 1 << 20) if kind == "text" else b""
    with open(path, "wb") as f:
        written = 0
        block_done = False
        while written < total:
            if not block_done and written >= total // 2:
                f.write(b"\n" + BLOCK.encode())
                block_done = True
            chunk = os.urandom(1 << 20) if kind == "random" else text_chunk
            chunk = chunk[: total - written]
            f.write(chunk)
            written += len(chunk)
        if not block_done:
            f.write(b"\n" + BLOCK.encode())


def measure(path: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"child failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 40, 200], help="MB of junk per file")
    ap.add_argument("--kinds", nargs="+", default=["random", "text"], choices=["random", "text"])
    ap.add_argument("--json-file", dest="json", type=Path, help="also write the results here")
    a = ap.parse_args()
    results = []
    print(f"{'kind':7} {'MB':>5} {'seconds':>8} {'s/MB':>7} {'RSS growth MB':>14} {'peak RSS MB':>12}  numbers")
    with tempfile.TemporaryDirectory(prefix="mvlm-parse-scaling-") as d:
        for kind in a.kinds:
            for mb in a.sizes:
                p = Path(d) / f"{kind}-{mb}.log"
                make_file(p, mb, kind)
                m = measure(p)
                p.unlink()
                ok = all(m["record"][k] == v for k, v in EXPECTED.items())
                growth = (m["rss_peak_kb"] - m["rss_before_kb"]) / 1024
                row = {"kind": kind, "mb": mb, "seconds": round(m["seconds"], 3),
                       "s_per_mb": round(m["seconds"] / mb, 4), "rss_growth_mb": round(growth, 1),
                       "rss_peak_mb": round(m["rss_peak_kb"] / 1024, 1), "numbers_right": ok}
                results.append(row)
                print(f"{kind:7} {mb:5d} {row['seconds']:8.2f} {row['s_per_mb']:7.4f} {growth:14.1f} "
                      f"{row['rss_peak_mb']:12.1f}  {'right' if ok else 'WRONG: ' + json.dumps(m['record'])}",
                      flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["numbers_right"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
