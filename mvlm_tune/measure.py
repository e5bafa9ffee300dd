"""One measurement round of a tune on the device: an ordinary `mvlm bench` plan (mvlm_bench), one configuration per
candidate, one repetition each, in the order the search gives. Each record goes to the history like a bench's
(``--save``), labelled with the tune session (``tune-<session>``), so `mvlm compare` and the gate read tuned
configurations like any other; and to the tune's own measurement cache, so a second tune of the same files on the same
device and build measures only what it lacks.

A candidate's files get one warm-up run before their first measured run in this tune (page cache, first-touch
costs); its later runs need none. A candidate whose run fails is left out with the failure's line, and the round goes
on with the others."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from mvlm_bench.plan.plan import Plan
from mvlm_bench.plan.spec import BenchSpec
from mvlm_bench.records.metrics import run_metrics
from mvlm_bench.session.runners import Events, Outcome, run_plan
from mvlm_tune.frontier import Point
from mvlm_tune.space import OBJECTIVES
from mvlm_tune.variants import Variants, read_json, write_json

# what each kept run says, for the report and the JSON (seconds unless named otherwise)
RUN_KEYS = ("total_s", "ttft_s", "eval_s", "ve_s", "prompt_tps", "eval_tps", "peak_rss_mb")
MEASUREMENTS_FILE = "measurements.json"


def run_figures(run) -> dict[str, float | None]:
    """The figures a tune keeps of one run: the papers' Total, time to first token (vision encoder + prompt), Eval,
    the vision encoder, the rates and peak memory."""
    m = run_metrics(run)
    ve_s = m["ve_ms"] / 1000.0 if m.get("ve_ms") is not None else None
    ttft = (m["prompt_s"] + (ve_s or 0.0)) if m.get("prompt_s") is not None else None
    return {"total_s": m["total_s"], "ttft_s": ttft, "eval_s": m["eval_s"], "ve_s": ve_s,
            "prompt_tps": m["prompt_tps"], "eval_tps": m["eval_tps"], "peak_rss_mb": m["peak_rss_mb"]}


@dataclasses.dataclass
class Setup:
    """What every candidate's runs share: the device profile, the protocol and its inputs, the objective."""

    profile: object
    protocol: str
    variants: Variants
    objective: str = "total"
    n_predict: int | None = None
    image: Path | None = None
    prompt: str | None = None
    timeout: float = 900.0

    def spec(self, point: Point, warmup: int) -> BenchSpec:
        c = point.candidate
        lm, mm = self.variants.candidate_files(c.lm, c.mmproj)
        return BenchSpec(self.protocol, lm, mmproj=mm, image=self.image if mm else None, repeat=1, warmup=warmup,
                         n_predict=self.n_predict, threads=c.threads, flash_attn=c.flash_attn, prompt=self.prompt,
                         timeout=self.timeout)

    def cache_key(self, point: Point, build: str) -> str:
        """The measurement cache's key: device, build, protocol and its inputs, the candidate's files and settings."""
        p = self.profile
        text = json.dumps([getattr(p, "name", ""), getattr(p, "target", ""), getattr(p, "cpu_variant", None), build,
                           self.protocol, self.n_predict, self.prompt, str(self.image or ""), point.candidate.key(),
                           self.variants.dir.name], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]


def _clean(figures) -> dict[str, float | None] | None:
    """A cached run's figures when each is a finite number or null (None: not a run record)."""
    if not isinstance(figures, dict):
        return None
    out: dict[str, float | None] = {}
    for k in RUN_KEYS:
        x = figures.get(k)
        if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0):
            return None
        out[k] = None if x is None else float(x)
    return out


class DeviceRounds:
    """The search's ``measure``: runs a round on the device (module docstring). ``emit``: every record, for the
    history sink; ``log``: the bench's lines; ``build``: the runtime's identity (the cache key's)."""

    def __init__(self, setup: Setup, emit: Callable, log: Callable[[str], None], build: str,
                 on_step: Callable | None = None, hold: Callable | None = None):
        self.setup, self.emit, self.log, self.build, self.on_step = setup, emit, log, build, on_step
        self.hold = hold or contextlib.nullcontext  # a stop signal waits until a finished run is kept everywhere
        self.warm: set[tuple[str, str | None]] = set()
        self.cache_path = setup.variants.dir / MEASUREMENTS_FILE
        self.warmups = 0  # warm-up runs made (the device spends them too)
        self.run_s: list[float] = []  # each run's wall time here, start to record (warm-ups included)
        self.round_extra_s: list[float] = []  # each plan's time beyond its runs: connect, push, lease

    def estimate(self) -> tuple[float, float] | None:
        """(seconds a run takes, seconds a round adds beyond its runs), from what was measured; None before a run."""
        if not self.run_s:
            return None
        return statistics.median(self.run_s), statistics.median(self.round_extra_s) if self.round_extra_s else 0.0

    def load_cached(self, points: list[Point], keep: int) -> int:
        """Samples measured by earlier tunes of the same files on the same device and build, the latest ``keep`` of
        each candidate (older ones stay in the cache, unread); returns how many."""
        known = read_json(self.cache_path)
        n = 0
        for p in points:
            runs = known.get(self.setup.cache_key(p, self.build), [])
            for figures in runs[-keep:] if isinstance(runs, list) else []:
                clean = _clean(figures)
                value = clean.get(OBJECTIVES[self.setup.objective]) if clean else None
                if value is not None and value > 0:  # a hand-edited or damaged record is measured again
                    p.samples.append(value)
                    p.runs.append(clean | {"cached": True})
                    n += 1
        return n

    def _remember(self, point: Point, figures: dict) -> None:
        known = read_json(self.cache_path)
        known.setdefault(self.setup.cache_key(point, self.build), []).append(figures)
        write_json(self.cache_path, known)

    def __call__(self, points: list[Point]) -> None:
        while points:
            points = self._round(points)

    def _round(self, points: list[Point]) -> list[Point]:
        """Run ``points`` in order as one plan; returns those after a failed one (still to run), else []."""
        specs, warm = [], set(self.warm)
        for p in points:
            files = (p.candidate.lm, p.candidate.mmproj)
            specs.append(self.setup.spec(p, 0 if files in warm else 1))
            warm.add(files)
        current = {"i": 0}
        started = {"t": time.monotonic()}
        plan_start, before = time.monotonic(), len(self.run_s)

        def step(s) -> None:
            now = time.monotonic()
            if s.index > 0:
                self.run_s.append(now - started["t"])
            started["t"] = now
            if s.label.startswith("warm-up"):
                self.warmups += 1
            current["i"] = s.config
            self.warm.add((points[s.config].candidate.lm, points[s.config].candidate.mmproj))
            if self.on_step is not None:
                self.on_step(s, points[s.config])

        def emit(run) -> None:
            point = points[current["i"]]
            figures = run_figures(run)
            value = figures[OBJECTIVES[self.setup.objective]]
            with self.hold():  # the history and the tune's cache both, or neither, when a stop signal comes
                self.emit(run)
                if value is None:
                    point.failed = f"the run gave no {OBJECTIVES[self.setup.objective]} (the protocol does not measure it)"
                    return
                point.samples.append(float(value))
                point.runs.append(figures)
                self._remember(point, figures)

        out = Outcome()
        try:
            run_plan(Plan(self.setup.profile, specs), Events(emit=emit, log=self.log, on_step=step, hold=self.hold), out)
        finally:
            if out.repetitions:
                self.run_s.append(time.monotonic() - started["t"])
                self.round_extra_s.append(max(0.0, time.monotonic() - plan_start - sum(self.run_s[before:])))
        if out.failure is None:
            return []
        bad = points[current["i"]]
        bad.failed = out.failure[1].message
        self.log(f"{bad.candidate.key()}: {bad.failed}; the tune goes on without it")
        return points[current["i"] + 1:]
