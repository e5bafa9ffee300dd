"""Benchmark: `mvlm quantize` against llama.cpp's own `llama-quantize` on the same file, in the same run.

Both run the same C++ (mvlm drives the pinned runtime's llama-quantize), so the ratio of wall times measures mvlm's
overhead: Python start-up, reading the GGUF header, the free-space check. The target is 1.00 +/- 0.05.

The input is a LLaMA-architecture GGUF with random f16 weights at MobileLLaMA-1.4B width (2048 hidden, 5632 ffn,
32000 vocab) but fewer layers, written once to the cache. Runs alternate (anchor, mvlm, anchor, mvlm, ...) so drift
in machine load hits both; the report gives medians, the ratio, and each side's peak RSS.

    python benchmarks/quantize.py [--type q4_k_s] [--layers 4] [--rounds 3] [--json-file out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mvlm_core.runtime import cache_root, find  # noqa: E402


def make_input(layers: int) -> Path:
    import gguf

    out = cache_root() / "bench" / f"llama-2048x{layers}-F16.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    hidden, ffn, vocab, heads = 2048, 5632, 32000, 16
    rng = np.random.default_rng(0)
    tmp = out.with_suffix(".tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name("bench-llama")
    w.add_context_length(2048)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(hidden // heads)
    w.add_file_type(1)
    w.add_vocab_size(vocab)

    def t(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    w.add_tensor("token_embd.weight", t(vocab, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", t(vocab, hidden))
    for i in range(layers):
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{n}.weight", t(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(hidden, ffn))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(out)
    return out


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process (and its children)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr.read().decode()[-2000:]}")
    return dt, ru.ru_maxrss * 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--type", default="q4_k_s")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json-file", dest="json", type=Path)
    a = ap.parse_args()
    inp = make_input(a.layers)
    rt = find("host")
    work = cache_root() / "bench" / "quantize-out"
    work.mkdir(parents=True, exist_ok=True)
    anchor_cmd = [str(rt.exe("llama-quantize")), str(inp), str(work / "anchor.gguf"), a.type.upper(), str(a.threads)]
    mvlm_cmd = [sys.executable, "-m", "mvlm", "quantize", str(inp), "--type", a.type, "--outdir", str(work), "--no-quality",
                "--threads", str(a.threads), "--json"]
    res: dict[str, list[tuple[float, int]]] = {"llama-quantize": [], "mvlm quantize": []}
    for _ in range(a.rounds):
        res["llama-quantize"].append(timed(anchor_cmd))
        res["mvlm quantize"].append(timed(mvlm_cmd))
    med = {k: statistics.median(t for t, _ in v) for k, v in res.items()}
    rss = {k: max(r for _, r in v) for k, v in res.items()}
    ratio = med["mvlm quantize"] / med["llama-quantize"]
    size_in = inp.stat().st_size
    print(f"input: {inp.name} ({size_in / 1e6:.0f} MB), type {a.type}, {a.threads} threads, {a.rounds} rounds")
    for k in res:
        runs = ", ".join(f"{t:.2f}" for t, _ in res[k])
        print(f"  {k:15s} median {med[k]:7.2f} s  (runs: {runs})  peak RSS {rss[k] / 1e6:7.1f} MB")
    verdict = "OK" if abs(ratio - 1) <= 0.05 else "OUT OF BAND"
    print(f"  ratio mvlm / llama-quantize = {ratio:.3f}  (target 1.00 +/- 0.05: {verdict})")
    if a.json:
        a.json.write_text(json.dumps({"input": str(inp), "type": a.type, "median_s": med, "peak_rss_bytes": rss,
                                      "ratio": ratio, "runs": {k: [t for t, _ in v] for k, v in res.items()}}, indent=2))
    return 0 if verdict == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())
