"""How `mvlm tune` spends the device's time: successive halving over measurement rounds, not the full grid.

Round 1 measures every candidate once, in a shuffled order. After each round, the candidates that another candidate,
at least as faithful, beats by more than the measured noise are dropped (mvlm_tune.frontier), and so are those
outside the fidelity budget (measured once, they stay on the plot); the survivors are measured once more, again in a
shuffled order, so the device's drift (heat, background work) falls on all of them alike. Who survives is decided
afresh from all the runs each time: a candidate dropped on one unlucky run comes back when later runs show it was
not beaten. The search ends when every survivor has ``repeat`` runs, or when the next round would not fit in
``time_limit`` (then the round is cut to what fits, survivors with the fewest runs first; with a limit, the very
first run is measured alone, to know what a run costs).

:func:`search` is pure logic over a ``measure(points)`` callable (mvlm_tune.measure runs a round on the device), so
the same code is tested with a scripted measure and used on a phone."""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable

from mvlm_tune.frontier import Point, dominates, frontier, noise


@dataclasses.dataclass
class Progress:
    """What a search tells its caller after each round: the round, the candidates still in the running, the runs
    made, the seconds spent, the current frontier and the noise."""

    round: int
    left: list[Point]
    runs: int
    seconds: float
    front: list[Point]
    noise: float


@dataclasses.dataclass
class SearchOutcome:
    runs: int = 0  # measured runs made by this search (cached ones not counted)
    rounds: int = 0
    seconds: float = 0.0
    stopped: str = ""  # why the search ended before every survivor had its runs ("" when it did not)
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)  # candidate key -> why it left the running


def survivors(points: list[Point], repeat: int) -> tuple[list[Point], dict[str, str]]:
    """The candidates still worth a run, and why each other one is not (candidate key -> reason)."""
    level = noise(points)
    why: dict[str, str] = {}
    live = [p for p in points if not p.failed and p.median is not None]
    front = {id(p) for p in frontier(live, level)}
    for p in points:
        key = p.candidate.key()
        if p.failed:
            why[key] = f"failed: {p.failed}"
        elif p.median is None:
            continue
        elif not p.in_budget:
            why[key] = "outside the fidelity budget (measured once, for the frontier)"
        elif id(p) not in front:
            by = next(q for q in live if dominates(q, p, level))
            why[key] = (f"dominated beyond noise ({100 * level:.1f}%) by {by.candidate.key()}: at least as faithful "
                        "and faster")
    keep = [p for p in points if p.candidate.key() not in why and (p.median is None or len(p.samples) < repeat)]
    return keep, why


def _next_round(todo: list[Point], spent: float, runs: int, time_limit: float | None,
                estimate: tuple[float, float] | None) -> tuple[list[Point], str]:
    """The round that fits in the time left (fewest runs first, then the fastest), and why it was cut ("" if not).
    ``estimate``: (seconds a run, seconds a round adds) as measured; else the time spent per run so far."""
    if time_limit is None:
        return todo, ""
    if not runs:  # nothing measured yet, so no estimate: one run first, then the rest of the round cut to fit
        return todo[:1], ""
    per_run, per_round = estimate if estimate is not None else (spent / runs, 0.0)
    room = int((time_limit - spent - per_round) / per_run) if per_run > 0 else len(todo)
    if room >= len(todo):
        return todo, ""
    order = sorted(todo, key=lambda p: (len(p.samples), p.median if p.median is not None else 0.0))
    why = (f"the time limit ({_duration(time_limit)}) left room for {max(room, 0)} of the {len(todo)} runs the "
           f"next round needed (about {per_run:.1f} s a run)")
    return order[:max(room, 0)], why


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def search(points: list[Point], measure: Callable[[list[Point]], None], repeat: int = 5,
           time_limit: float | None = None, seed: int = 0, on_round: Callable[[Progress], None] | None = None,
           clock: Callable[[], float] = time.monotonic) -> SearchOutcome:
    """Measure ``points`` by successive halving (module docstring); ``measure`` appends one sample to each point it
    is given (or sets its ``failed``). Points that already hold samples (a cache) count as measured."""
    rng = random.Random(seed)
    out = SearchOutcome()
    start = clock()
    while True:
        todo, out.dropped = survivors(points, repeat)  # from all the runs so far: a later run can bring one back
        if not todo:
            break
        rng.shuffle(todo)
        estimate = measure.estimate() if hasattr(measure, "estimate") else None
        batch, cut = _next_round(todo, clock() - start, out.runs, time_limit, estimate)
        if not batch:
            out.stopped = cut
            break
        rng.shuffle(batch)
        before = sum(len(p.samples) for p in points)
        measure(batch)
        made = sum(len(p.samples) for p in points) - before
        out.runs += made
        out.rounds += 1
        out.seconds = clock() - start
        if on_round is not None:
            level = noise(points)
            on_round(Progress(out.rounds, survivors(points, repeat)[0], out.runs, out.seconds, frontier(points, level),
                              level))
        if cut:
            out.stopped = cut
            break
        if made == 0 and not any(p.failed for p in batch):
            out.stopped = "a round measured nothing"
            break
    out.seconds = clock() - start
    _, out.dropped = survivors(points, repeat)
    return out
