"""Sweeps: ``mvlm bench`` over the cross product of models x threads x n-gpu-layers x ctx-size (llama-bench's
``-m a -m b -t 2,4``), one record per configuration; and the pacing of any bench: ``--delay`` and ``--max-temp``.

- **Lists.** ``--model`` is repeatable; ``--threads``, ``--n-gpu-layers`` and ``--ctx-size`` take comma lists
  (``--threads 1,2,4``). Every configuration is built and checked before anything is pushed: a bad value is refused in
  one line naming it (exit 2).
- **One runner.** Each configuration is one :func:`mvlm_bench.bench.run_bench` (its own warm-up and repetitions), in
  order: models outermost, then threads, n-gpu-layers, ctx-size (the order of the cross product as written).
- **Pushes.** The sync is content-addressed: a model goes to the device with its first configuration; the later ones
  find it there (the log says "already on the device") and push nothing.
- **The device lease** (mvlm_bench.lease) is held per configuration, from its push to its last repetition: another
  bench on the same device can run between two configurations, never inside one, and a long sweep does not lock a
  shared device out for hours. Each configuration has its own warm-up, so what ran in between does not leak into it.
- **Records.** All runs together make one report: records group by their context, which holds n_threads,
  n_gpu_layers and ctx_size, so each configuration is one JSON record, one table row, one history entry
  (``--save``); CSV keeps one row per repetition, each with its configuration's parameters.
- **Pacing** (:class:`Pacer`, also for a single configuration): ``--delay S`` sleeps S seconds before every run but
  the first (warm-up runs and repetitions included; the records' ``t_end``/``t_start`` show the gap);
  ``--max-temp C`` then waits until the device's hottest thermal zone (mvlm_bench.thermal) reads below C, polling
  every few seconds, for at most ``--max-temp-wait`` seconds (then exit 3, with the configurations completed so far
  reported). A device without a readable thermal zone is said once and not waited for.
- A sweep runs the lm, vlm and imp protocols; ``--against`` (an A/B session is one pair of configurations) and
  ``--baseline`` (one stored measurement to compare with) are refused with a sweep.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mvlm_bench import thermal
from mvlm_bench.bench import MAX_CTX, MAX_GPU_LAYERS, MAX_THREADS, BenchResult, BenchSpec, check_inputs, validate_spec
from mvlm_core.errors import MvlmError

SWEEP_PROTOCOLS = ("lm", "vlm", "imp")
MAX_CONFIGS = 256
MAX_DELAY_S = 24 * 3600.0
POLL_S = 5.0  # between two readings while waiting for the device to cool
DEFAULT_TEMP_WAIT_S = 1800.0


def parse_list(option: str, text: str | None, lo: int, hi: int) -> list[int | None]:
    """``"1,2,4"`` -> [1, 2, 4]; None (option not given) -> [None]. One line naming the bad item otherwise (the range
    of each value is :func:`mvlm_bench.bench.validate_spec`'s; ``lo``/``hi`` shape the example)."""
    if text is None:
        return [None]
    items = text.split(",")
    out: list[int | None] = []
    for raw in items:
        item = raw.strip()
        if not item:
            raise MvlmError(f"{option} {text!r} has an empty item: give whole numbers separated by commas, e.g. "
                            f"{option} {lo},{min(hi, lo * 2 or 2)}")
        try:
            v = int(item)
        except ValueError:
            raise MvlmError(f"{option} {text!r}: {item!r} is not a whole number: give whole numbers from {lo} to {hi}, "
                            "separated by commas") from None
        if v in out:
            raise MvlmError(f"{option} {text!r} names {v} twice: give each value once")
        out.append(v)
    return out


def configurations(spec: BenchSpec, models: Sequence[Path], threads: str | None = None, n_gpu_layers: str | None = None,
                   ctx_size: str | None = None) -> list[BenchSpec]:
    """The cross product, every configuration validated (numbers, files) before anything runs."""
    if not models:
        raise MvlmError("no model given: pass --model FILE.gguf (repeat it to sweep over models)")
    seen: set[str] = set()
    for m in models:
        key = str(Path(m).resolve()) if Path(m).exists() else str(m)
        if key in seen:
            raise MvlmError(f"--model {m} is given twice: give each model once")
        seen.add(key)
    lists = (parse_list("--threads", threads, 1, MAX_THREADS), parse_list("--n-gpu-layers", n_gpu_layers, 0, MAX_GPU_LAYERS),
             parse_list("--ctx-size", ctx_size, 1, MAX_CTX))
    n = len(models) * len(lists[0]) * len(lists[1]) * len(lists[2])
    if n > 1 and spec.protocol not in SWEEP_PROTOCOLS:
        raise MvlmError(f"a sweep (several --model, or lists of --threads/--n-gpu-layers/--ctx-size) runs the "
                        f"{', '.join(SWEEP_PROTOCOLS)} protocols, not {spec.protocol}: give one value of each")
    if n > MAX_CONFIGS:
        raise MvlmError(f"the sweep has {n} configurations (more than {MAX_CONFIGS}): give shorter lists")
    out = []
    for m in models:
        for t in lists[0]:
            for g in lists[1]:
                for c in lists[2]:
                    s = dataclasses.replace(spec, model=Path(m), threads=t, n_gpu_layers=g,
                                            ctx_size=c if c is not None else spec.ctx_size)
                    validate_spec(s, ctx_option=c is not None)
                    out.append(s)
    for m in models:  # each file once
        check_inputs(next(s for s in out if s.model == Path(m)))
    return out


def describe(spec: BenchSpec, varying: Sequence[str]) -> str:
    """A configuration in a few words, only what varies: ``SmolLM2-Q4_1 t=2 ngl=0``."""
    parts = {"model": Path(spec.model).stem, "threads": f"t={spec.threads}", "n_gpu_layers": f"ngl={spec.n_gpu_layers}",
             "ctx_size": f"c={spec.ctx_size}"}
    return " ".join(parts[k] for k in varying) or Path(spec.model).stem


def varying(specs: Sequence[BenchSpec]) -> list[str]:
    """The fields that differ between the configurations (model, threads, n_gpu_layers, ctx_size)."""
    return [k for k in ("model", "threads", "n_gpu_layers", "ctx_size") if len({str(getattr(s, k)) for s in specs}) > 1]


def check_pacing(delay: float, max_temp: float | None, max_temp_wait: float) -> None:
    import math

    if not (math.isfinite(delay) and 0 <= delay <= MAX_DELAY_S):
        raise MvlmError(f"--delay {delay} is out of range: give seconds from 0 to {MAX_DELAY_S:.0f}")
    if max_temp is not None and not (math.isfinite(max_temp) and 0 < max_temp < 150):
        raise MvlmError(f"--max-temp {max_temp} is out of range: give degrees Celsius above 0 and below 150 (e.g. 45)")
    if not (math.isfinite(max_temp_wait) and 0 <= max_temp_wait <= MAX_DELAY_S):
        raise MvlmError(f"--max-temp-wait {max_temp_wait} is out of range: give seconds from 0 to {MAX_DELAY_S:.0f}")


class CoolingTimeout(MvlmError):
    """The device did not cool below --max-temp within --max-temp-wait."""


@dataclasses.dataclass
class Pacer:
    """``before_run`` for :func:`mvlm_bench.bench.run_bench`: the ``--delay`` sleep, then the ``--max-temp`` wait.

    ``on_status(text)`` hears what it waits for (the progress line: "cooling: 52.0 °C > 45 °C, 20 s"); ``log`` gets
    the one-time note about a device without thermal zones. ``root``: where the zones are (tests: a directory)."""

    delay: float = 0.0
    max_temp: float | None = None
    max_temp_wait: float = DEFAULT_TEMP_WAIT_S
    on_status: Callable[[str], None] = lambda s: None
    log: Callable[[str], None] = lambda s: None
    root: str = thermal.THERMAL_ROOT
    poll_s: float = POLL_S
    runs: int = 0
    no_zones: set[str] = dataclasses.field(default_factory=set)

    def __call__(self, transport, i: int = 0, total: int = 0) -> None:
        if self.runs and self.delay > 0:
            self.on_status(f"delay: {self.delay:g} s before the next run")
            time.sleep(self.delay)
        self.runs += 1
        if self.max_temp is not None:
            self.wait_cool(transport)

    def wait_cool(self, transport) -> float | None:
        """Block until the device reads below ``max_temp`` (returns the reading), None when it has no thermal zone.
        Raises :class:`CoolingTimeout` (exit 3) after ``max_temp_wait`` seconds."""
        assert self.max_temp is not None
        name = transport.name
        if name in self.no_zones:
            return None
        t0 = time.monotonic()
        while True:
            c = thermal.read_celsius(transport, self.root)
            if c is None:
                self.no_zones.add(name)
                self.log(f"device {name} has no readable thermal zone ({self.root}/thermal_zone*/temp): --max-temp "
                         "cannot wait for it to cool; running without waiting")
                return None
            waited = time.monotonic() - t0
            if c < self.max_temp:
                if waited >= 1:
                    self.log(f"device {name} cooled to {c:.1f} °C (below --max-temp {self.max_temp:g}) in {waited:.0f} s")
                return c
            if waited >= self.max_temp_wait:
                raise CoolingTimeout(f"device {name} stayed at {c:.1f} °C, not below --max-temp {self.max_temp:g}, for "
                                     f"{waited:.0f} s: let it cool, or raise --max-temp or --max-temp-wait", exit_code=3)
            self.on_status(f"cooling: {c:.1f} °C ≥ {self.max_temp:g} °C, waited {waited:.0f}/{self.max_temp_wait:.0f} s")
            time.sleep(min(self.poll_s, max(0.05, self.max_temp_wait - waited)))


@dataclasses.dataclass
class SweepResult:
    """Every configuration's runs together (one report), the first failure, and the configurations in order."""

    runs: list
    failures: list
    configs: list[BenchSpec]
    results: list[BenchResult]
    stopped: str = ""  # why the sweep ended early (a cooling timeout), else ""
    llama_bench_rows: list = dataclasses.field(default_factory=list)


def run_sweep(profile, specs: Sequence[BenchSpec], pacer: Pacer | None = None,
              log: Callable[[str], None] = lambda s: None,
              on_config: Callable[[int, int, BenchSpec], None] | None = None, **bench_kwargs) -> SweepResult:
    """Run each configuration with :func:`mvlm_bench.bench.run_bench` (``bench_kwargs``: its log/progress/lease
    arguments), in order; stop at the first failed run (its configuration's completed runs are kept). A cooling
    timeout ends the sweep with the configurations completed so far (``stopped`` says why)."""
    from mvlm_bench.bench import run_bench

    names = varying(specs)
    out = SweepResult([], [], list(specs), [])
    said: set[str] = set()
    outer_log = log

    def log(message: str) -> None:  # a device's notes (no thermal zone, no peak RSS) once per sweep, not per config
        if message.startswith("device ") and message in said:
            return
        said.add(message)
        outer_log(message)

    for k, spec in enumerate(specs):
        if on_config:
            on_config(k, len(specs), spec)
        if len(specs) > 1:
            log(f"configuration {k + 1}/{len(specs)}: {describe(spec, names)}")
        try:
            res = run_bench(profile, spec, log=log, before_run=pacer, **bench_kwargs)
        except CoolingTimeout as e:
            if not out.runs:
                raise
            out.stopped = f"{e} (configuration {k + 1}/{len(specs)} not run)"
            return out
        out.results.append(res)
        out.runs += res.runs
        if res.failures:
            out.failures += res.failures
            return out
    return out
