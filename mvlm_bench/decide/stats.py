"""Compare two benchmark measurements metric by metric, and decide from the repetitions whether anything changed.

A latency number from one run on a phone is noise: thermal state, background work and page cache move it by a few
percent. A regression gate that compares two means fires on that noise and gets switched off; one that waits for a
human misses the 10% decode drop. So every verdict here comes from the repetitions themselves:

- the **median** of each side (robust to one throttled run) and the **speedup** = how much better the candidate is,
  oriented so that > 1 is always better (tokens/s: candidate / baseline; seconds and ms: baseline / candidate);
- a one-sided **Mann–Whitney U** test per direction (exact permutation distribution over all splits of the pooled
  values when that is at most ``EXACT_LIMIT`` splits, so ties and 3-vs-3 are handled exactly; normal approximation
  with tie correction beyond that) decides the verdict: ``slower`` / ``faster`` when p <= alpha, else ``no change``;
- a seeded **bootstrap** 95% interval of the median ratio is shown beside it, so a reader sees how wide the
  uncertainty is (it does not decide anything).

The gate (:func:`regressions`) fires on a metric only when its verdict is ``slower`` AND the median slowdown is
larger than the threshold: a significant 0.5% change is real but not worth a red build; a 20% drop seen in one
noisy pair of runs is not supported. With 3 vs 3 repetitions the smallest one-sided exact p is 1/20 = 0.05, so the
default alpha (0.05) needs at least 3 repetitions on each side; :func:`min_p` says what a given n can reach.

The idea of comparing by key and printing speedups follows llama.cpp's scripts/compare-llama-bench.py; the
statistics are this module's own.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mvlm_bench.records.columns import BY_KEY, direction, keys, metric_name

DEFAULT_ALPHA = 0.05
DEFAULT_THRESHOLD = 0.05  # 5%
EXACT_LIMIT = 60_000  # splits enumerated for the exact U distribution (C(16, 8) = 12870, C(18, 9) = 48620)
BOOTSTRAP_SAMPLES = 2000

# Compared by default, in this order: the papers' metrics that measure speed (the column table's "compare" view).
DEFAULT_METRICS = keys("compare")
# Gated by default: the headline numbers, not the ones dominated by OS noise (load time: page cache; sampling: tiny).
GATE_METRICS = keys("gate")
__all__ = ["direction", "metric_name"]  # re-exported: the column table says both


def clean_values(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def valid_values(key: str, values: Sequence[float | None]) -> tuple[list[float], int]:
    """(the usable values, how many were dropped): finite values, and for a speed metric (tokens/s, s, ms) only
    positive ones: a rate or a duration of 0 or below cannot be measured, so such a value is an edited or damaged
    entry and is left out of every comparison (the caller warns with the count)."""
    vals = clean_values(values)
    if direction(key) == 0:
        return vals, 0
    pos = [v for v in vals if v > 0]
    return pos, len(vals) - len(pos)


def dropped_note(n_baseline: int, n_candidate: int, baseline: str = "the baseline") -> str:
    """The note/warning for non-positive values left out (empty when none)."""
    sides = [f"{n} in {side}" for n, side in ((n_baseline, baseline), (n_candidate, "the candidate")) if n]
    if not sides:
        return ""
    return (f"{n_baseline + n_candidate} non-positive value(s) ignored ({' and '.join(sides)}): a speed or a duration "
            "must be above 0, so an entry was edited or damaged")


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    # halves first: the same number as (a + b) / 2, without overflowing to inf for values near the float maximum
    return s[n // 2] if n % 2 else s[n // 2 - 1] / 2.0 + s[n // 2] / 2.0


def _midranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def mann_whitney_less(x: Sequence[float], y: Sequence[float]) -> float:
    """One-sided p-value that ``y`` tends to be smaller than ``x`` (H1: P(Y < X) > 1/2), by Mann–Whitney U.

    U counts the pairs (x_i, y_j) with y_j > x_i (ties count 1/2); small U supports H1. Exact when the number of
    ways to split the pooled values is at most EXACT_LIMIT (a permutation test on U, valid with ties), else the
    normal approximation with tie-corrected variance and a continuity correction.
    """
    n, m = len(x), len(y)
    if n == 0 or m == 0:
        return 1.0
    pooled = list(x) + list(y)
    ranks = _midranks(pooled)
    offset = m * (m + 1) / 2.0
    u_obs = sum(ranks[n:]) - offset
    eps = 1e-9
    if math.comb(n + m, m) <= EXACT_LIMIT:
        hits = total = 0
        for pick in itertools.combinations(range(n + m), m):
            total += 1
            if sum(ranks[i] for i in pick) - offset <= u_obs + eps:
                hits += 1
        return hits / total
    big_n = n + m
    ties = {}
    for r in ranks:
        ties[r] = ties.get(r, 0) + 1
    tie_term = sum(t**3 - t for t in ties.values()) / (big_n * (big_n - 1))
    var = n * m / 12.0 * ((big_n + 1) - tie_term)
    if var <= 0:
        return 1.0
    z = (u_obs - n * m / 2.0 + 0.5) / math.sqrt(var)
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def min_p(n_baseline: int, n_candidate: int) -> float:
    """The smallest one-sided exact p two samples of these sizes can give (complete separation): 1 / C(n+m, m)."""
    if n_baseline == 0 or n_candidate == 0:
        return 1.0
    return 1.0 / math.comb(n_baseline + n_candidate, n_candidate)


def bootstrap_speedup_ci(baseline: Sequence[float], candidate: Sequence[float], sign: int, seed: int = 0,
                         samples: int = BOOTSTRAP_SAMPLES, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the speedup (median ratio, > 1 is better); seeded, so reproducible."""
    import numpy as np

    b = np.asarray(baseline, dtype=float)
    c = np.asarray(candidate, dtype=float)
    if len(b) < 2 or len(c) < 2 or np.any(b <= 0) or np.any(c <= 0):
        return None
    rng = np.random.default_rng(seed)
    mb = np.median(b[rng.integers(0, len(b), (samples, len(b)))], axis=1)
    mc = np.median(c[rng.integers(0, len(c), (samples, len(c)))], axis=1)
    ratio = mc / mb if sign > 0 else mb / mc
    lo, hi = np.quantile(ratio, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


@dataclass
class MetricComparison:
    """One metric of one baseline/candidate pair: what was measured, how it moved, and the verdict."""

    key: str
    name: str
    unit: str
    direction: int
    n_baseline: int
    n_candidate: int
    baseline_median: float | None
    candidate_median: float | None
    speedup: float | None  # > 1: candidate better, whatever the unit
    slowdown: float | None  # fraction the candidate is worse in the metric's own unit (tokens/s lost, time added)
    ci_low: float | None
    ci_high: float | None
    p_slower: float | None
    p_faster: float | None
    verdict: str  # "faster" | "slower" | "no change" | "n/a"
    note: str = ""
    test: str = "Mann-Whitney"  # the test behind p: "Mann-Whitney" (two sessions) or "signed-rank (paired)" (A/B)
    dropped_baseline: int = 0  # non-positive values of a speed metric left out (valid_values)
    dropped_candidate: int = 0

    @property
    def paired(self) -> bool:
        """An interleaved comparison: the speedup is the median of the per-pair speedups."""
        return self.test.startswith("signed-rank")

    @property
    def dropped_warning(self) -> str:
        return dropped_note(self.dropped_baseline, self.dropped_candidate)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_metric(key: str, baseline: Sequence[float | None], candidate: Sequence[float | None],
                   alpha: float = DEFAULT_ALPHA, seed: int = 0) -> MetricComparison:
    """Compare one metric's repetitions; see the module docstring for the rule."""
    name, unit = metric_name(key)
    sign = direction(key)
    (b, drop_b), (c, drop_c) = valid_values(key, baseline), valid_values(key, candidate)
    mc = MetricComparison(key, name, unit, sign, len(b), len(c), median(b) if b else None, median(c) if c else None,
                          None, None, None, None, None, None, "n/a", dropped_baseline=drop_b, dropped_candidate=drop_c)
    if not b or not c:
        mc.note = "no values on " + ("either side" if not b and not c else "the baseline" if not b else "the candidate")
        if drop_b or drop_c:
            mc.note = "no valid values on " + mc.note[len("no values on "):] + f"; {mc.dropped_warning}"
        return mc
    if sign == 0:
        mc.note = "not a speed"
        return mc
    mb, mcand = mc.baseline_median, mc.candidate_median
    assert mb is not None and mcand is not None
    if mb > 0 and mcand > 0:
        mc.speedup = mcand / mb if sign > 0 else mb / mcand
        mc.slowdown = (mb - mcand) / mb if sign > 0 else (mcand - mb) / mb
    gb = [sign * v for v in b]  # "goodness": larger is better on both sides
    gc = [sign * v for v in c]
    mc.p_slower = mann_whitney_less(gb, gc)
    mc.p_faster = mann_whitney_less(gc, gb)
    ci = bootstrap_speedup_ci(b, c, sign, seed=seed)
    if ci:
        mc.ci_low, mc.ci_high = ci
    if mc.p_slower <= alpha and (mc.speedup is None or mc.speedup < 1):
        mc.verdict = "slower"
    elif mc.p_faster <= alpha and (mc.speedup is None or mc.speedup > 1):
        mc.verdict = "faster"
    else:
        mc.verdict = "no change"
        if min_p(len(b), len(c)) > alpha:
            mc.note = f"{len(b)} vs {len(c)} repetitions cannot reach p <= {alpha:g}"
    if drop_b or drop_c:
        mc.note = "; ".join(x for x in (mc.note, mc.dropped_warning) if x)
    return mc


def compare_samples(baseline: Mapping[str, Sequence[float | None]], candidate: Mapping[str, Sequence[float | None]],
                    metrics: Sequence[str] | None = None, alpha: float = DEFAULT_ALPHA,
                    seed: int = 0) -> list[MetricComparison]:
    """Compare every requested metric (default: the speed metrics present on both sides, report order)."""
    if metrics is None:
        extra = sorted(k for k in baseline.keys() & candidate.keys() if k not in BY_KEY and direction(k) != 0)
        metrics = [k for k in DEFAULT_METRICS if clean_values(baseline.get(k, ())) or clean_values(candidate.get(k, ()))] + extra
    return [compare_metric(k, baseline.get(k, ()), candidate.get(k, ()), alpha=alpha, seed=seed) for k in metrics]


def parse_threshold(text: str) -> float:
    """``--fail-on-regression``: ``N%`` (0 < N < 1000) -> N/100, or a fraction written with a decimal point below 1
    (``0.05``). A bare number without ``%`` and at least 1 (``1``, ``5``, ``1.5``) is refused: it reads as a
    percentage to some and as a fraction to others (``1`` meant as 1% would be a gate at 100% that never fires)."""
    from mvlm_core.errors import MvlmError

    s = text.strip()
    pct = s.endswith("%")
    num = s[:-1].strip() if pct else s
    try:
        v = float(num)
    except ValueError:
        raise MvlmError(f"--fail-on-regression {text!r} is not a percentage: write e.g. 5%") from None
    if pct:
        if not 0 < v < 1000:  # also refuses nan and inf
            raise MvlmError(f"--fail-on-regression {text!r} is out of range: write a percentage above 0% and below "
                            "1000%, such as 5%")
        return v / 100.0
    if "." in num and 0 < v < 1 and not re.search(r"[eE]", num):
        return v
    if math.isfinite(v) and 0 < v < 1000:
        raise MvlmError(f"--fail-on-regression {text!r} is ambiguous: write {num}% (or the fraction {v / 100:g}); "
                        "a bare number must be a fraction below 1 with a decimal point, such as 0.05")
    raise MvlmError(f"--fail-on-regression {text!r} is out of range: write a percentage such as 5% "
                    "(or a fraction below 1 such as 0.05)")


def regressions(comparisons: Sequence[MetricComparison], threshold: float = DEFAULT_THRESHOLD,
                metrics: Sequence[str] | None = GATE_METRICS) -> list[MetricComparison]:
    """The gated metrics that are statistically slower AND slower by more than ``threshold`` (a fraction)."""
    out = []
    for c in comparisons:
        if metrics is not None and c.key not in metrics:
            continue
        if c.verdict == "slower" and c.slowdown is not None and c.slowdown > threshold:
            out.append(c)
    return out


def compare_number(v: float | None) -> str:
    """A compared value: whole from 1000 up, 3 decimals below 1, else 2."""
    if v is None:
        return "–"
    a = abs(v)
    return f"{v:.0f}" if a >= 1000 else f"{v:.3f}" if a < 1 else f"{v:.2f}"


def describe_regression(c: MetricComparison, threshold: float) -> str:
    """One line for the gate's message: metric, both medians, the change, the threshold and the evidence."""
    assert c.slowdown is not None
    change = -c.slowdown if c.direction > 0 else c.slowdown
    return (f"{c.name} ({c.unit}) {compare_number(c.baseline_median)} -> {compare_number(c.candidate_median)} "
            f"({change:+.1%}, {c.slowdown:.1%} slower > {threshold:.1%} allowed; "
            f"{c.test} p={c.p_slower:.3g}, {c.n_baseline} vs {c.n_candidate} runs)")


def gate_summary(comparisons: Sequence[MetricComparison], threshold: float,
                 metrics: Sequence[str] | None = GATE_METRICS) -> tuple[list[MetricComparison], list[str]]:
    """(regressions, warnings): warnings say when a gated metric could not have been judged (too few runs, no data)."""
    regs = regressions(comparisons, threshold, metrics)
    warns = []
    for c in comparisons:
        if metrics is not None and c.key not in metrics:
            continue
        if c.verdict == "n/a":
            warns.append(f"{c.name}: {c.note}")
            continue
        if c.dropped_warning:
            warns.append(f"{c.name}: {c.dropped_warning}")
        note = c.note.replace(c.dropped_warning, "").strip("; ") if c.dropped_warning else c.note
        if note and c.verdict == "no change":
            advice = "" if "--repeat" in note else " (use --repeat 3 or more on both sides)"
            warns.append(f"{c.name}: {note}; the gate cannot fire on it{advice}")
    return regs, warns
