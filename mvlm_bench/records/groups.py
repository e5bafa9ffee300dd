"""Aggregation, done once: records whose contexts are equal form a :class:`Group` (one measurement; each record a
repetition), with every metric of every record (:func:`mvlm_bench.records.metrics.run_metrics`) and their median, min,
max and stdev. Every view renders groups; none aggregates again."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from mvlm_bench.records.columns import BY_KEY, METRIC_KEYS
from mvlm_bench.records.metrics import run_metrics
from mvlm_bench.records.record import Run, RunContext

STATS = ("median", "min", "max", "stdev")
# A configuration whose repetitions of a speed or time spread wider than this (sample stdev / median, the coefficient
# of variation) is flagged noisy in every view and by the gate: its median says less than it seems to. A quiet board
# measures 1-3 %; a throttling one 8 % and up (docs/ci.md).
NOISY_CV = 0.10


def stats(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """median, min, max, sample stdev (None below two values) and n, over the values that exist."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return {"median": None, "min": None, "max": None, "stdev": None, "n": 0}
    return {
        "median": statistics.median(xs),
        "min": min(xs),
        "max": max(xs),
        "stdev": statistics.stdev(xs) if len(xs) > 1 else None,
        "n": len(xs),
    }


def noisy_cv(samples: dict[str, Sequence[float | None]], keys: Iterable[str] | None = None) -> dict[str, float]:
    """The headline speeds and times (the column table's ``noisy`` view; of ``keys``, else all) whose repetitions
    spread wider than :data:`NOISY_CV`: key -> coefficient of variation (sample stdev / |median|), in table order."""
    out = {}
    wanted = set(METRIC_KEYS if keys is None else keys)
    for k in METRIC_KEYS:
        if k not in wanted or k not in samples or "noisy" not in BY_KEY[k].views:
            continue
        a = stats(samples[k])
        if a["stdev"] is not None and a["median"]:
            cv = float(a["stdev"]) / abs(float(a["median"]))
            if cv > NOISY_CV:
                out[k] = round(cv, 4)
    return out


def noisy_text(cvs: dict[str, float]) -> str:
    """``Eval CV 48%, Total CV 12%``: the flagged metrics as the tables name them."""
    return ", ".join(f"{BY_KEY[k].name} CV {100 * v:.0f}%" for k, v in cvs.items())


@dataclass
class Group:
    """Repetitions of one measurement and their aggregated metrics."""

    context: RunContext
    runs: list[Run]
    per_run: list[dict[str, Any]]
    agg: dict[str, dict[str, float | int | None]]

    def median(self, key: str) -> float | None:
        v = self.agg[key]["median"]
        return None if v is None else float(v)

    def noisy(self) -> dict[str, float]:
        """The metrics whose repetitions spread wider than :data:`NOISY_CV` (:func:`noisy_cv`)."""
        return noisy_cv({k: [p[k] for p in self.per_run] for k in METRIC_KEYS})


def _aggregated(per_run: list[dict[str, Any]]) -> dict[str, dict[str, float | int | None]]:
    """Every metric of the column table over the repetitions, then a llama-bench test's own rate (``pp512_tps``)."""
    tests = sorted({k for p in per_run for k in p if k not in BY_KEY and k.endswith("_tps")})
    return {k: stats(p.get(k) for p in per_run) for k in (*METRIC_KEYS, *tests)}


def aggregate(runs: Sequence[Run]) -> list[Group]:
    """Group runs by context (first-seen order) and aggregate every metric over the repetitions."""
    order: dict[str, list[Run]] = {}
    for r in runs:
        order.setdefault(r.context.key(), []).append(r)
    groups = []
    for rs in order.values():
        per = [run_metrics(r) for r in rs]
        agg = _aggregated(per)
        groups.append(Group(rs[0].context, rs, per, agg))
    return groups


class Groups:
    """Groups built as records arrive: :meth:`add` puts a record in its group (a new one for a new context) and
    aggregates that group again, only it; :meth:`all` is every group in first-seen order (what :func:`aggregate` of all
    records so far gives)."""

    def __init__(self) -> None:
        self._by_key: dict[str, Group] = {}

    def add(self, run: Run) -> Group:
        key = run.context.key()
        g = self._by_key.get(key)
        if g is None:
            g = self._by_key[key] = Group(run.context, [], [], {})
        g.runs.append(run)
        g.per_run.append(run_metrics(run))
        g.agg = _aggregated(g.per_run)
        return g

    def all(self) -> list[Group]:
        return list(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)

    @property
    def runs(self) -> list[Run]:
        return [r for g in self._by_key.values() for r in g.runs]
