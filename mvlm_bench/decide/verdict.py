"""Deciding, as library code that returns results and prints nothing: which stored measurement is the baseline
(:func:`resolve`), how a candidate compares with it (:func:`judge_pairs`, :func:`judge_interleaved`), whether the gate
fails, and the confirming re-measure of a suspected slowdown (:class:`Confirmer`: the stored baseline's build and model
re-run interleaved with the candidate on the same device, through the same plan/session pipeline as any bench).

Exit codes the caller raises: :data:`EXIT_REGRESSION` (4) when a gated metric is slower than the baseline by more than
the threshold AND the evidence supports it (:mod:`mvlm_bench.decide.stats`, :mod:`mvlm_bench.decide.gate`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mvlm_bench.decide import gate, stats
from mvlm_bench.history.database import History
from mvlm_bench.history.entries import Entry, entries_from_runs, setup_differences
from mvlm_bench.history.imports import check_report_file, entries_from_json
from mvlm_bench.records.columns import finite
from mvlm_core.errors import MvlmError
from mvlm_core.terminal import visible

EXIT_REGRESSION = 4
GATE_MODES = ("auto", "history", "within-session")
_SELECTOR = re.compile(r"(?:id:)?[0-9]+|(?:latest|label:.+?|commit:[0-9a-fA-F]+|runtime:[0-9a-zA-Z]+)(?:~[0-9]+)?",
                       re.ASCII | re.DOTALL)


def is_report_file(spec: str) -> bool:
    """A JSON/llama-bench file rather than a history selector: ``*.json``, an existing file, or a directory given
    by mistake (a one-line error later) unless it reads as a selector."""
    if spec.endswith(".json"):
        return True
    try:
        p = Path(spec)  # a FIFO, device or directory too: refused in one line later (check_report_file)
        return p.is_file() or (p.exists() and not _SELECTOR.fullmatch(spec.strip()))
    except (OSError, ValueError):  # a name too long for the OS, a NUL byte: not a file
        return False


def resolve(spec: str, db: Path | str | None, device: str | None = None, model: str | None = None,
            protocol: str | None = None, like: Entry | None = None, exclude: tuple[int, ...] = ()) -> list[Entry]:
    """Entries named by a selector (``latest``, ``label:main``, ``id:3``, ...) or a JSON file (which may hold several
    measurements). ``like``: a selector's entry is looked for among entries of that entry's setup."""
    if is_report_file(spec):
        check_report_file(Path(spec), "pass a JSON file written by `mvlm bench --json-file` or a selector")
        return entries_from_json(Path(spec))
    with History(db, create=False) as h:
        return [h.select(spec, device=device, model=model, protocol=protocol, like=like, exclude=exclude)]


def check_baseline_setup(spec: str, db: Path | str | None, expected: dict[str, object]) -> None:
    """Before measuring: the baseline (a selector or a file) names at least one measurement whose setup can be this
    bench's (``expected``: device, protocol, model_sha256 and the settings known before the run), else one line
    naming what differs (nothing measured). A file is read whole here: a damaged one is refused now too."""
    from mvlm_bench.history.entries import setup_param

    if is_report_file(spec):
        named = resolve(spec, db)
    else:
        with History(db, create=False) as h:
            named = h.named(spec)

    def differences(e: Entry) -> list[str]:
        out = []
        for k, want in expected.items():
            got = getattr(e.context, k) if k in ("device", "protocol", "model_sha256") else setup_param(e.context, k)
            if want is not None and got not in (None, "") and got != want:
                out.append(f"{k}: {str(got)[:16]} vs {str(want)[:16]}")
        return out

    if named and not any(not differences(e) for e in named):
        near = min(named, key=lambda e: (len(differences(e)), -(e.id or 0)))
        raise MvlmError(f"--baseline {visible(spec)}: no measurement it names has this bench's setup; the nearest "
                        f"({near.describe()}) differs in {', '.join(differences(near)[:4])} (stored vs this run): "
                        "bench with the baseline's settings or choose another baseline (nothing was measured)")


def check_metrics(metrics: Sequence[str] | None) -> list[str] | None:
    """``--metric`` as the tables name them (``Eval``, ``Eval_prompt``, ``Total``) or by key (``eval_tps``): the keys;
    an unknown one is refused, listing the valid ones. A llama-bench test key (``pp512_tps``) is taken as it is."""
    from mvlm_bench.records.columns import COLUMNS, resolve_metric

    if not metrics:
        return None
    out = []
    for m in metrics:
        key = resolve_metric(m)
        test = re.fullmatch(r"((?:pp\d+|tg\d+|pp\d+\+tg\d+)(?:@d\d+)?)(?:_tps|\s*\(tokens/s\))?", m.strip())
        if key is None and test:  # a llama-bench test as the comparison table names it: pp512, pp512 (tokens/s)
            key = test[1] + "_tps"
        if key is None:
            names = ", ".join(f"{c.name} ({c.key})" for c in COLUMNS if c.direction)
            raise MvlmError(f"--metric {m!r} is not a metric: use one of {names}, or a llama-bench test such as "
                            "pp512, tg128 or pp512+tg128")
        out.append(key)
    return out


@dataclasses.dataclass
class PairVerdict:
    """One baseline/candidate pair: the comparison of every metric, what differs in their setups, the gate's decision
    (None without a threshold), and warnings (non-positive values left out)."""

    baseline: Entry
    candidate: Entry
    comparisons: list[stats.MetricComparison]
    setup_differences: list[str]
    decision: gate.GateDecision | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def title(self) -> str:
        """``M on D: #3 … (t=1) -> #4 … (t=2)``: each side with the settings in which the two differ."""
        from mvlm_bench.records.columns import describe, differing

        c = self.candidate.context
        shown = differing([self.baseline.context, c], skip=("device", "model", "protocol", "runtime"))

        def side(e: Entry) -> str:
            said = describe(e.context, shown)
            return e.describe() + (f" ({said})" if said else "")

        return f"{c.label()} on {c.device}: {side(self.baseline)} -> {side(self.candidate)}"

    def as_json(self) -> dict[str, Any]:
        return {"baseline": entry_json(self.baseline), "candidate": entry_json(self.candidate),
                "setup_differences": self.setup_differences, "metrics": [c.as_dict() for c in self.comparisons],
                "regressions": self.decision.regressions if self.decision else [],
                "warnings": self.warnings, "gate": self.decision.as_dict() if self.decision else None}


@dataclasses.dataclass
class Verdict:
    """What a comparison found: its pairs, the threshold (None: compare only), alpha, and for an interleaved session
    the run order. ``regressions``: the gate's failing lines (empty: passed or not gated)."""

    pairs: list[PairVerdict]
    alpha: float
    threshold: float | None
    gated: tuple[str, ...]
    mode: str = "pairs"  # or "interleaved"
    order: list[str] = dataclasses.field(default_factory=list)

    @property
    def regressions(self) -> list[str]:
        return [line for p in self.pairs if p.decision for line in p.decision.regressions]

    @property
    def judged(self) -> bool:
        return any(p.decision.judged for p in self.pairs if p.decision)

    def error(self) -> MvlmError | None:
        """The gate's failure as the command's error (exit 4), None when it passed or did not gate."""
        if not self.regressions:
            return None
        what = "performance regression (interleaved A/B): " if self.mode == "interleaved" else "performance regression: "
        return MvlmError(what + visible("; ".join(self.regressions)), exit_code=EXIT_REGRESSION)

    def as_json(self) -> dict[str, Any]:
        if self.mode == "interleaved":
            p = self.pairs[0]
            return {"mode": "interleaved", "order": self.order, "alpha": self.alpha, "threshold": self.threshold,
                    "metrics": [c.as_dict() for c in p.comparisons], "gate": p.decision.as_dict() if p.decision else None}
        return {"alpha": self.alpha, "threshold": self.threshold, "comparisons": [p.as_json() for p in self.pairs]}


def entry_json(e: Entry) -> dict[str, Any]:
    c = e.context
    return {"id": e.id, "source": e.source, "created_at": e.created_at, "label": e.label,
            "project_commit": e.project_commit, "device": c.device, "model": c.label(), "model_sha256": c.model_sha256,
            "protocol": c.protocol, "runtime_commit": c.runtime_commit, "runtime_patches": list(c.runtime_patches),
            "params": c.params, "repetitions": e.repetitions}


def _measured(e: Entry) -> set[str]:
    """The metrics with at least one value (a key whose every repetition is null was not measured)."""
    return {k for k, vs in e.samples.items() if any(finite(v) is not None for v in vs)}


def _metric_list(e: Entry) -> str:
    keys = sorted(_measured(e))
    return visible(", ".join(keys[:8]) + (f", … ({len(keys)} in all)" if len(keys) > 8 else "")) if keys else "none"


def check_common_metrics(base: Entry, cand: Entry, gated: tuple[str, ...] | None, chosen: bool) -> None:
    """Refuse, in one line, a pair with no metric in common (an empty table) or, when gating, no gated metric in
    common (the gate could judge nothing and would pass silently)."""
    common = sorted(_measured(base) & _measured(cand))
    sides = (f"the baseline ({base.describe()}) has {_metric_list(base)}; "
             f"the candidate ({cand.describe()}) has {_metric_list(cand)}")
    if not common:
        raise MvlmError(f"the two measurements have no metric in common: {sides}; compare measurements of the same "
                        "protocol and tests")
    if gated is not None and not set(gated) & set(common):
        what = "--metric" if chosen else f"gated metric ({', '.join(gated)})"
        raise MvlmError(f"--fail-on-regression: no {what} is in both measurements: {sides}; gate on one they share "
                        f"with --metric {visible(common[0])}")


def check_chosen_metrics(base: Entry, cand: Entry, metrics: list[str] | None) -> None:
    """A --metric that neither measurement has a value of is refused (its row would read n/a and say nothing)."""
    if not metrics:
        return
    common = _measured(base) & _measured(cand)
    missing = [m for m in metrics if m not in common]
    if missing:
        raise MvlmError(f"--metric {', '.join(missing)}: not measured in both (the baseline ({base.describe()}) has "
                        f"{_metric_list(base)}; the candidate has {_metric_list(cand)}); choose one they share")


def history_sessions(db: Path | str | None, base: Entry, cand: Entry) -> list[Entry]:
    """The stored sessions of the baseline (same setup, build and label; gate.baseline_sessions), never the candidate."""
    with History(db, create=False) as h:
        entries = h.entries(base.context.device)
    return gate.baseline_sessions(entries, base, candidate=cand)


def judge_pair(base: Entry, cand: Entry, metrics: list[str] | None, alpha: float, threshold: float | None, *,
               db: Path | str | None = None, gate_mode: str = "auto", confirm=None) -> PairVerdict:
    """Compare one pair (every metric: medians, speedup, 95% CI, Mann-Whitney p), and gate it when a threshold is set:
    a baseline stored in the history by its own session-to-session noise (``history``, confirmed by ``confirm(base,
    cand)``'s interleaved re-measure when given), a baseline from a file within-session (said in a warning)."""
    gated = tuple(metrics) if metrics else stats.GATE_METRICS
    if base.id is not None and base.id == cand.id:
        raise MvlmError(f"baseline and candidate are the same entry ({base.describe()}): pick two different ones")
    check_common_metrics(base, cand, gated if threshold is not None else None, bool(metrics))
    check_chosen_metrics(base, cand, metrics)
    comps = stats.compare_samples(base.samples, cand.samples, metrics=metrics or None, alpha=alpha)
    invalid = {c.key: f"{c.name}: {c.dropped_warning}" for c in comps if c.dropped_warning}
    pv = PairVerdict(base, cand, comps, setup_differences(base, cand))
    if threshold is None:
        pv.warnings = list(invalid.values())
        return pv
    use_history = gate_mode == "history" or (gate_mode == "auto" and base.id is not None)
    if use_history and base.id is None:
        raise MvlmError("--gate history needs a baseline stored in the history (a selector, not a JSON file)")
    if use_history:
        sessions = history_sessions(db, base, cand)
        decision = gate.decide_history([e.samples for e in sessions], cand.samples, threshold, gated,
                                       confirm=confirm(base, cand) if confirm else None)
    else:
        regs, warns = stats.gate_summary(comps, threshold, gated)
        decision = gate.GateDecision("within-session", threshold, bool(regs),
                                     [stats.describe_regression(r, threshold) for r in regs], warns)
        if gate_mode == "auto":
            decision.warnings.append(
                "the baseline is a file, so its session-to-session noise is unknown: gating within one pair of "
                "sessions, which can cry wolf; prefer a history baseline or an interleaved bench (--against)")
    # non-positive values left out: said once per metric (the gate's own warnings already name its metrics)
    said = {v.key for v in decision.history if v.dropped_warning} if decision.history else set(gated)
    decision.warnings = [w for k, w in invalid.items() if k not in said] + decision.warnings + \
        noisy_warnings(base, cand, gated)
    pv.decision = decision
    pv.warnings = decision.warnings
    return pv


def noisy_warnings(base: Entry, cand: Entry, gated: Sequence[str]) -> list[str]:
    """One line per side whose gated metrics spread wider than the noisy limit over its repetitions: the gate judged
    it, but its median says less than it seems to."""
    from mvlm_bench.records.groups import NOISY_CV, noisy_cv, noisy_text

    out = []
    for side, e in (("baseline", base), ("candidate", cand)):
        cvs = noisy_cv(e.samples, gated)
        if cvs:
            out.append(f"the {side} ({e.describe()}) is noisy: {noisy_text(cvs)} over its {e.repetitions} "
                       f"repetitions (> {100 * NOISY_CV:.0f}%): this verdict is less certain than it looks; re-measure "
                       "on a quieter device or with more repetitions")
    return out


def judge_pairs(pairs: list[tuple[Entry, Entry]], metrics: list[str] | None, alpha: float, threshold: float | None, *,
                db: Path | str | None = None, gate_mode: str = "auto", confirm=None) -> Verdict:
    """:func:`judge_pair` for each pair. With ``metrics`` and several pairs (a report of several llama-bench tests,
    each its own record), a pair is judged on the chosen metrics both its sides measured, and pairs with none of them
    are left out (all left out: the first pair's refusal says what each side has)."""
    if gate_mode not in GATE_MODES:
        raise MvlmError(f"--gate {gate_mode!r}: choose one of {', '.join(GATE_MODES)}")
    chosen = {id(b): metrics for b, _ in pairs}
    if metrics and len(pairs) > 1:  # several tests (llama-bench's): each pair is judged on the chosen metrics it has
        shared = {id(b): [m for m in metrics if m in _measured(b) & _measured(c)] for b, c in pairs}
        if any(shared.values()):
            pairs = [(b, c) for b, c in pairs if shared[id(b)]]
            chosen = shared
    out = [judge_pair(b, c, chosen[id(b)], alpha, threshold, db=db, gate_mode=gate_mode, confirm=confirm)
           for b, c in pairs]
    return Verdict(out, alpha, threshold, tuple(metrics) if metrics else stats.GATE_METRICS)


def judge_interleaved(baseline_runs: Sequence, candidate_runs: Sequence, order: list[str], metrics: list[str] | None,
                      alpha: float, threshold: float | None) -> Verdict:
    """The paired comparison of an interleaved A/B session (pair i = run i of each side) and its gate."""
    base = entries_from_runs(baseline_runs, project=("", None))
    cand = entries_from_runs(candidate_runs, project=("", None))
    if not base or not cand:
        raise MvlmError("the A/B session completed no pair of runs: nothing to compare")
    comps = gate.compare_interleaved(base[0].samples, cand[0].samples, metrics or None, alpha=alpha)
    decision = gate.decide_interleaved(comps, threshold, metrics) if threshold is not None else None
    if decision is not None:
        decision.warnings += noisy_warnings(base[0], cand[0], tuple(metrics) if metrics else stats.GATE_METRICS)
    pv = PairVerdict(base[0], cand[0], comps, setup_differences(base[0], cand[0]), decision,
                     decision.warnings if decision else [])
    return Verdict([pv], alpha, threshold, tuple(metrics) if metrics else stats.GATE_METRICS, "interleaved", order)


def interleaved_title(v: Verdict) -> str:
    p = v.pairs[0]
    return (f"interleaved A/B on {p.candidate.context.device}: {p.baseline.describe()} -> {p.candidate.describe()}, "
            f"{len(v.order) // 2} pairs, order {''.join(v.order)}")


class Confirmer:
    """For history mode: ``factory(base_entry, cand_entry)`` -> a callable that re-measures the stored baseline and the
    candidate interleaved on this device, or None when the baseline cannot be re-run here (its build is not in the
    cache, or its model file is not at hand with the same sha256). The re-measure holds the device's lease the way the
    measurement did (``lease_db``, ``lease_timeout``), so a lab's other runners wait for it too. ``log`` hears what it
    does."""

    def __init__(self, profile, spec, log: Callable[[str], None], lease_db: str | None = None,
                 lease_timeout: float | None = None):
        self.profile, self.spec, self.log = profile, spec, log
        self.lease_db, self.lease_timeout = lease_db, lease_timeout

    def __call__(self, base: Entry, cand: Entry):
        from mvlm_bench.device.sync import sha256_file
        from mvlm_core import runtime as rtmod

        def local_copy(current: Path | None, name: str, sha: str) -> Path | None:
            if not sha:
                return None
            for p in ([current] if current else []) + ([current.parent / name] if current and name else []):
                if p is not None and p.is_file() and sha256_file(p) == sha:
                    return p
            return None

        c = base.context
        rt = rtmod.find_build(str(c.params.get("target") or self.profile.target), c.runtime_commit,
                              list(c.runtime_patches), c.params.get("cpu_variant"))
        model = local_copy(self.spec.model, c.model_file, c.model_sha256)
        mmproj = local_copy(self.spec.mmproj, c.mmproj_file, c.mmproj_sha256) if c.mmproj_sha256 else None
        missing = [what for what, ok in (("its llama.cpp build", rt), ("its model file", model)) if ok is None]
        if c.mmproj_sha256 and mmproj is None:
            missing.append("its mmproj file")
        if missing:
            self.log(f"the baseline ({base.describe()}) cannot be re-run here ({' and '.join(missing)} not found): "
                     "the gate judges by the history alone")
            return None
        return lambda: self._remeasure(base, rt, model, mmproj if c.mmproj_sha256 else self.spec.mmproj)

    def _remeasure(self, base: Entry, rt, model: Path, mmproj: Path | None) -> list:
        from mvlm_bench.plan.plan import Plan
        from mvlm_bench.plan.spec import Side
        from mvlm_bench.session.runners import Events, run_plan

        pairs = max(self.spec.repeat, gate.CONFIRM_PAIRS)
        self.log(f"re-measuring the baseline ({base.describe()}) and this build interleaved, {pairs} A/B pairs, "
                 "to confirm")
        cand_spec = dataclasses.replace(self.spec, repeat=pairs)
        sides = (Side(dataclasses.replace(self.spec, model=model, mmproj=mmproj, repeat=pairs), runtime=rt,
                      name="baseline"), Side(cand_spec, name="candidate"))
        said: list[str] = []

        def on_wait(message: str) -> None:  # once: the lease is polled every second
            if not said:
                self.log(message)
            said.append(message)

        plan = Plan(self.profile, [cand_spec], sides=sides, lease_db=self.lease_db)
        if self.lease_timeout is not None:
            plan.lease_timeout = self.lease_timeout
        runs: dict[str, list] = {"baseline": [], "candidate": []}
        out = run_plan(plan, Events(emit=lambda r: runs[r.context.params["ab_side"]].append(r), log=self.log,
                                    on_wait=on_wait))
        if out.failure is not None:
            who, f = out.failure
            self.log(f"the confirming A/B run failed ({who}: {f.message}); judging by the history alone")
            return []
        n = min(len(runs["baseline"]), len(runs["candidate"]))
        b, k = entries_from_runs(runs["baseline"][:n]), entries_from_runs(runs["candidate"][:n])
        return gate.compare_interleaved(b[0].samples, k[0].samples) if b and k else []
