"""The regression gate's two modes: interleaved A/B on one device, and a stored baseline judged against its own noise.

Why two modes. A phone (or this 2-core machine) drifts between sessions: clocks, page cache, neighbours,
temperature. Two quiet benches of the same build, minutes apart, differ by several percent in Eval tokens/s, and a
within-session rank test (``compare.compare_metric``) sees that drift as a real effect. So:

**Interleaved A/B** (``mvlm bench --against ...``): baseline (A) and candidate (B) are run in one session on one
device, alternating in the balanced order A B B A A B B A … (:func:`interleave`): a linear drift hits both sides
equally, and the order effect (which one runs second in a pair) cancels. Each adjacent A/B pair gives one ratio;
the verdict comes from a one-sided **Wilcoxon signed-rank** test on the log ratios (:func:`signed_rank_less`, exact
by dynamic programming over the doubled mid-ranks, so ties are handled), the speedup is the median pair ratio,
and a seeded bootstrap over pairs gives its 95% interval. This is the verdict CI should use whenever both sides can
be run.

**History mode** (``--baseline SELECTOR``): only stored measurements exist. The baseline's *sessions* (entries of
the same setup, the same build AND the same label as the baseline entry, the candidate never among them:
:func:`baseline_sessions`) give a noise model (:func:`noise_model`): the centre is the median of the session
medians, the spread is the normalised MAD of their relative deviations (a robust sigma), and the band is
``max(NOISE_K * sigma, worst)``, where ``worst`` is how far the worst stored session lies on the worse side of the
centre. The floor matters for small session counts: the MAD of 3 sessions is the smaller gap to the middle one
and ignores the extreme one, so ``NOISE_K * sigma`` alone can call a candidate that lies inside the baseline's own
range "beyond the noise"; with the floor, a candidate is only beyond the noise when it is worse than every stored
session of the baseline's build. The floor only widens the band. Non-positive values of a speed metric (an edited
or damaged entry) are left out of every comparison with a warning (:func:`mvlm_bench.compare.valid_values`).
:func:`judge_history` calls a metric

- ``insufficient`` with fewer than ``MIN_SESSIONS`` baseline sessions: it says so and never fails;
- ``slower`` when the candidate's median is worse than the centre by more than the threshold AND outside the band;
- ``suspected`` when it is worse by more than the threshold but inside the band (indistinguishable from drift);
- ``no change`` otherwise.

A ``slower`` or ``suspected`` metric is confirmed by a fresh interleaved re-measure when the baseline can be re-run
(its runtime build and model file are still at hand); then the interleaved verdict decides — as it does for
``insufficient`` metrics (too few stored sessions). Without a re-run, only ``slower`` fails.

Rates measured on this machine are in docs/ci.md (``benchmarks/gate_rates.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from mvlm_bench.decide.stats import (
    BOOTSTRAP_SAMPLES,
    DEFAULT_ALPHA,
    MetricComparison,
    clean_values,
    direction,
    dropped_note,
    median,
    metric_name,
    valid_values,
)
from mvlm_core.errors import MvlmError

MIN_SESSIONS = 3
# A/B pairs of a confirming re-measure: with 5 pairs one contrary pair already loses p <= 0.05 (2/32); with 8 the
# exact signed-rank test still reaches it with one small contrary pair (p = 2/256 .. 9/256)
CONFIRM_PAIRS = 8
NOISE_K = 3.0
MAD_TO_SIGMA = 1.4826


# --- interleaving ------------------------------------------------------------------------------------------------


# --- the paired test ---------------------------------------------------------------------------------------------


def _abs_midranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: abs(values[i]))
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and abs(values[order[j + 1]]) == abs(values[order[i]]):
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def signed_rank_less(diffs: Sequence[float]) -> float:
    """One-sided Wilcoxon signed-rank p-value for H1: the differences tend to be negative.

    Zero differences are dropped (Wilcoxon's convention, scipy's ``zero_method="wilcox"``); ties share mid-ranks.
    The null distribution of W+ (the sum of the ranks of the positive differences) is computed exactly by dynamic
    programming over the doubled ranks (integers even with ties), so it is exact for any n this gate sees.
    """
    d = [float(x) for x in diffs if x != 0 and math.isfinite(float(x))]
    n = len(d)
    if n == 0:
        return 1.0
    ranks2 = [round(2 * r) for r in _abs_midranks(d)]
    w_obs2 = sum(r for r, x in zip(ranks2, d, strict=True) if x > 0)
    total = sum(ranks2)
    counts = [0] * (total + 1)
    counts[0] = 1
    for r in ranks2:
        for s in range(total, r - 1, -1):
            counts[s] += counts[s - r]
    return sum(counts[: w_obs2 + 1]) / float(2**n)


def signed_rank_min_p(n_pairs: int) -> float:
    """The smallest one-sided p n pairs can give (every pair the same way): 1 / 2**n."""
    return 1.0 if n_pairs <= 0 else 1.0 / 2**n_pairs


def _bootstrap_pairs(ratios: Sequence[float], seed: int = 0, samples: int = BOOTSTRAP_SAMPLES,
                     level: float = 0.95) -> tuple[float, float] | None:
    import numpy as np

    r = np.asarray(ratios, dtype=float)
    if len(r) < 2:
        return None
    rng = np.random.default_rng(seed)
    med = np.median(r[rng.integers(0, len(r), (samples, len(r)))], axis=1)
    lo, hi = np.quantile(med, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def compare_paired(key: str, baseline: Sequence[float | None], candidate: Sequence[float | None],
                   alpha: float = DEFAULT_ALPHA, seed: int = 0) -> MetricComparison:
    """Compare one metric of an interleaved session: ``baseline[i]`` and ``candidate[i]`` were measured as pair i.

    speedup = median over pairs of the per-pair speedup (> 1: candidate better, whatever the unit); the verdict is
    the signed-rank test on the log speedups.
    """
    name, unit = metric_name(key)
    sign = direction(key)
    pairs = [(float(b), float(c)) for b, c in zip(baseline, candidate, strict=False)
             if b is not None and c is not None and math.isfinite(float(b)) and math.isfinite(float(c))]
    (b_all, drop_b), (c_all, drop_c) = valid_values(key, baseline), valid_values(key, candidate)
    mc = MetricComparison(key, name, unit, sign, len(b_all), len(c_all), median(b_all) if b_all else None,
                          median(c_all) if c_all else None, None, None, None, None, None, None, "n/a",
                          test="signed-rank (paired)", dropped_baseline=drop_b, dropped_candidate=drop_c)
    if not pairs:
        mc.note = "no complete A/B pairs"
        return mc
    if sign == 0:
        mc.note = "not a speed"
        return mc
    pos = [(b, c) for b, c in pairs if b > 0 and c > 0]  # a pair with a non-positive value is left out (warned)
    if not pos:
        mc.note = "no A/B pair with valid values; " + mc.dropped_warning
        return mc
    speedups = [(c / b) if sign > 0 else (b / c) for b, c in pos]
    mc.speedup = median(speedups)
    mc.slowdown = 1.0 - mc.speedup if sign > 0 else 1.0 / mc.speedup - 1.0
    logs = [math.log(s) for s in speedups]
    mc.p_slower = signed_rank_less(logs)
    mc.p_faster = signed_rank_less([-x for x in logs])
    ci = _bootstrap_pairs(speedups, seed=seed)
    if ci:
        mc.ci_low, mc.ci_high = ci
    if mc.p_slower <= alpha and mc.speedup < 1:
        mc.verdict = "slower"
    elif mc.p_faster <= alpha and mc.speedup > 1:
        mc.verdict = "faster"
    else:
        mc.verdict = "no change"
        if signed_rank_min_p(len(pos)) > alpha:
            mc.note = f"{len(pos)} A/B pairs cannot reach p <= {alpha:g} (use --repeat 5 or more)"
    if drop_b or drop_c:
        mc.note = "; ".join(x for x in (mc.note, mc.dropped_warning) if x)
    return mc


def compare_interleaved(baseline: dict[str, Sequence[float | None]], candidate: dict[str, Sequence[float | None]],
                        metrics: Sequence[str] | None = None, alpha: float = DEFAULT_ALPHA,
                        seed: int = 0) -> list[MetricComparison]:
    """Every requested metric of an interleaved session (default: the speed metrics present on both sides)."""
    from mvlm_bench.decide.stats import DEFAULT_METRICS

    if metrics is None:
        metrics = [k for k in DEFAULT_METRICS if clean_values(baseline.get(k, ())) and clean_values(candidate.get(k, ()))]
    return [compare_paired(k, baseline.get(k, ()), candidate.get(k, ()), alpha=alpha, seed=seed) for k in metrics]


# --- history mode ------------------------------------------------------------------------------------------------


@dataclass
class NoiseModel:
    """Session-to-session variation of one metric of one configuration, from its stored sessions."""

    key: str
    n_sessions: int
    center: float  # median of the session medians (the metric's own unit)
    sigma: float  # robust relative sigma of the session medians (normalised MAD), e.g. 0.03 = 3%
    band: float  # max(NOISE_K * sigma, worst): relative deviation still explained by drift
    session_medians: list[float] = field(default_factory=list)
    worst: float = 0.0  # how much worse than the centre the worst stored session is (fraction, >= 0)
    dropped: int = 0  # non-positive values left out of the sessions (valid_values)

    @property
    def band_basis(self) -> str:
        """What set the band: the MAD rule or the worst stored session."""
        return "their worst session" if self.worst > NOISE_K * self.sigma else f"{NOISE_K:g} sigma"


def _worse(sign: int, value: float, center: float) -> float:
    """How much worse than ``center`` a value is, as a fraction of it (negative: better)."""
    return (center - value) / center if sign > 0 else (value - center) / center


def noise_model(key: str, sessions: Sequence[Sequence[float | None]], k: float = NOISE_K) -> NoiseModel | None:
    """The noise model of ``key`` from the repetitions of each past session (None when no session has a value).

    band = max(k * sigma_MAD, worst): the MAD of a handful of sessions ignores the most extreme one (with 3 sessions
    it is the smaller gap to the middle one), so on its own it can call a candidate that lies inside the baseline's
    own range "beyond the noise". The floor ``worst`` (the largest deviation on the worse side of the centre among
    the stored sessions) says: a candidate is only beyond the noise when it is worse than every stored session of
    the baseline's build. It only ever widens the band (fewer false alarms); a wide band turns ``slower`` into
    ``suspected``, which ``mvlm bench`` re-measures interleaved when it can."""
    clean = [valid_values(key, s) for s in sessions]
    meds = [median(v) for v, _ in clean if v]
    if not meds:
        return None
    center = median(meds)
    if center <= 0:
        return None
    rel = [m / center - 1.0 for m in meds]
    mad = median([abs(r - median(rel)) for r in rel])
    sigma = MAD_TO_SIGMA * mad
    sign = direction(key) or 1
    worst = max(0.0, max(_worse(sign, m, center) for m in meds))
    return NoiseModel(key, len(meds), center, sigma, max(k * sigma, worst), meds, worst,
                      sum(d for _, d in clean))


@dataclass
class HistoryVerdict:
    key: str
    name: str
    unit: str
    verdict: str  # "slower" | "suspected" | "no change" | "insufficient" | "n/a"
    n_sessions: int
    center: float | None
    candidate_median: float | None
    slowdown: float | None  # fraction worse than the centre (negative: better)
    band: float | None
    sigma: float | None
    message: str = ""
    dropped_sessions: int = 0  # non-positive values left out of the baseline's sessions (valid_values)
    dropped_candidate: int = 0  # ... and of the candidate

    @property
    def dropped_warning(self) -> str:
        return dropped_note(self.dropped_sessions, self.dropped_candidate, "the baseline's sessions")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def judge_history(key: str, sessions: Sequence[Sequence[float | None]], candidate: Sequence[float | None],
                  threshold: float, min_sessions: int = MIN_SESSIONS, k: float = NOISE_K) -> HistoryVerdict:
    """Judge the candidate's repetitions of ``key`` against the baseline's past sessions (module docstring)."""
    name, unit = metric_name(key)
    sign = direction(key)
    c, drop_c = valid_values(key, candidate)
    hv = HistoryVerdict(key, name, unit, "n/a", 0, None, median(c) if c else None, None, None, None)
    nm = noise_model(key, sessions, k)
    hv.dropped_candidate = drop_c
    hv.dropped_sessions = nm.dropped if nm is not None else sum(valid_values(key, s)[1] for s in sessions)
    if nm is None or not c or sign == 0:
        hv.message = "no values" if sign != 0 else "not a speed"
        if hv.dropped_warning and sign != 0:
            hv.message = f"no valid values on {'the candidate' if not c else 'the baseline'}"
        return hv
    hv.n_sessions, hv.center, hv.band, hv.sigma = nm.n_sessions, nm.center, nm.band, nm.sigma
    cm = median(c)
    hv.slowdown = _worse(sign, cm, nm.center)
    if nm.n_sessions < min_sessions:
        hv.verdict = "insufficient"
        hv.message = (f"{nm.n_sessions} baseline session(s); the noise between sessions needs at least {min_sessions}: "
                      "not gated (store more baseline sessions, or use an interleaved A/B bench)")
        return hv
    if hv.slowdown > threshold and hv.slowdown > nm.band:
        hv.verdict = "slower"
        hv.message = (f"{hv.slowdown:.1%} worse than the baseline's {nm.n_sessions} sessions (centre {nm.center:.4g}), "
                      f"beyond their noise band ±{nm.band:.1%} ({nm.band_basis}) and the {threshold:.1%} threshold")
    elif hv.slowdown > threshold:
        hv.verdict = "suspected"
        hv.message = (f"{hv.slowdown:.1%} worse, above the {threshold:.1%} threshold but inside the baseline's noise "
                      f"band ±{nm.band:.1%} ({nm.band_basis}; {nm.n_sessions} sessions)")
    else:
        hv.verdict = "no change"
    return hv


def judge_history_all(sessions: Sequence[dict[str, Sequence[float | None]]], candidate: dict[str, Sequence[float | None]],
                      threshold: float, metrics: Sequence[str], min_sessions: int = MIN_SESSIONS,
                      k: float = NOISE_K) -> list[HistoryVerdict]:
    """:func:`judge_history` for each metric the candidate has (``sessions``: one samples dict per past session)."""
    out = []
    for key in metrics:
        if not clean_values(candidate.get(key, ())):  # the protocol has no such metric
            continue
        out.append(judge_history(key, [s.get(key, ()) for s in sessions], candidate[key], threshold, min_sessions, k))
    return out


# --- pairing baseline and candidate measurements ----------------------------------------------------------------


def pair_entries(baselines: list, candidates: list) -> list[tuple]:
    """Baseline/candidate pairs: one each is a pair; several are matched by setup (device, model, protocol, params)."""
    from mvlm_bench.history.entries import setup_key

    if len(baselines) == 1 and len(candidates) == 1:
        return [(baselines[0], candidates[0])]
    by_key = {setup_key(b): b for b in baselines}
    pairs = [(by_key[setup_key(c)], c) for c in candidates if setup_key(c) in by_key]
    if not pairs:
        from mvlm_bench.history.entries import setup_differences

        near = min(((b, c) for b in baselines for c in candidates), key=lambda bc: len(setup_differences(*bc)),
                   default=None)
        diff = "; ".join(setup_differences(*near)[:4]) if near else ""
        raise MvlmError(f"no measurement of the candidate ({len(candidates)}) has a baseline ({len(baselines)}) with the "
                        "same setup (device, model, protocol and settings)"
                        + (f"; the nearest pair differs in {diff} (baseline vs candidate)" if diff else "")
                        + ": compare measurements of the same setup")
    return pairs


# --- choosing the baseline's sessions from the history -----------------------------------------------------------

MAX_SESSIONS = 20


def build_key(entry: Any) -> tuple:
    """What makes two entries the same build: the llama.cpp commit and the patches applied."""
    c = entry.context
    return (c.runtime_commit, tuple(c.runtime_patches))


def baseline_sessions(entries: Sequence[Any], baseline: Any, exclude_ids: Sequence[int | None] = (),
                      limit: int = MAX_SESSIONS, candidate: Any = None) -> list[Any]:
    """The stored sessions of the baseline: entries of the same setup (device, model, protocol, parameters), the
    same build and the same label as ``baseline`` (an unlabelled baseline: unlabelled entries), newest ``limit`` of
    them (oldest first), the baseline itself included. The label keeps a PR's sessions of main's build (or a
    crafted regressed one) out of main's noise; the ``candidate`` (by id, or by content when it has none) is never
    one of them, nor are ``exclude_ids``."""
    from mvlm_bench.history.entries import content_key, setup_key

    key, build, label = setup_key(baseline), build_key(baseline), baseline.label
    skip = {i for i in exclude_ids if i is not None}
    cand_key = None
    if candidate is not None:
        if candidate.id is not None:
            skip.add(candidate.id)
        else:
            cand_key = content_key(candidate)
    same = [e for e in entries if e.id not in skip and e.label == label and setup_key(e) == key
            and build_key(e) == build and (cand_key is None or content_key(e) != cand_key)]
    if baseline.id is None or all(e.id != baseline.id for e in same):
        same.append(baseline)
    return same[-limit:]


# --- decisions ---------------------------------------------------------------------------------------------------


@dataclass
class GateDecision:
    """What the gate decided and why: the mode, the failing metrics (one line each), and warnings."""

    mode: str  # "interleaved" | "history" | "history, confirmed by A/B" | "within-session"
    threshold: float
    failed: bool = False
    regressions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    history: list[HistoryVerdict] = field(default_factory=list)
    interleaved: list[MetricComparison] = field(default_factory=list)

    @property
    def judged(self) -> bool:
        """False when no gated metric could be judged (too few baseline sessions, no values): the gate did nothing."""
        if self.interleaved:
            return any(c.verdict != "n/a" for c in self.interleaved)
        if self.history:
            return any(v.verdict not in ("insufficient", "n/a") for v in self.history)
        return self.mode == "within-session"

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "threshold": self.threshold, "failed": self.failed, "judged": self.judged,
                "regressions": self.regressions,
                "warnings": self.warnings, "history": [h.as_dict() for h in self.history],
                "interleaved": [c.as_dict() for c in self.interleaved]}


def decide_interleaved(comps: Sequence[MetricComparison], threshold: float,
                       metrics: Sequence[str] | None = None, mode: str = "interleaved") -> GateDecision:
    """Gate on an interleaved session: a gated metric fails when the paired test says slower AND the median pair
    slowdown exceeds the threshold."""
    from mvlm_bench.decide.stats import GATE_METRICS, describe_regression, gate_summary

    regs, warns = gate_summary(comps, threshold, tuple(metrics) if metrics else GATE_METRICS)
    return GateDecision(mode, threshold, bool(regs), [describe_regression(r, threshold) for r in regs], warns,
                        interleaved=list(comps))


def describe_history(v: HistoryVerdict) -> str:
    return f"{v.name} ({v.unit}) {v.center:.4g} -> {v.candidate_median:.4g}: {v.message}"


def decide_history(sessions: Sequence[dict[str, Sequence[float | None]]], candidate: dict[str, Sequence[float | None]],
                   threshold: float, metrics: Sequence[str] | None = None,
                   confirm: Any = None, min_sessions: int = MIN_SESSIONS) -> GateDecision:
    """Gate on a stored baseline: its ``sessions`` (one samples dict per stored session of its configuration) give
    the noise; ``confirm`` (optional) re-measures baseline and candidate interleaved and returns the paired
    comparisons. Fails on ``slower`` metrics — or, when ``confirm`` is given, only when the A/B re-measure of a
    ``slower`` or ``suspected`` metric confirms it. With too few stored sessions (``insufficient``) the A/B
    re-measure, when possible, judges instead; without one the gate says so and does not fail."""
    from mvlm_bench.decide.stats import GATE_METRICS

    gated = tuple(metrics) if metrics else GATE_METRICS
    verdicts = judge_history_all(sessions, candidate, threshold, gated, min_sessions)
    d = GateDecision("history", threshold, history=verdicts)
    invalid = [f"{v.name}: {v.dropped_warning}" + (f"; {v.message}: not gated" if v.verdict == "n/a" else "")
               for v in verdicts if v.dropped_warning]
    for v in verdicts:
        if v.verdict == "insufficient":
            d.warnings.append(f"{v.name}: {v.message}")
    flagged = [v for v in verdicts if v.verdict in ("slower", "suspected")]
    unjudged = [v for v in verdicts if v.verdict == "insufficient"]
    comps = confirm() if (flagged or unjudged) and confirm is not None else []
    if comps:
        keys = [v.key for v in flagged + unjudged]
        mode = "history, confirmed by A/B" if flagged else "A/B re-measure (too few stored sessions)"
        ab = decide_interleaved(comps, threshold, keys, mode=mode)
        ab.history = verdicts
        ab.warnings = invalid + ([] if not flagged else d.warnings) + ab.warnings
        if unjudged and not flagged:
            ab.warnings.append("too few stored baseline sessions to know the noise: judged by an interleaved "
                               "re-measure of the baseline instead")
        if flagged and not ab.failed:
            ab.warnings.append("the history suggested a slowdown in " + ", ".join(v.name for v in flagged)
                               + "; the interleaved re-measure did not confirm it")
        return ab
    d.warnings = invalid + d.warnings
    for v in verdicts:
        if v.verdict == "slower":
            d.failed = True
            d.regressions.append(describe_history(v))
        elif v.verdict == "suspected":
            d.warnings.append(describe_history(v) + "; not failing (re-run the baseline interleaved to decide)")
    return d
