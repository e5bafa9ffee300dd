"""Benchmark: what a CPU-matched build buys on this machine: the host runtime's generic variant (x86-64, no AVX) vs.
the matched one (native: every instruction set this CPU has), on the MobileVLM_V2-1.7B-shaped model.

Both sides are `mvlm bench --device local --protocol vlm` runs of the same files (LM q4_0, mmproj f16), one
repetition each, `--cpu-variant generic` and `--cpu-variant native`, alternating A B B A after one warm-up of each, so
machine drift hits both. Reported per metric: both sides' medians, the ratio matched/generic per round (rates: higher
is faster; the vision encoder's ms and Total: lower is faster) with its median and spread, and which kernels each
build's system_info line names (the record's cpu_kernels).

    python benchmarks/cpu_variants.py [--rounds 4] [-n 16] [--model LM.gguf --mmproj MMPROJ.gguf] [--json-file F]

Default model: benchmarks/convert.py's random MobileVLM_V2-1.7B-shaped checkpoint (cached under --cache), converted
with `mvlm convert --outtype f16` and quantized with `mvlm quantize --type q4_0`; building it takes some minutes once.
Both host variants are built if missing (`mvlm runtime build --target host --cpu-variant all`).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from mvlm_bench.device.profiles import profile_from_dict  # noqa: E402
from mvlm_bench.plan.plan import Plan  # noqa: E402
from mvlm_bench.plan.spec import BenchSpec  # noqa: E402
from mvlm_bench.records.metrics import run_metrics  # noqa: E402
from mvlm_bench.session.runners import collect  # noqa: E402
from mvlm_core import runtime as rtmod  # noqa: E402

SIDES = ("generic", "native")
# metric, label, True when higher is faster
METRICS = (("prompt_tps", "Eval_prompt tok/s", True), ("eval_tps", "Eval tok/s", True), ("ve_ms", "VE ms", False),
           ("total_s", "Total s", False))


def model_files(cache: Path) -> tuple[Path, Path]:
    """The 1.7B-shaped LM (q4_0) and mmproj (f16), converted and quantized once into ``cache``."""
    out = cache / "cpu-variants"
    lm, mm = out / "MobileVLM_V2-1.7B-random-Q4_0.gguf", out / "mmproj-MobileVLM_V2-1.7B-random-F16.gguf"
    if lm.is_file() and mm.is_file():
        return lm, mm
    from convert import make_checkpoint

    ckpt = make_checkpoint(cache)
    py = [sys.executable, "-m", "mvlm"]
    subprocess.run([*py, "convert", str(ckpt), "-o", str(out), "--outtype", "f16"], check=True, cwd=ROOT)
    f16 = next(p for p in out.glob("*.gguf") if not p.name.startswith("mmproj-") and "F16" in p.name)
    mmproj = next(out.glob("mmproj-*.gguf"))
    subprocess.run([*py, "quantize", str(f16), "--type", "q4_0", "-o", str(out)], check=True, cwd=ROOT)
    q4 = next(p for p in out.glob("*Q4_0.gguf") if not p.name.startswith("mmproj-"))
    q4.rename(lm)
    mmproj.rename(mm)
    f16.unlink()
    return lm, mm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--mmproj", type=Path)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("MVLM_BENCH_CACHE", "/tmp/mvlm-bench-cache")))
    ap.add_argument("-n", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json-file", dest="json", type=Path)
    a = ap.parse_args()
    for side in SIDES:
        rt = rtmod.build(rtmod.BuildOptions(target="host", cpu_variant=side), log=print)
        print(f"host {side}: {rt.root} ({rt.manifest.get('toolchain')})")
    lm, mm = (a.model, a.mmproj) if a.model and a.mmproj else model_files(a.cache)
    print(f"model: {lm.name} ({lm.stat().st_size / 1e9:.2f} GB) + {mm.name} ({mm.stat().st_size / 1e9:.2f} GB), "
          f"vlm protocol, -n {a.n}, {a.threads} threads, {a.rounds} rounds A B B A ...")
    spec = BenchSpec("vlm", lm, mmproj=mm, repeat=1, warmup=0, n_predict=a.n, threads=a.threads, timeout=3600)
    got: dict[str, list[dict]] = {s: [] for s in SIDES}
    kernels: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as td:
        profiles = {s: profile_from_dict({"transport": "local", "target": "host", "threads": a.threads,
                                          "workdir": f"{td}/{s}", "cpu_variant": s}, where="cpu_variants",
                                         default_name=f"local-{s}") for s in SIDES}

        def once(side: str) -> dict:
            res = collect(Plan(profiles[side], [spec]))
            if not res.runs:
                raise SystemExit(f"the {side} run failed: {res.outcome.failures}")
            kernels[side] = str(res.runs[0].facts.get("cpu_kernels"))
            return run_metrics(res.runs[0])

        t0 = time.monotonic()
        for s in SIDES:  # warm-up of each: files pushed, page cache warm
            once(s)
        for i in range(a.rounds):
            order = SIDES if i % 2 == 0 else SIDES[::-1]
            for s in order:
                got[s].append(once(s))
        minutes = (time.monotonic() - t0) / 60
    rows = []
    for key, label, higher in METRICS:
        g, n = [m[key] for m in got["generic"]], [m[key] for m in got["native"]]
        if any(v is None for v in g + n):
            continue
        speedups = [(y / x if higher else x / y) for x, y in zip(g, n, strict=True)]
        rows.append({"metric": label, "generic_median": statistics.median(g), "native_median": statistics.median(n),
                     "speedup_median": statistics.median(speedups), "speedup_min": min(speedups),
                     "speedup_max": max(speedups)})
    print(f"\n{a.rounds} rounds in {minutes:.1f} min; speedup = how many times faster the matched build is")
    print(f"{'metric':18} {'generic':>10} {'native':>10} {'speedup':>8} {'(min..max)':>14}")
    for r in rows:
        print(f"{r['metric']:18} {r['generic_median']:10.2f} {r['native_median']:10.2f} {r['speedup_median']:8.2f} "
              f"  ({r['speedup_min']:.2f}..{r['speedup_max']:.2f})")
    for s in SIDES:
        print(f"{s} kernels (system_info): {kernels.get(s)}")
    if a.json:
        a.json.write_text(json.dumps({"model": lm.name, "mmproj": mm.name, "n": a.n, "threads": a.threads,
                                      "rounds": a.rounds, "minutes": minutes, "rows": rows, "kernels": kernels,
                                      "runs": got}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
