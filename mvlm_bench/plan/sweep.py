"""Sweeps: ``mvlm bench`` over the cross product of models x threads x n-gpu-layers x ctx-size (llama-bench's
``-m a -m b -t 2,4``), one record per configuration; and the pacing of any bench: ``--delay`` and ``--max-temp``.

- **Lists.** ``--model`` is repeatable; ``--threads``, ``--n-gpu-layers`` and ``--ctx-size`` take comma lists
  (``--threads 1,2,4``). Every configuration is built and checked before anything is pushed: a bad value is refused in
  one line naming it (exit 2).
- **One runner.** Each configuration gets its own warm-up and repetitions (:mod:`mvlm_bench.session.runners`), in
  order: models outermost, then threads, n-gpu-layers, ctx-size (the order of the cross product as written).
- **Pushes.** The sync is content-addressed: a model goes to the device with its first configuration; the later ones
  find it there (the log says "already on the device") and push nothing.
- **The device lease** (mvlm_bench.session.lease) is held per configuration, from its push to its last repetition: another
  bench on the same device can run between two configurations, never inside one, and a long sweep does not lock a
  shared device out for hours. Each configuration has its own warm-up, so what ran in between does not leak into it.
- **Records.** Every repetition is one record carrying its whole configuration (n_threads, n_gpu_layers, ctx_size,
  ...): each configuration is one JSON record, one table row (labelled with the settings that differ), one history
  entry (``--save``); CSV and JSON Lines keep one row per repetition.
- **Pacing** (:class:`mvlm_bench.session.pacing.Pacer`, also for a single configuration): ``--delay S`` sleeps S
  seconds before every run but the first (warm-up runs and repetitions included; the records' ``t_end``/``t_start``
  show the gap); ``--max-temp C`` then waits until the device's hottest thermal zone (mvlm_bench.device.thermal)
  reads below C, polling
  every few seconds, for at most ``--max-temp-wait`` seconds (then exit 3, with the configurations completed so far
  reported). A device without a readable thermal zone is said once and not waited for.
- A sweep runs the lm, vlm, imp and llama-bench protocols; ``--against`` (an A/B session is one pair of configurations) and
  ``--baseline`` (one stored measurement to compare with) are refused with a sweep.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from pathlib import Path

from mvlm_bench.device.profiles import MAX_GPU_LAYERS, MAX_THREADS
from mvlm_bench.plan import engine
from mvlm_bench.plan.spec import MAX_CTX, BenchSpec, check_inputs, validate_spec
from mvlm_core.errors import MvlmError

SWEEP_PROTOCOLS = ("lm", "vlm", "imp", "llama-bench")
MAX_CONFIGS = 256
MAX_DELAY_S = 24 * 3600.0


def parse_list(option: str, text: str | None, lo: int, hi: int) -> list[int | None]:
    """``"1,2,4"`` -> [1, 2, 4]; None (option not given) -> [None]. One line naming the bad item otherwise (the range
    of each value is :func:`mvlm_bench.bench.validate_spec`'s; ``lo``/``hi`` shape the example)."""
    if text is None:
        return [None]
    try:
        items = engine.items_of(text)
    except ValueError as e:
        raise MvlmError(f"{option} {text}: {e}") from None
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
                   ctx_size: str | None = None, engine_lists: dict[str, str | None] | None = None) -> list[BenchSpec]:
    """The cross product, every configuration validated (numbers, files) before anything runs. ``engine_lists``:
    llama.cpp's settings as given (spec field -> comma list text; mvlm_bench.plan.engine)."""
    if not models:
        raise MvlmError("no model given: pass --model FILE.gguf (repeat it to sweep over models)")
    seen: set[str] = set()
    for m in models:
        key = str(Path(m).resolve()) if Path(m).exists() else str(m)
        if key in seen:
            raise MvlmError(f"--model {m} is given twice: give each model once")
        seen.add(key)
    lists: dict[str, list] = {
        "threads": parse_list("--threads", threads, 1, MAX_THREADS),
        "n_gpu_layers": parse_list("--n-gpu-layers", n_gpu_layers, -1, MAX_GPU_LAYERS),
        "ctx_size": parse_list("--ctx-size", ctx_size, 1, MAX_CTX),
    }
    for field, text in (engine_lists or {}).items():
        lists[field] = engine.parse_values(engine.BY_FIELD[field], text)
    n = len(models) * math.prod(len(v) for v in lists.values())
    if n > 1 and spec.protocol not in SWEEP_PROTOCOLS:
        raise MvlmError(f"a sweep (several --model, or comma lists of settings) runs the {', '.join(SWEEP_PROTOCOLS)} "
                        f"protocols, not {spec.protocol}: give one value of each")
    if n > MAX_CONFIGS:
        raise MvlmError(f"the sweep has {n} configurations (more than {MAX_CONFIGS}): give shorter lists")
    out = []
    for m in models:
        for values in itertools.product(*lists.values()):
            change = {k: v for k, v in zip(lists, values, strict=True) if v is not None or k not in ("ctx_size",)}
            s = dataclasses.replace(spec, model=Path(m), **change)
            validate_spec(s, ctx_option=change.get("ctx_size") is not None)
            out.append(s)
    for m in models:  # each file once
        check_inputs(next(s for s in out if s.model == Path(m)))
    return out


# what varies in a sweep, as a few words: the spec's field -> its short form
_SHORT = {"threads": "t", "n_gpu_layers": "ngl", "ctx_size": "c",
          **{e.field: e.short.lstrip("-") or e.option.lstrip("-") for e in engine.SETTINGS}}


def describe(spec: BenchSpec, varying: Sequence[str]) -> str:
    """A configuration in a few words, only what varies: ``SmolLM2-Q4_1 t=2 ngl=0``."""
    parts = [Path(spec.model).stem if k == "model" else f"{_SHORT[k]}={getattr(spec, k)}" for k in varying]
    return " ".join(parts) or Path(spec.model).stem


def varying(specs: Sequence[BenchSpec]) -> list[str]:
    """The fields that differ between the configurations (model, threads, n_gpu_layers, ctx_size, llama.cpp's)."""
    return [k for k in ("model", *_SHORT) if len({str(getattr(s, k)) for s in specs}) > 1]


def check_pacing(delay: float, max_temp: float | None, max_temp_wait: float) -> None:
    if not (math.isfinite(delay) and 0 <= delay <= MAX_DELAY_S):
        raise MvlmError(f"--delay {delay} is out of range: give seconds from 0 to {MAX_DELAY_S:.0f}")
    if max_temp is not None and not (math.isfinite(max_temp) and 0 < max_temp < 150):
        raise MvlmError(f"--max-temp {max_temp} is out of range: give degrees Celsius above 0 and below 150 (e.g. 45)")
    if not (math.isfinite(max_temp_wait) and 0 <= max_temp_wait <= MAX_DELAY_S):
        raise MvlmError(f"--max-temp-wait {max_temp_wait} is out of range: give seconds from 0 to {MAX_DELAY_S:.0f}")


