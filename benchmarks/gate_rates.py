#!/usr/bin/env python3
"""False-alarm and detection rates of the regression gate, measured for real on this machine (`make bench-gate`).

The real SmolLM2-135M (Q4_1) runs the papers' LM protocol on the `local` device with the pinned host runtime. Each
round measures, one after the other:

1. a **baseline session** of the build (stored: the history the gate learns the noise from; the last
   ``--baseline-sessions`` of them are the baseline's sessions),
2. a **quiet candidate** session (the same build: any failure is a false alarm),
3. a **slow candidate** session: the same build run under ``benchmarks/throttle.py``, which stops the llama.cpp
   process for ``--slowdown`` of every 50 ms (a real ~10% slowdown; any pass is a missed regression),
4. an **interleaved A/B** session of baseline vs quiet candidate, and one of baseline vs slow candidate.

Every gate mode judges the same sessions:

- ``within-session``: the old gate, the candidate session vs the latest baseline session (Mann-Whitney + threshold);
- ``history``: the candidate vs the baseline's stored sessions (noise band), no re-run;
- ``history + A/B confirm``: as history, and a flagged metric is re-measured interleaved with ``gate.CONFIRM_PAIRS``
  pairs (what ``mvlm bench --baseline … --fail-on-regression`` does when the baseline can be re-run);
- ``interleaved``: the A/B sessions (``mvlm bench --against …``).

Prints a Markdown table (rates with Wilson 95% intervals) and writes every number to ``--out`` (JSON). Takes about
a minute per round on 2 cores. Not a test: rates are measured, not asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mvlm_bench.decide import gate  # noqa: E402
from mvlm_bench.decide.stats import GATE_METRICS, compare_samples, describe_regression, gate_summary  # noqa: E402
from mvlm_bench.device.profiles import load_profile  # noqa: E402
from mvlm_bench.history.entries import entries_from_runs  # noqa: E402
from mvlm_bench.plan.plan import Plan  # noqa: E402
from mvlm_bench.plan.spec import BenchSpec, Side  # noqa: E402
from mvlm_bench.session.runners import collect  # noqa: E402

THROTTLE = REPO / "benchmarks" / "throttle.py"
MODES = ("within-session", "history", "history + A/B confirm", "interleaved")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def samples(runs) -> dict:
    es = entries_from_runs(runs)
    if not es:
        raise SystemExit("a session produced no runs")
    return es[0].samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="rounds (each: quiet + slow candidate, both modes)")
    ap.add_argument("--baseline-sessions", type=int, default=5, help="stored baseline sessions the history uses")
    ap.add_argument("--repeat", type=int, default=5, help="repetitions per session (A/B: pairs)")
    ap.add_argument("-n", type=int, default=32, help="tokens generated per run")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1: no spinning on shared cores)")
    ap.add_argument("--slowdown", type=float, default=0.10, help="fraction of time the slow candidate is stopped")
    ap.add_argument("--threshold", type=float, default=0.05, help="the gate's threshold (fraction)")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "gate_rates.json")
    args = ap.parse_args()

    from mvlm_core.assets import smollm2_gguf

    model = smollm2_gguf()
    profile = load_profile("local")
    profile = dataclasses.replace(profile, threads=args.threads)
    spec = BenchSpec("lm", model, repeat=args.repeat, warmup=1, n_predict=args.n, threads=args.threads)
    slow_wrap = (sys.executable, str(THROTTLE), str(args.slowdown), "--")

    def run_side(wrapper=()) -> dict:
        """One stored-style session of the build; ``wrapper`` (the throttle) makes it the slow candidate."""
        prof = dataclasses.replace(profile, exec_wrapper=tuple(wrapper)) if wrapper else profile
        return samples(collect(Plan(prof, [spec])).runs)

    def ab_session(wrapper=(), pairs: int | None = None) -> list:
        s = dataclasses.replace(spec, repeat=pairs or spec.repeat)
        sides = (Side(s, name="baseline"), Side(s, wrapper=tuple(wrapper), name="candidate"))
        ab = collect(Plan(profile, [s], sides=sides))
        return gate.compare_interleaved(samples(ab.side("baseline")), samples(ab.side("candidate")))

    t0 = time.monotonic()
    base_sessions: list[dict] = [run_side() for _ in range(args.baseline_sessions)]
    counts = {m: {"quiet": [0, 0], "slow": [0, 0]} for m in MODES}  # failed, total
    log: list[dict] = []
    measured_slowdowns: list[float] = []
    for rnd in range(args.rounds):
        base_sessions.append(run_side())
        window = base_sessions[-args.baseline_sessions:]
        latest = window[-1]
        for kind, wrap in (("quiet", ()), ("slow", slow_wrap)):
            cand = run_side(wrap)
            rec: dict = {"round": rnd, "kind": kind}
            comps = compare_samples(latest, cand)
            regs, _ = gate_summary(comps, args.threshold, GATE_METRICS)
            rec["within-session"] = [describe_regression(r, args.threshold) for r in regs]
            hd = gate.decide_history(window, cand, args.threshold)
            rec["history"] = hd.regressions
            rec["history_verdicts"] = {v.key: (v.verdict, v.slowdown, v.band) for v in hd.history}
            flagged = any(v.verdict in ("slower", "suspected") for v in hd.history)
            confirm_pairs = max(args.repeat, gate.CONFIRM_PAIRS)
            hc = gate.decide_history(window, cand, args.threshold,
                                     confirm=(lambda w=wrap, n=confirm_pairs: ab_session(w, n)))
            rec["history + A/B confirm"] = hc.regressions if flagged else []
            ab = ab_session(wrap)
            ic = gate.decide_interleaved(ab, args.threshold)
            rec["interleaved"] = ic.regressions
            ev = next((c for c in ab if c.key == "eval_tps"), None)
            if kind == "slow" and ev is not None and ev.slowdown is not None:
                measured_slowdowns.append(ev.slowdown)
            for m in MODES:
                counts[m][kind][0] += bool(rec[m])
                counts[m][kind][1] += 1
            log.append(rec)
        done = rnd + 1
        eta = (time.monotonic() - t0) / done * (args.rounds - done)
        print(f"round {done}/{args.rounds}: " + ", ".join(
            f"{m}: {counts[m]['quiet'][0]} false / {counts[m]['slow'][0]} caught" for m in MODES)
            + f"  (ETA {eta / 60:.1f} min)", file=sys.stderr, flush=True)

    med = sorted(measured_slowdowns)[len(measured_slowdowns) // 2] if measured_slowdowns else float("nan")
    lines = [f"Gate rates on this machine: {args.rounds} rounds, SmolLM2-135M Q4_1, lm protocol, -n {args.n}, "
             f"{args.threads} thread(s), {args.repeat} repetitions (A/B: pairs) per session, {args.baseline_sessions} "
             f"baseline sessions, threshold {args.threshold:.0%}; injected slowdown {args.slowdown:.0%} of the time "
             f"stopped (measured Eval slowdown in A/B pairs, median {med:.1%}); {(time.monotonic() - t0) / 60:.1f} min",
             "", "| gate mode | false alarms (quiet) | 95% CI | detected (slow) | 95% CI |", "|---|---:|:---:|---:|:---:|"]
    for m in MODES:
        fq, nq = counts[m]["quiet"]
        ds, ns = counts[m]["slow"]
        lo1, hi1 = wilson(fq, nq)
        lo2, hi2 = wilson(ds, ns)
        lines.append(f"| {m} | {fq}/{nq} = {fq / max(nq, 1):.0%} | {lo1:.0%}–{hi1:.0%} | {ds}/{ns} = "
                     f"{ds / max(ns, 1):.0%} | {lo2:.0%}–{hi2:.0%} |")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "counts": counts,
                                    "median_measured_slowdown": med, "rounds": log, "table": lines}, indent=2,
                                   default=str))
    print(f"\nwritten: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
