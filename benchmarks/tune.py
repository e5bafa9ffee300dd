"""Benchmark: what `mvlm tune`'s search saves against the full grid, and whether it finds the same answer.

Model: benchmarks/convert.py's random MobileVLM_V2-1.7B-shaped checkpoint (cached under --cache), given to the tune as
a checkpoint (converted once to f16 GGUFs in the tune cache). Candidates: LM types x mmproj types (default
input,q4_0,q4_k_s,q8_0 x input,q8_0: 8). Device: this machine (`local`), vlm protocol, -n 16.

Both arms use the same files, fidelity figures and measuring code (mvlm_tune.measure.DeviceRounds) in one session:

- **grid**: every candidate ``--repeat`` times (after one warm-up of its files), in a new shuffled order each round;
- **search**: `mvlm tune`'s successive halving (mvlm_tune.search), ``--repeat`` runs for the survivors.

The arms alternate (grid, search, search, grid with --pairs 2) so drift falls on both. Reported: each arm's measured
runs and minutes (warm-ups included, as the device spends them), the ratio, the frontier of each (candidate keys,
fastest first) and whether the recommendation is the same; a different one is reported with both medians and the
noise, since two candidates within noise may legitimately swap.

    python benchmarks/tune.py [--cache DIR] [--lm-types ...] [--mmproj-types ...] [-n 16] [--repeat 5] [--json-file F]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from mvlm_bench.device.profiles import load_profile  # noqa: E402
from mvlm_tune import space  # noqa: E402
from mvlm_tune.frontier import Point, frontier, noise, recommend  # noqa: E402
from mvlm_tune.measure import DeviceRounds, Setup  # noqa: E402
from mvlm_tune.search import search  # noqa: E402
from mvlm_tune.variants import from_checkpoint, prepare  # noqa: E402


def fresh_points(v, cands, budget) -> list[Point]:
    out = []
    for c in cands:
        fid = v.candidate_fidelity(c.lm, c.mmproj)
        out.append(Point(c, fid, in_budget=budget.allows(fid)))
    return out


class Counting:
    """The arm's measure, counting runs (warm-ups too) and seconds."""

    def __init__(self, rounds: DeviceRounds):
        self.rounds, self.runs, self.seconds = rounds, 0, 0.0

    def __call__(self, batch: list[Point]) -> None:
        warm = sum(1 for p in batch if (p.candidate.lm, p.candidate.mmproj) not in self.rounds.warm)
        t0 = time.monotonic()
        self.rounds(batch)
        self.seconds += time.monotonic() - t0
        self.runs += len(batch) + warm


def run_grid(setup: Setup, v, cands, budget, repeat: int, seed: int) -> tuple[list[Point], Counting]:
    points = fresh_points(v, cands, budget)
    m = Counting(DeviceRounds(setup, lambda r: None, print, "benchmark"))
    rng = random.Random(seed)
    for _ in range(repeat):
        batch = [p for p in points if not p.failed]
        rng.shuffle(batch)
        m(batch)
    return points, m


def run_search(setup: Setup, v, cands, budget, repeat: int, seed: int) -> tuple[list[Point], Counting]:
    points = fresh_points(v, cands, budget)
    m = Counting(DeviceRounds(setup, lambda r: None, print, "benchmark"))
    search(points, m, repeat=repeat, seed=seed)
    return points, m


def summary(points: list[Point], m: Counting) -> dict:
    level = noise(points)
    rec = recommend(points, level)
    front = frontier(points, level)
    return {"runs": m.runs, "minutes": round(m.seconds / 60, 2), "noise": level,
            "frontier": [p.candidate.key() for p in front],
            "frontier_in_budget": [p.candidate.key() for p in front if p.in_budget],
            "recommendation": rec.pick.candidate.key() if rec.pick else None, "why": rec.why,
            "medians": {p.candidate.key(): p.median for p in points}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("MVLM_BENCH_CACHE", "/tmp/mvlm-bench-cache")))
    ap.add_argument("--lm-types", default="input,q4_0,q4_k_s,q8_0")
    ap.add_argument("--mmproj-types", default="input,q8_0")
    ap.add_argument("--budget", default=space.DEFAULT_BUDGET)
    ap.add_argument("-n", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=1, help="grid/search pairs, alternating (ABBA)")
    ap.add_argument("--json-file", type=Path)
    a = ap.parse_args()
    from convert import make_checkpoint

    from mvlm_core.filetypes import LM_TYPES, MMPROJ_TYPES

    lm, mm = from_checkpoint(make_checkpoint(a.cache), print)
    lm_types = space.parse_types(a.lm_types, LM_TYPES, "--lm-types")
    mm_types = space.parse_types(a.mmproj_types, MMPROJ_TYPES, "--mmproj-types")
    t0 = time.monotonic()
    v = prepare(lm, mm, lm_types, mm_types, on_step=print)
    prep_min = (time.monotonic() - t0) / 60
    budget = space.parse_budget(a.budget)
    cands = space.grid(lm_types, mm_types, [None], [None])
    setup = Setup(load_profile("local"), "vlm", v, "total", a.n)
    arms = {"grid": run_grid, "search": run_search}
    order = [("grid", "search"), ("search", "grid")]
    results: dict[str, list[dict]] = {"grid": [], "search": []}
    for i in range(a.pairs):
        for arm in order[i % 2]:
            points, m = arms[arm](setup, v, cands, budget, a.repeat, seed=i)
            results[arm].append(summary(points, m))
            print(f"{arm}: {m.runs} runs, {m.seconds / 60:.1f} min, recommendation {results[arm][-1]['recommendation']}")
    g, s = results["grid"], results["search"]
    report = {"candidates": len(cands), "prepare_minutes": round(prep_min, 1), "grid": g, "search": s,
              "runs_ratio": sum(x["runs"] for x in s) / sum(x["runs"] for x in g),
              "minutes_ratio": sum(x["minutes"] for x in s) / sum(x["minutes"] for x in g),
              "same_frontier": all(set(x["frontier"]) == set(y["frontier"]) for x, y in zip(g, s, strict=True)),
              # outside the budget the search measures once on purpose: compare the part the answer comes from
              "same_frontier_in_budget": all(set(x["frontier_in_budget"]) == set(y["frontier_in_budget"])
                                             for x, y in zip(g, s, strict=True)),
              "same_recommendation": all(x["recommendation"] == y["recommendation"] for x, y in zip(g, s, strict=True))}
    print(json.dumps({k: report[k] for k in ("candidates", "prepare_minutes", "runs_ratio", "minutes_ratio",
                                             "same_frontier", "same_frontier_in_budget", "same_recommendation")},
                     indent=1))
    for x, y in zip(g, s, strict=True):
        print(f"grid   : {x['runs']} runs {x['minutes']} min; frontier {x['frontier']}; pick {x['recommendation']} "
              f"({x['why']}); noise {100 * x['noise']:.1f}%")
        print(f"search : {y['runs']} runs {y['minutes']} min; frontier {y['frontier']}; pick {y['recommendation']} "
              f"({y['why']}); noise {100 * y['noise']:.1f}%")
    if a.json_file:
        a.json_file.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
