"""Runners: a :class:`~mvlm_bench.plan.plan.Plan` driven through one :class:`~mvlm_bench.session.session.Session`,
each measured repetition handed to ``events.emit`` the moment it ends (after the lease check that says it was measured
alone), so the sinks have it before the next run starts.

- configurations (one, or a sweep's cross product; also llama-bench, a process per repetition): each configuration
  under its own lease, its own warm-up, then its repetitions;
- an interleaved A/B session: both sides prepared under one lease (different builds go to different directories on
  the device), warm-ups first, then the pairs in the plan's order;
- the dataset protocol: one llama-server for the set, a pass over the set per repetition.

A failed run ends the plan (``Outcome.failure``; everything before it was emitted); a cooling timeout (``--max-temp``)
after some repetitions ends it with ``Outcome.stopped``; a stop signal propagates (every ``finally`` runs: the
device's process is killed, the lease released, the transport closed) and the caller's ``Outcome`` says how far it got.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from collections.abc import Callable
from pathlib import Path

from mvlm_bench.plan.plan import Plan
from mvlm_bench.plan.spec import BenchSpec, Side
from mvlm_bench.plan.sweep import describe, varying
from mvlm_bench.records.record import Run
from mvlm_bench.session.failures import Failure
from mvlm_bench.session.pacing import CoolingTimeout, Pacer
from mvlm_bench.session.session import Prepared, Session


def _ignore(*_: object) -> None:
    return None


@dataclasses.dataclass
class Step:
    """The run about to start, for a progress line: ``index`` of ``total`` runs (warm-ups included), its ``label``
    (``warm-up 1/1``, ``run 2/3``, ``sample 4/50``), the configuration (``config`` of ``configs``) and A/B side."""

    index: int
    total: int
    label: str
    spec: BenchSpec
    config: int = 0
    configs: int = 1
    side: str = ""


@dataclasses.dataclass
class Events:
    """What a runner tells its caller while it runs: ``emit`` (a record), ``log`` (a line), ``on_step`` (the next run),
    ``on_tokens`` (a run's live token count), ``on_status`` (a wait: cooling, --delay), ``on_wait`` (the lease is
    another bench's), ``sync_progress`` (the push's bytes), ``outputs`` (report paths a pushed file may not be)."""

    emit: Callable[[Run], None] = _ignore
    log: Callable[[str], None] = _ignore
    on_step: Callable[[Step], None] | None = None
    on_tokens: Callable[[int, int], None] | None = None
    on_status: Callable[[str], None] = _ignore
    on_wait: Callable[[str], None] | None = None
    sync_progress: Callable[[int, int], None] | None = None
    outputs: dict[str, Path] | None = None
    # a block a stop signal may not cut (StopSignals.held): a repetition's records and its count go out together
    hold: Callable[[], contextlib.AbstractContextManager] | None = None


@dataclasses.dataclass
class Outcome:
    """How far a plan got: measured repetitions completed (each emitted), records emitted (llama-bench: one per test),
    the failed run (who: "", "baseline" or "candidate"), why it stopped early (a cooling timeout), the A/B order of the
    measured runs, and the resource notes said once."""

    planned: int = 0
    repetitions: int = 0
    records: int = 0
    failure: tuple[str, Failure] | None = None
    stopped: str = ""
    order: list[str] = dataclasses.field(default_factory=list)
    pushed_bytes: int = 0
    commands: list[list[str]] = dataclasses.field(default_factory=list)  # each prepared side's command line


def run_label(i: int, warmup: int, repeat: int) -> str:
    """What run ``i`` of a configuration is, in words: ``warm-up 1/1`` or ``run 2/3`` (measured runs counted apart)."""
    return f"warm-up {i + 1}/{warmup}" if i < warmup else f"run {i - warmup + 1}/{repeat}"


class _Run:
    """One plan's run: its session, events, outcome and pacing."""

    def __init__(self, plan: Plan, session: Session, ev: Events, out: Outcome):
        self.plan, self.session, self.ev, self.out = plan, session, ev, out
        self.pacer = Pacer(plan.delay, plan.max_temp, plan.max_temp_wait, on_status=ev.on_status, log=ev.log) \
            if plan.delay or plan.max_temp is not None else None
        self.said: set[str] = set()
        self.done = 0  # runs started so far (warm-ups included): the progress line's position

    def note(self, message: str) -> None:  # a device's notes (no thermal zone, no peak RSS) once per plan
        if message not in self.said:
            self.said.add(message)
            self.ev.log(message)

    def pace(self, step: Step) -> None:
        if self.pacer is not None:
            self.pacer(self.session.transport)
        if self.ev.on_step:
            self.ev.on_step(step)
        self.done += 1

    def emit(self, runs: list[Run]) -> None:
        """A repetition's records to the caller, and counted, as one: a stop signal that arrives meanwhile is raised
        after both (the "interrupted after N repetitions" line then counts what the outputs hold)."""
        with self.ev.hold() if self.ev.hold is not None else contextlib.nullcontext():
            for r in runs:
                self.ev.emit(r)
            self.out.records += len(runs)
            self.out.repetitions += 1

    def prepare(self, side: Side) -> Prepared:
        prep = self.session.prepare(side, self.ev.sync_progress, self.ev.outputs)
        self.out.pushed_bytes += prep.pushed_bytes
        self.out.commands.append(prep.argv)
        return prep


def run_plan(plan: Plan, ev: Events, out: Outcome | None = None) -> Outcome:
    """Run the plan on its device (module docstring). ``out``: the caller's Outcome, filled as the plan runs (so it says
    how far it got when a stop signal interrupts it)."""
    out = out if out is not None else Outcome()
    out.planned = plan.repetitions
    with Session(plan.profile, ev.log, plan.lease_db, plan.lease_timeout, ev.on_wait) as session:
        r = _Run(plan, session, ev, out)
        {"ab": _run_ab, "dataset": _run_dataset}.get(plan.kind, _run_configs)(r)
    return out


def _run_configs(r: _Run) -> None:
    """Configuration after configuration, each under its own lease (another bench may run between two, never inside
    one), with its own warm-up."""
    specs, names = r.plan.configs, varying(r.plan.configs)
    for k, spec in enumerate(specs):
        if len(specs) > 1:
            r.ev.log(f"configuration {k + 1}/{len(specs)}: {describe(spec, names)}")
        try:
            if not _run_config(r, spec, k):
                return
        except CoolingTimeout as e:
            if not r.out.repetitions:
                raise
            r.out.stopped = f"{e} (after {r.out.repetitions} of {r.out.planned} repetitions)"
            return


def _run_config(r: _Run, spec: BenchSpec, k: int) -> bool:
    """One configuration's warm-up and repetitions; False when a run failed (the plan stops)."""
    runs: list[Run] = []
    with r.session.leased() as still_leased:
        prep = r.prepare(Side(spec))
        total = spec.warmup + spec.repeat
        for i in range(total):
            measured = i >= spec.warmup
            r.pace(Step(r.done, r.plan.runs, run_label(i, spec.warmup, spec.repeat), spec, k, len(r.plan.configs)))
            t0 = time.monotonic()
            if spec.protocol == "llama-bench":
                res: list[Run] | Run | Failure | None = r.session.run_llama_bench(prep, i - spec.warmup, measured)
            else:
                res = r.session.run(prep, i - spec.warmup, measured, r.ev.on_tokens)
            if isinstance(res, Failure):
                r.out.failure = ("", res)
                return False
            still_leased()  # a run measured while another bench could have shared the device is not kept
            if measured:
                batch = res if isinstance(res, list) else [res] if res is not None else []
                r.emit(batch)
                runs += batch
            r.ev.log(f"{run_label(i, spec.warmup, spec.repeat)} done in {time.monotonic() - t0:.1f} s")
    if spec.protocol != "llama-bench":  # llama-bench reads neither
        for n in r.session.resource_notes(runs, [prep]):
            r.note(n)
    return True


def _ab_sides(r: _Run) -> tuple[Side, Side]:
    """The two sides; when their builds differ, the baseline's files go to a directory of their own on the device, so
    both builds are there at once (a baseline that names the pinned build is not pushed twice)."""
    base, cand = r.plan.sides  # type: ignore[misc]
    if base.subdir:
        return base, cand

    def build(side: Side):
        if side.runtime is None and side.llama_cpp is None:
            try:
                return r.session.runtime(side).root.resolve()
            except Exception:  # noqa: BLE001 - prepare says what is missing
                return None
        return side.runtime.root.resolve() if side.runtime is not None else side.llama_cpp

    if base.llama_cpp != cand.llama_cpp or build(base) != build(cand):
        tag = (base.runtime.manifest.get("key") or str(base.runtime.root)) if base.runtime else \
            str(base.llama_cpp or "pinned")
        base = dataclasses.replace(base, subdir=f"ab/{hashlib.sha256(str(tag).encode()).hexdigest()[:12]}")
    return base, cand


def _run_ab(r: _Run) -> None:
    """An interleaved A/B session under one lease: warm-ups of both sides, then the pairs in the plan's order."""
    base, cand = _ab_sides(r)
    seq = r.plan.ab_order()
    warm = max(base.spec.warmup, cand.spec.warmup)
    pairs = r.plan.configs[0].repeat
    runs: list[Run] = []
    with r.session.leased() as still_leased:
        preps = {"A": r.prepare(base), "B": r.prepare(cand)}
        index = {"A": 0, "B": 0}
        for i, who in enumerate(seq):
            measured = i >= 2 * warm
            name = "baseline" if who == "A" else "candidate"
            spec = preps[who].spec
            r.pace(Step(r.done, r.plan.runs, run_label(i, 2 * warm, 2 * pairs) + f" {name}", spec, side=who))
            t0 = time.monotonic()
            res = r.session.run(preps[who], index[who] - warm, measured, r.ev.on_tokens)
            if isinstance(res, Failure):
                r.out.failure = (name, res)
                return
            still_leased()
            if measured and res is not None:
                r.emit([res])
                runs.append(res)
                r.out.order.append(who)
            index[who] += 1
            r.ev.log(f"{run_label(i, 2 * warm, 2 * pairs)} {name} done in {time.monotonic() - t0:.1f} s")
    for n in r.session.resource_notes(runs, list(preps.values())):
        r.note(n)


def _run_dataset(r: _Run) -> None:
    """One llama-server for the whole set, loaded once (not measured); ``--warmup`` requests, then the passes."""
    from mvlm_bench.plan.dataset import load_samples
    from mvlm_bench.session.dataset_run import run_pass, server_for, warm_up

    spec = r.plan.configs[0]
    n = len(load_samples(spec.data))
    total = n * spec.repeat
    with r.session.leased() as still_leased:
        prep = r.prepare(Side(spec))
        server = server_for(r.session, prep, r.ev.log)
        try:
            r.ev.log(f"llama-server ready in {server.ready_s:.1f} s (model loading; not measured); {n} samples x "
                     f"{spec.repeat} pass(es)")
            failed = warm_up(server, prep)
            if failed is not None:
                r.out.failure = ("", failed)
                return
            for rep in range(spec.repeat):
                def on_sample(i: int, _n: int, rep: int = rep) -> None:
                    if r.ev.on_step:
                        r.ev.on_step(Step(rep * n + i, total, f"sample {i + 1}/{n}", spec))

                res = run_pass(server, prep, rep, r.ev.log, on_sample)
                if isinstance(res, Failure):
                    r.out.failure = ("", res)
                    return
                still_leased()  # a pass measured while another bench could have shared the device is not kept
                r.emit([res])
        finally:
            server.close()


@dataclasses.dataclass
class Collected:
    """A plan's records gathered in memory (the Python API, tests): the runs in the order they ended and the outcome.
    ``failures``: the failed run (empty when none); ``side(name)``: an A/B session's runs of one side."""

    runs: list[Run]
    outcome: Outcome

    @property
    def failures(self) -> list[Failure]:
        return [self.outcome.failure[1]] if self.outcome.failure else []

    def side(self, name: str) -> list[Run]:
        return [r for r in self.runs if r.context.params.get("ab_side") == name]


def collect(plan: Plan, **events) -> Collected:
    """Run a plan and gather its records (``events``: the other :class:`Events` hooks: log, on_step, ...)."""
    runs: list[Run] = []
    out = run_plan(plan, Events(emit=runs.append, **events))
    return Collected(runs, out)
