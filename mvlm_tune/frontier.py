"""The answer of a tune: which candidates are on the latency/fidelity frontier, which one is recommended under the
budget, and whether its lead over the next one is more than the noise.

A candidate is *dominated* when another one is at least as faithful in every figure (KL divergence, top-1, image
cosine) and faster; *dominated beyond noise* when it is faster by more than the measured noise (the search drops
those). The recommendation is the fastest candidate within the budget; when the next one within the budget is not
slower by more than the noise (Mann-Whitney, one-sided, p <= 0.05, and a median gap larger than the noise), the two
are a tie, and the tie goes to the more faithful one, said as such: a pick by noise is never presented as a win."""

from __future__ import annotations

import dataclasses
import math
import statistics

from mvlm_bench.decide.stats import mann_whitney_less, min_p
from mvlm_tune.space import Candidate, at_least_as_faithful

ALPHA = 0.05
NOISE_FLOOR = 0.02  # a gap below 2% is never called a difference: this machine drifts +-7% between runs, a phone more
PRIOR_NOISE = 0.05  # the noise assumed before any candidate has been measured twice


@dataclasses.dataclass
class Point:
    """A candidate and what is known of it: its fidelity figures, its latency samples (seconds of the objective, one
    per measured run), every metric of each run (for the report), and why it was left out (a failed run)."""

    candidate: Candidate
    fidelity: dict[str, float | None]
    samples: list[float] = dataclasses.field(default_factory=list)
    runs: list[dict] = dataclasses.field(default_factory=list)
    failed: str = ""
    in_budget: bool = True

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


def spread(samples: list[float]) -> float | None:
    """One candidate's relative spread, robust to one disturbed run: about two standard deviations (2 x 1.4826 x the
    median absolute deviation, over the median) from three runs on; |a - b| / mean from two; None from fewer."""
    if len(samples) < 2:
        return None
    med = statistics.median(samples)
    if med <= 0:
        return None
    if len(samples) == 2:
        return abs(samples[0] - samples[1]) / med
    return 2 * 1.4826 * statistics.median(abs(x - med) for x in samples) / med


def noise(points: list[Point], floor: float = NOISE_FLOOR) -> float:
    """The relative noise of a measurement: the median of the candidates' spreads (:func:`spread`, candidates measured
    at least twice); the prior until there is one; never under ``floor``."""
    spreads = [s for p in points if (s := spread(p.samples)) is not None]
    return max(floor, statistics.median(spreads) if spreads else PRIOR_NOISE)


def dominates(a: Point, b: Point, margin: float = 0.0) -> bool:
    """``a`` makes ``b`` pointless: at least as faithful, and faster by more than ``margin`` (relative)."""
    if a is b or a.median is None or b.median is None or a.failed:
        return False
    if not at_least_as_faithful(a.fidelity, b.fidelity):
        return False
    if a.fidelity == b.fidelity and margin == 0.0:
        return a.median < b.median
    if margin and min(len(a.samples), len(b.samples)) < 2:
        margin *= 2  # one run against another: twice the noise before calling it (a device's first runs vary most)
    return a.median * (1.0 + margin) < b.median


def frontier(points: list[Point], margin: float = 0.0) -> list[Point]:
    """The measured candidates no other one dominates (by more than ``margin``), fastest first."""
    live = [p for p in points if p.median is not None and not p.failed]
    keep = [p for p in live if not any(dominates(q, p, margin) for q in live)]
    return sorted(keep, key=lambda p: p.median)  # type: ignore[arg-type, return-value]


def _faithfulness(p: Point) -> tuple:
    """Sort key, most faithful first: lower KL, higher top-1, higher image cosine (missing figures last)."""
    f = p.fidelity

    def v(key: str, sign: int) -> float:
        x = f.get(key)
        return math.inf if x is None else sign * x

    return v("kl", 1), v("top1", -1), v("image_cos", -1)


@dataclasses.dataclass
class Recommendation:
    """The pick (None: nothing within the budget was measured), the runner-up within the budget, the margin between
    their medians (relative), the one-sided p that the pick is faster, whether that margin exceeds the noise, and the
    candidates tied with the fastest (within noise), of which the pick is the most faithful."""

    pick: Point | None
    runner_up: Point | None = None
    margin: float | None = None
    p_value: float | None = None
    beyond_noise: bool | None = None
    noise: float = PRIOR_NOISE
    tied: list[Point] = dataclasses.field(default_factory=list)
    why: str = ""  # fastest (beyond the noise) | tie (within noise: the most faithful of the tied) | only | none


def significantly_faster(a: Point, b: Point, noise_level: float) -> tuple[bool, float, float]:
    """(a is faster than b beyond the noise, the relative median gap, the one-sided Mann-Whitney p). With too few runs
    for the test ever to reach p <= 0.05 (fewer than 3 each), the median gap against the noise decides alone."""
    assert a.median is not None and b.median is not None
    gap = (b.median - a.median) / a.median if a.median > 0 else math.inf
    p = mann_whitney_less(b.samples, a.samples)
    testable = min_p(len(b.samples), len(a.samples)) <= ALPHA
    return (p <= ALPHA or not testable) and gap > noise_level, gap, p


def recommend(points: list[Point], noise_level: float, dropped: dict[str, str] | None = None) -> Recommendation:
    """The fastest measured candidate within the budget, with its margin; ties within noise go to fidelity. Only
    candidates no other one beats beyond the noise take part, and none the search dropped (``dropped``: key -> why):
    a dropped one has too few runs to tie with anything."""
    live = [p for p in points if p.median is not None and not p.failed]
    ok = [p for p in frontier(live, noise_level) if p.in_budget and p.candidate.key() not in (dropped or {})]
    if not ok:
        return Recommendation(None, noise=noise_level, why="none")
    fastest = ok[0]
    tied = [fastest] + [p for p in ok[1:] if not significantly_faster(fastest, p, noise_level)[0]]
    pick = min(tied, key=_faithfulness) if len(tied) > 1 else fastest
    others = [p for p in ok if p is not pick]
    if not others:
        return Recommendation(pick, noise=noise_level, tied=tied, why="only")
    runner = others[0]
    first, second = (pick, runner) if (pick.median or 0) <= (runner.median or 0) else (runner, pick)
    beyond, gap, p = significantly_faster(first, second, noise_level)
    why = "tie" if len(tied) > 1 else "fastest"
    return Recommendation(pick, runner, gap, p, beyond, noise_level, tied, why)
