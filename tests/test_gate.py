"""The gate's statistics against an independent implementation (scipy.stats), and the interleaving order."""

from __future__ import annotations

import math

import numpy as np
import pytest

scipy_stats = pytest.importorskip("scipy.stats", reason="scipy is a test dependency (pip install -e '.[dev]')")

from mvlm_bench.decide import gate  # noqa: E402
from mvlm_bench.decide import stats as compare  # noqa: E402
from mvlm_bench.plan.against import ORDERS, interleave  # noqa: E402


@pytest.mark.parametrize("n", [3, 4, 5, 6, 8, 10, 13])
def test_signed_rank_matches_scipy_exact(n):
    rng = np.random.default_rng(n)
    for _ in range(20):
        d = rng.normal(-0.3, 1.0, n)
        ours = gate.signed_rank_less(d)
        ref = scipy_stats.wilcoxon(d, alternative="less", method="exact").pvalue
        assert ours == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_signed_rank_with_ties_and_zeros_matches_a_permutation_test():
    # ties in |d| and zero differences: scipy's exact table does not cover them; a full sign-flip enumeration does
    d = np.array([0.02, -0.02, -0.05, -0.05, 0.0, -0.01, 0.03, -0.02, -0.07])
    nz = d[d != 0]

    def w_plus(x, axis=-1):
        ranks = scipy_stats.rankdata(np.abs(x), axis=axis)
        return np.sum(np.where(x > 0, ranks, 0), axis=axis)

    ref = scipy_stats.permutation_test((nz,), w_plus, permutation_type="samples", alternative="less",
                                       n_resamples=np.inf).pvalue
    assert gate.signed_rank_less(d) == pytest.approx(ref, rel=1e-9)


def test_signed_rank_extremes():
    assert gate.signed_rank_less([-0.1] * 5) == pytest.approx(1 / 32)
    assert gate.signed_rank_less([0.1] * 5) == 1.0
    assert gate.signed_rank_less([]) == 1.0
    assert gate.signed_rank_min_p(5) == 1 / 32


@pytest.mark.parametrize("n,m", [(3, 3), (4, 5), (5, 5), (6, 7)])
def test_mann_whitney_matches_scipy_exact(n, m):
    rng = np.random.default_rng(10 * n + m)
    for _ in range(15):
        x = rng.normal(0, 1, n)
        y = rng.normal(-0.5, 1, m)
        ref = scipy_stats.mannwhitneyu(y, x, alternative="less", method="exact").pvalue
        assert compare.mann_whitney_less(x, y) == pytest.approx(ref, rel=1e-9)


def test_mann_whitney_normal_approximation_matches_scipy_asymptotic():
    rng = np.random.default_rng(7)
    x, y = rng.normal(0, 1, 12), rng.normal(-0.4, 1, 12)  # C(24, 12) > EXACT_LIMIT: the normal approximation
    ref = scipy_stats.mannwhitneyu(y, x, alternative="less", method="asymptotic", use_continuity=True).pvalue
    assert compare.mann_whitney_less(x, y) == pytest.approx(ref, rel=1e-6)


def test_bootstrap_interval_agrees_with_scipy_bootstrap():
    rng = np.random.default_rng(3)
    b = rng.normal(40.0, 1.0, 7)
    c = rng.normal(37.0, 1.0, 7)
    ours = compare.bootstrap_speedup_ci(b, c, sign=+1, samples=20000, seed=1)

    def ratio(bb, cc, axis=-1):
        return np.median(cc, axis=axis) / np.median(bb, axis=axis)

    ref = scipy_stats.bootstrap((b, c), ratio, paired=False, vectorized=True, method="percentile",
                                n_resamples=20000, random_state=np.random.default_rng(2)).confidence_interval
    assert ours[0] == pytest.approx(ref.low, abs=0.01)
    assert ours[1] == pytest.approx(ref.high, abs=0.01)


def test_paired_bootstrap_agrees_with_scipy_bootstrap():
    rng = np.random.default_rng(5)
    r = rng.normal(0.9, 0.03, 8)
    ours = gate._bootstrap_pairs(r, samples=20000, seed=4)
    ref = scipy_stats.bootstrap((r,), np.median, method="percentile", n_resamples=20000,
                                random_state=np.random.default_rng(9)).confidence_interval
    assert ours[0] == pytest.approx(ref.low, abs=0.01)
    assert ours[1] == pytest.approx(ref.high, abs=0.01)


# --- interleaving -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_every_pair_holds_one_a_and_one_b(order, n):
    seq = interleave(n, order)
    assert len(seq) == 2 * n
    assert all(sorted(seq[2 * i: 2 * i + 2]) == ["A", "B"] for i in range(n))


def test_abba_order():
    assert "".join(interleave(4, "abba")) == "ABBAABBA"
    assert "".join(interleave(3, "alternate")) == "ABABAB"
    with pytest.raises(ValueError):
        interleave(2, "random")


def test_abba_cancels_a_linear_drift_that_alternate_does_not():
    # a device that slows down steadily (thermal), no real difference between A and B
    def session(order):
        seq = interleave(6, order)
        speed = [100.0 * (1 - 0.01 * t) for t in range(len(seq))]
        a = [s for s, who in zip(speed, seq, strict=True) if who == "A"]
        b = [s for s, who in zip(speed, seq, strict=True) if who == "B"]
        return a, b

    a, b = session("abba")
    log_ratios = [math.log(y / x) for x, y in zip(a, b, strict=True)]
    assert abs(sum(log_ratios)) < 1e-3  # drift cancels over ABBA pairs
    a2, b2 = session("alternate")
    assert all(y < x for x, y in zip(a2, b2, strict=True))  # B always second: the drift looks like a B slowdown
    assert gate.compare_paired("eval_tps", a2, b2).verdict == "slower"
    assert gate.compare_paired("eval_tps", a, b).verdict == "no change"


def test_compare_paired_detects_a_real_slowdown_and_orients_speedups():
    rng = np.random.default_rng(11)
    base = 40 * (1 + rng.normal(0, 0.02, 6))
    cand = base * 0.9 * (1 + rng.normal(0, 0.01, 6))
    c = gate.compare_paired("eval_tps", base, cand)
    assert c.verdict == "slower" and c.speedup == pytest.approx(0.9, abs=0.03)
    assert c.slowdown == pytest.approx(0.1, abs=0.03)
    t = gate.compare_paired("total_s", 1 / base, 1 / cand)  # seconds: lower is better
    assert t.verdict == "slower" and t.speedup == pytest.approx(0.9, abs=0.03)
    regs = compare.regressions([c, t], threshold=0.05, metrics=("eval_tps", "total_s"))
    assert [r.key for r in regs] == ["eval_tps", "total_s"]
    assert "signed-rank" in compare.describe_regression(c, 0.05)


# --- history mode -------------------------------------------------------------------------------------------------


def test_noise_model_matches_numpy_median_and_scipy_mad():
    sessions = [[40.1, 40.3, 39.9], [41.0, 41.4, 41.2], [38.9, 39.2, 39.0], [40.5, 40.4, 40.6], [39.7, 39.5, 39.6]]
    nm = gate.noise_model("eval_tps", sessions)
    meds = np.array([np.median(s) for s in sessions])
    center = float(np.median(meds))
    assert nm.center == pytest.approx(center)
    rel = meds / center - 1
    assert nm.sigma == pytest.approx(scipy_stats.median_abs_deviation(rel, scale="normal"), rel=1e-3)
    worst = max(0.0, float(np.max(1 - meds / center)))  # tokens/s: worse = below the centre
    assert nm.worst == pytest.approx(worst) and nm.band == pytest.approx(max(gate.NOISE_K * nm.sigma, worst))


def test_band_is_at_least_the_worst_stored_session():
    """3 sessions, one far below the others: their MAD ignores it (the band would be ~2%); the band is at least how
    far the worst session lies below the centre, so a candidate inside the baseline's own range is not 'slower'."""
    sessions = [[45.0] * 3, [45.2] * 3, [40.5] * 3]
    nm = gate.noise_model("eval_tps", sessions)
    meds = np.array([45.0, 45.2, 40.5])
    center = float(np.median(meds))
    mad_band = gate.NOISE_K * scipy_stats.median_abs_deviation(meds / center - 1, scale="normal")
    assert mad_band < 0.03  # what the band used to be
    assert nm.band == pytest.approx((center - 40.5) / center) and nm.band > 0.09 and nm.band_basis == "their worst session"
    inside = gate.judge_history("eval_tps", sessions, [42.0] * 3, threshold=0.05)  # 6.7% worse, but 40.5 was seen
    assert inside.verdict == "suspected" and "their worst session" in inside.message
    beyond = gate.judge_history("eval_tps", sessions, [40.0] * 3, threshold=0.05)  # worse than every session
    assert beyond.verdict == "slower" and beyond.slowdown == pytest.approx(1 - 40 / 45)
    # seconds: the worst session is the slowest (largest) one
    secs = gate.noise_model("total_s", [[10.0] * 3, [10.1] * 3, [11.0] * 3])
    assert secs.worst == pytest.approx((11.0 - 10.1) / 10.1)
    assert gate.judge_history("total_s", [[10.0] * 3, [10.1] * 3, [11.0] * 3], [10.8] * 3, 0.05).verdict == "suspected"
    assert gate.judge_history("total_s", [[10.0] * 3, [10.1] * 3, [11.0] * 3], [11.5] * 3, 0.05).verdict == "slower"
    # the floor never narrows the band: a quiet history with one better session keeps its MAD band
    quiet = gate.noise_model("eval_tps", [[40 * (1 + e)] * 3 for e in (-0.02, -0.01, 0.0, 0.01, 0.05)])
    assert quiet.band == pytest.approx(gate.NOISE_K * quiet.sigma) and quiet.band_basis == "3 sigma"


def test_non_positive_values_are_left_out_of_the_history_and_the_pairs():
    sessions = [[40.0, 40.1], [40.2, -1.0], [39.9, 40.0], [40.1, 0.0]]
    v = gate.judge_history("eval_tps", sessions, [30.0, -30.0, 30.1], threshold=0.05)
    assert v.dropped_sessions == 2 and v.dropped_candidate == 1 and v.candidate_median == pytest.approx(30.05)
    assert v.verdict == "slower" and "non-positive" in v.dropped_warning
    bad = gate.decide_history([{"eval_tps": s} for s in sessions], {"eval_tps": [-30.0, -31.0, -29.0]}, 0.05)
    assert not bad.failed and not bad.judged and bad.history[0].verdict == "n/a"
    assert any("3 in the candidate" in w and "not gated" in w for w in bad.warnings)
    p = gate.compare_paired("eval_tps", [40.0, 40.1, 39.9, 40.0, 40.2, 40.1], [36.0, -36.0, 35.9, 36.1, 36.0, 35.8])
    assert p.dropped_candidate == 1 and p.verdict == "slower" and p.speedup == pytest.approx(0.9, abs=0.01)
    assert "1 non-positive value(s) ignored" in p.note


def test_judge_history_verdicts():
    sessions = [[40 * (1 + e)] * 3 for e in (-0.02, -0.01, 0.0, 0.01, 0.02)]  # sigma ~1.5%, band ~4.4%
    assert gate.judge_history("eval_tps", sessions, [39.0] * 3, threshold=0.05).verdict == "no change"
    slow = gate.judge_history("eval_tps", sessions, [35.0] * 3, threshold=0.05)
    assert slow.verdict == "slower" and slow.slowdown == pytest.approx(0.125)
    noisy = [[40 * (1 + e)] * 3 for e in (-0.08, -0.04, 0.0, 0.04, 0.08)]  # band ~18%
    assert gate.judge_history("eval_tps", noisy, [37.0] * 3, threshold=0.05).verdict == "suspected"
    few = gate.judge_history("eval_tps", sessions[:2], [20.0] * 3, threshold=0.05)
    assert few.verdict == "insufficient" and "at least 3" in few.message
    faster = gate.judge_history("total_s", [[10.0] * 3] * 4, [9.0] * 3, threshold=0.05)
    assert faster.verdict == "no change" and faster.slowdown == pytest.approx(-0.1)
    assert gate.judge_history("total_s", [[10.0] * 3] * 4, [11.0] * 3, threshold=0.05).verdict == "slower"


def _sessions(offsets, n=3):
    return [{"eval_tps": [40 * (1 + e)] * n, "total_s": [10 / (1 + e)] * n} for e in offsets]


def test_decide_history_confirms_or_clears_by_the_ab_remeasure():
    sessions = _sessions((-0.02, -0.01, 0.0, 0.01, 0.02))
    cand = {"eval_tps": [34.0] * 3, "total_s": [11.8] * 3}
    rng = np.random.default_rng(1)
    base = list(40 * (1 + rng.normal(0, 0.01, 6)))
    slow_ab = [gate.compare_paired("eval_tps", base, [b * 0.85 for b in base])]
    same_ab = [gate.compare_paired("eval_tps", base, [b * (1 + d) for b, d in zip(base, rng.normal(0, 0.01, 6),
                                                                                   strict=True)])]
    alone = gate.decide_history(sessions, cand, 0.05)
    assert alone.failed and alone.mode == "history" and alone.judged
    calls = []
    confirmed = gate.decide_history(sessions, cand, 0.05, confirm=lambda: calls.append(1) or slow_ab)
    assert confirmed.failed and confirmed.mode == "history, confirmed by A/B" and calls == [1]
    cleared = gate.decide_history(sessions, cand, 0.05, confirm=lambda: same_ab)
    assert not cleared.failed and any("did not confirm" in w for w in cleared.warnings)
    # the re-measure failed (no comparisons): the history alone decides
    assert gate.decide_history(sessions, cand, 0.05, confirm=lambda: []).failed
    # nothing flagged: no re-measure at all
    quiet = gate.decide_history(sessions, {"eval_tps": [40.0] * 3}, 0.05, confirm=lambda: calls.append(2) or slow_ab)
    assert not quiet.failed and calls == [1]


def test_decide_history_with_too_few_sessions_uses_the_ab_remeasure_when_it_can():
    few = _sessions((0.0, 0.01))
    cand = {"eval_tps": [30.0] * 3}
    alone = gate.decide_history(few, cand, 0.05)
    assert not alone.failed and not alone.judged and any("at least 3" in w for w in alone.warnings)
    base = [40.0, 40.4, 39.8, 40.1, 40.3, 39.9]
    ab = gate.decide_history(few, cand, 0.05, confirm=lambda: [gate.compare_paired("eval_tps", base,
                                                                                     [b * 0.8 for b in base])])
    assert ab.failed and ab.mode.startswith("A/B re-measure") and ab.judged


# --- the baseline's sessions --------------------------------------------------------------------------------------


def _entry(eid, label, runtime="r0", tps=40.0):
    from mvlm_bench.history.entries import Entry
    from mvlm_bench.records.record import RunContext

    ctx = RunContext(device="orin", model="M", model_file="m.gguf", model_sha256="ab" * 32, runtime_commit=runtime,
                     protocol="lm", params={"n_predict": 64, "n_threads": 4})
    return Entry(ctx, {"eval_tps": [tps, tps * 1.01, tps * 0.99]}, id=eid, label=label)


def test_baseline_sessions_are_the_same_build_and_the_same_label():
    main = [_entry(i, "main", tps=40 + i / 10) for i in (1, 2, 3)]
    prs = [_entry(i, f"pr-{i}", tps=20.0) for i in (4, 5)]  # same build, other labels: never the baseline's noise
    other_build = [_entry(6, "main", runtime="r9")]
    unlabelled = [_entry(7, ""), _entry(8, "")]
    cand = _entry(9, "main", tps=30.0)  # the candidate carries the baseline's label and build: still never a session
    entries = main + prs + other_build + unlabelled + [cand]
    got = gate.baseline_sessions(entries, main[-1], candidate=cand)
    assert [e.id for e in got] == [1, 2, 3]
    assert [e.id for e in gate.baseline_sessions(entries, unlabelled[0], candidate=cand)] == [7, 8]
    # a candidate read from a JSON file (no id) is recognised by its content
    same_as_3 = _entry(None, "", tps=40.3)  # the values of entry 3
    assert [e.id for e in gate.baseline_sessions(entries[:-1], main[0], candidate=same_as_3)] == [1, 2]
    assert [e.id for e in gate.baseline_sessions(entries[:-1], main[0], limit=2)] == [2, 3]


def test_the_gate_says_when_a_side_it_judges_is_noisy():
    """A gated metric spreading wider than the noisy limit over a side's repetitions gets a warning naming the side
    and the metric; a steady pair gets none."""
    from mvlm_bench.decide.verdict import judge_pair
    from mvlm_bench.history.entries import Entry

    base = _entry(None, "")
    base.source = "base.json"
    steady = _entry(None, "", tps=39.0)
    steady.source = "cand.json"
    noisy = Entry(steady.context, {"eval_tps": [30.0, 45.0, 60.0, 1385.0, 50.0]}, source="noisy.json")
    said = judge_pair(base, steady, None, 0.05, 0.05, gate_mode="within-session").warnings
    assert not [w for w in said if "noisy" in w]
    said = judge_pair(base, noisy, None, 0.05, 0.05, gate_mode="within-session").warnings
    lines = [w for w in said if "noisy" in w]
    assert len(lines) == 1 and lines[0].startswith("the candidate (noisy.json") and "Eval CV" in lines[0]
