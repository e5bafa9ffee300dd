"""History entries: one stored (or read-from-JSON) measurement, with its whole context and every repetition's metrics;
what makes two entries the same setup (:func:`setup_key`) or the same measurement (:func:`content_key`); entries to and
from the records ``mvlm bench --json-file`` writes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mvlm_bench.plan import engine
from mvlm_bench.records.columns import BY_KEY, direction, finite
from mvlm_bench.records.record import RunContext
from mvlm_core.terminal import visible

# Params that make two measurements comparable (with device, model and mmproj hashes and protocol): every setting of a
# configuration. The runtime is NOT among them: comparing runtimes is the point. A setting entries stored before it was
# recorded lack reads as llama.cpp's default (PARAM_DEFAULTS).
SETUP_PARAMS = ("n_predict", "n_threads", "n_gpu_layers", "ctx_size", "prompt", "n_batch", "n_ubatch", "test", "ab_side",
                "flash_attn", "type_k", "type_v", "cpu_mask", "cpu_strict", "poll", "prio", "n_depth", "cpu_variant")
PARAM_DEFAULTS = {**engine.DEFAULTS, "n_depth": 0}


def setup_param(c: RunContext, key: str) -> Any:
    """A setting of a stored context (a missing batch size is llama.cpp's default, which it ran with)."""
    return c.params.get(key, PARAM_DEFAULTS.get(key))


@dataclasses.dataclass
class Entry:
    """One stored (or loaded-from-JSON) measurement: context + per-repetition metrics."""

    context: RunContext
    samples: dict[str, list[float | None]]  # metric -> one value per repetition
    id: int | None = None
    created_at: str = ""
    label: str = ""
    project_commit: str = ""
    project_dirty: bool | None = None
    timings: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    source: str = ""  # where it came from, for messages: "db.sqlite#12" or "run.json[0]"

    @property
    def repetitions(self) -> int:
        return max((len(v) for v in self.samples.values()), default=0)

    def describe(self) -> str:
        c = self.context
        bits = [f"#{self.id}" if self.id is not None else self.source, c.label(), c.device, c.protocol]
        if c.runtime_commit:
            bits.append(f"llama.cpp {c.runtime_commit[:10]}")
        if self.project_commit:
            bits.append(f"commit {self.project_commit[:10]}")
        if self.label:
            bits.append(f"label {self.label}")
        return visible(" ".join(b for b in bits if b))  # for messages: stored text, control characters shown


def setup_key(e: Entry) -> tuple:
    """What must be equal for two entries to measure the same thing (on possibly different runtimes)."""
    c = e.context
    return (c.device, c.model_sha256 or c.model_file, c.mmproj_sha256 or c.mmproj_file, c.protocol,
            tuple(json.dumps(setup_param(c, k), sort_keys=True, default=str) for k in SETUP_PARAMS))


def setup_differences(a: Entry, b: Entry) -> list[str]:
    """Human-readable list of setup fields that differ (empty: comparable)."""
    out = []
    for name in ("device", "model_sha256", "mmproj_sha256", "protocol"):
        va, vb = getattr(a.context, name), getattr(b.context, name)
        if va != vb:
            out.append(f"{name}: {str(va)[:16] or '–'} vs {str(vb)[:16] or '–'}")
    for k in SETUP_PARAMS:
        va, vb = setup_param(a.context, k), setup_param(b.context, k)
        if va != vb:
            out.append(f"{k}: {va} vs {vb}")
    return out


def utc_text(t: float) -> str:
    """A unix time in the history's ``created_at`` form (ISO 8601, UTC, seconds)."""
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


def normalise_time(text: str) -> str:
    """An ISO 8601 time (``2026-01-01T12:00:00Z``, with an offset, or naive = UTC) in the history's ``created_at``
    form; ValueError when it is not one."""
    t = dt.datetime.fromisoformat(text.strip())
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC).isoformat(timespec="seconds")


def entry_from_group(g: Any, label: str = "", project: tuple[str, bool | None] | None = None) -> Entry:
    """A group of repetitions (``records.groups.Group``) as an Entry, not yet stored; ``created_at`` is when it was
    measured (its first repetition's start, as ``test_time`` in ``mvlm bench --json-file``)."""
    from mvlm_bench.records.columns import METRIC_KEYS
    from mvlm_bench.records.metrics import measured_between

    commit, dirty = project if project is not None else project_commit()
    samples = {k: [p.get(k) for p in g.per_run] for k in (*METRIC_KEYS, *(k for k in g.agg if k not in METRIC_KEYS))}
    return Entry(context=g.context, samples=samples, label=label, project_commit=commit, project_dirty=dirty,
                 timings=[r.timing.to_dict() for r in g.runs], created_at=utc_text(measured_between(g.runs)[0]))


def entries_from_runs(runs: Sequence, label: str = "", project: tuple[str, bool | None] | None = None) -> list[Entry]:
    """One Entry per group of repetitions (``records.groups.aggregate``), not yet stored."""
    from mvlm_bench.records.groups import aggregate

    project = project if project is not None else project_commit()
    return [entry_from_group(g, label, project) for g in aggregate(runs)]




def entries_to_records(entries: Sequence[Entry]) -> list[dict[str, Any]]:
    """Entries as the records ``mvlm bench --json-file`` writes (plus label, commit and time): what
    :func:`entries_from_json` reads back unchanged, so ``mvlm compare`` and ``mvlm history import`` take them."""
    out = []
    for e in entries:
        c = e.context
        n = max(e.repetitions, len(e.timings))
        runs = []
        for i in range(n):
            metrics = {k: finite(vs[i]) if i < len(vs) else None for k, vs in e.samples.items()}
            runs.append({"repetition": i, "metrics": metrics, "timing": e.timings[i] if i < len(e.timings) else {}})
        out.append({
            "build_commit": c.runtime_commit or None, "cpu_info": c.cpu_info or None, "gpu_info": c.gpu_info or None,
            "model_filename": c.model_file or None, "file_size": c.size_bytes, "device": c.device,
            "model": c.label(), "precision": c.precision or None, "model_sha256": c.model_sha256 or None,
            "mmproj_filename": c.mmproj_file or None, "mmproj_sha256": c.mmproj_sha256 or None,
            "runtime_patches": list(c.runtime_patches), "protocol": c.protocol or None, "params": c.params,
            "repetitions": n, "runs": runs, "label": e.label, "project_commit": e.project_commit,
            "project_dirty": e.project_dirty, "created_at": e.created_at,
        })
    return out


MAX_TEXT = 4096  # characters of one stored text field (a label, a device, a file name; cpu_info is ~100)
MAX_LABEL = 200


def text_field(v: Any, what: str, limit: int = MAX_TEXT) -> str:
    if v is None:
        return ""
    if not isinstance(v, str | int | float) or isinstance(v, bool):
        raise ValueError(f"{what} is {type(v).__name__}, not text")
    if len(str(v)) > limit:
        raise ValueError(f"{what} is {len(str(v))} characters long (at most {limit})")
    return str(v)


def check_label(label: str | None, option: str = "--label") -> None:
    """A label to store: one line of at most MAX_LABEL characters (MvlmError otherwise)."""
    from mvlm_core.errors import MvlmError

    if label is None:
        return
    if len(label) > MAX_LABEL or any(c in label for c in "\n\r\0"):
        raise MvlmError(f"{option} is {len(label)} characters{' with a line break' if len(label) <= MAX_LABEL else ''}: "
                        f"give one line of at most {MAX_LABEL} characters (e.g. main, pr-42)")


TEMPERATURE_C = (-100.0, 200.0)  # a device temperature outside this is not a reading


def metric_value(v: Any, what: str, key: str | None = None) -> float | None:
    """A stored metric: null (not measured) or a finite number; anything else is a ValueError naming ``what`` (mvlm
    writes null, never NaN, a string or a list). Speeds, durations, counts, memory and times are never negative, a
    temperature is within TEMPERATURE_C."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"{what} is {json.dumps(v, default=str)[:40]}, not a number")
    out = finite(v)
    if out is None:
        raise ValueError(f"{what} is {str(v)[:40]}, not a finite number (mvlm writes null for a value it lacks)")
    if out < 0 and key is not None and (direction(key) != 0 or key.endswith("_tps")):
        raise ValueError(f"{what} is {out:g}: a speed or a duration is never negative")
    kind = "size" if key == "peak_rss_mb" else BY_KEY[key].kind if key in BY_KEY else ""
    if out < 0 and kind in ("count", "time", "size"):
        raise ValueError(f"{what} is {out:g}: a {kind} is never negative")
    if key in ("temp_start_c", "temp_end_c") and not TEMPERATURE_C[0] <= out <= TEMPERATURE_C[1]:
        raise ValueError(f"{what} is {out:g} °C: not a device temperature (readings lie within {TEMPERATURE_C[0]:g} to "
                         f"{TEMPERATURE_C[1]:g} °C)")
    return out


_RUN_READINGS = ("t_start", "t_end", "peak_rss_mb", "temp_start_c", "temp_end_c")  # a run's own copies of metrics


def _check_run(run: dict[str, Any], i: int, metrics: dict[str, Any], timing: dict[str, Any]) -> None:
    """A run holds a measurement (metrics or timing; the run object of `{}` is none), readings that are readings
    (see :func:`metric_value`), a timing without negative numbers, and ends when or after it starts."""
    if not metrics and not timing:
        raise ValueError(f"run {i} has neither 'metrics' nor 'timing': not a measurement")
    for k in _RUN_READINGS:
        if k in run:
            metric_value(run[k], f"run {i}: {k!r}", k)
    for k, v in timing.items():
        if isinstance(v, int | float) and not isinstance(v, bool) and v < 0:
            raise ValueError(f"run {i}: timing {str(k)[:60]!r} is {v:g}: a time, a count or a rate is never negative")
    for where in (run, metrics):
        t0, t1 = where.get("t_start"), where.get("t_end")
        if all(isinstance(t, int | float) and not isinstance(t, bool) for t in (t0, t1)) and t1 < t0:
            raise ValueError(f"run {i}: t_end {t1:g} is before t_start {t0:g}")


def entry_from_record(r: dict[str, Any], source: str) -> Entry:
    """One ``mvlm bench --json-file`` record; ValueError (the caller names file and record) when its fields have wrong types."""
    params = r.get("params") or {}
    if not isinstance(params, dict):
        raise ValueError("'params' is not an object")
    patches = r.get("runtime_patches") or []
    if not isinstance(patches, list) or not all(isinstance(x, str) for x in patches):
        raise ValueError("'runtime_patches' is not a list of names")
    size_key = "file_size" if "file_size" in r else "model_size"  # reports before llama-bench's model_size: file size
    size = r.get(size_key)
    if size is not None and (isinstance(size, bool) or not isinstance(size, int)):
        raise ValueError(f"'{size_key}' is not a whole number")
    runs = r["runs"]
    if not isinstance(runs, list) or not all(isinstance(x, dict) for x in runs):
        raise ValueError("'runs' is not a list of objects")
    if not runs:
        raise ValueError("'runs' is empty: a measurement has at least one repetition")
    ctx = RunContext(device=text_field(r.get("device"), "'device'"), model=text_field(r.get("model"), "'model'"),
                     precision=text_field(r.get("precision"), "'precision'"),
                     model_file=text_field(r.get("model_filename"), "'model_filename'"),
                     model_sha256=text_field(r.get("model_sha256"), "'model_sha256'"),
                     mmproj_file=text_field(r.get("mmproj_filename"), "'mmproj_filename'"),
                     mmproj_sha256=text_field(r.get("mmproj_sha256"), "'mmproj_sha256'"), size_bytes=size,
                     runtime_commit=text_field(r.get("build_commit"), "'build_commit'"), runtime_patches=list(patches),
                     protocol=text_field(r.get("protocol"), "'protocol'"), cpu_info=text_field(r.get("cpu_info"), "'cpu_info'"),
                     gpu_info=text_field(r.get("gpu_info"), "'gpu_info'"), params=params)
    samples: dict[str, list[float | None]] = {}
    timings = []
    seen: dict[str, int] = {}
    for i, run in enumerate(runs):
        metrics = run.get("metrics") or {}
        timing = run.get("timing") or {}
        if not isinstance(metrics, dict) or not isinstance(timing, dict):
            raise ValueError(f"run {i}: 'metrics' and 'timing' must be objects")
        first = seen.setdefault(json.dumps(run, sort_keys=True, default=str), i)
        if first != i:
            raise ValueError(f"run {i} repeats run {first} exactly (the same repetition twice)")
        for k, v in metrics.items():
            if str(k).endswith("_source") and (v is None or isinstance(v, str)):
                continue  # where a figure came from ("runner", "wall"): provenance, not a measurement
            vals = samples.setdefault(str(k), [])
            vals.extend([None] * (i - len(vals)))  # a metric missing from earlier runs keeps its index
            vals.append(metric_value(v, f"run {i}: metric {str(k)[:60]!r}", str(k)))
        _check_run(run, i, metrics, timing)
        timings.append(timing)
    dirty = r.get("project_dirty")
    created = text_field(r.get("created_at"), "'created_at'")
    if not created:  # a `mvlm bench --json-file` report: when it was measured
        created = record_time(r)
    return Entry(context=ctx, samples=samples, timings=timings, source=source,
                 label=text_field(r.get("label"), "'label'", MAX_LABEL),
                 project_commit=text_field(r.get("project_commit"), "'project_commit'"),
                 project_dirty=dirty if isinstance(dirty, bool) else None, created_at=created)


def lenient_time(row: dict[str, Any]) -> str:
    """A llama-bench row's ``test_time`` in the history's form, '' when missing or unreadable."""
    try:
        return normalise_time(str(row.get("test_time") or ""))
    except ValueError:
        return ""


def record_time(r: dict[str, Any]) -> str:
    """The measurement time of a report record: ``test_time`` (ISO 8601, llama-bench's field) or ``start_time``
    (unix); '' when it has neither (older reports: the import time is used). ValueError when they are malformed."""
    t = r.get("test_time")
    if t not in (None, ""):
        if not isinstance(t, str):
            raise ValueError("'test_time' is not an ISO 8601 time")
        try:
            return normalise_time(t)
        except ValueError:
            raise ValueError(f"'test_time' {t[:40]!r} is not an ISO 8601 time") from None
    start = r.get("start_time")
    if start is not None:
        if isinstance(start, bool) or not isinstance(start, int | float) or not math.isfinite(start):
            raise ValueError("'start_time' is not a unix time")
        try:
            return utc_text(float(start))
        except (OverflowError, OSError, ValueError):
            raise ValueError(f"'start_time' {start!r} is not a unix time") from None
    return ""


# llama-bench fields that name a test rather than a configuration (the rest must be equal within one entry)

def project_commit(source: Path | None = None) -> tuple[str, bool | None]:
    """(git commit, dirty?) of mvlm's own source: the git work tree the mvlm package lives in (``source``: that
    directory; default this package's), whatever the current directory is. ('', None) when the package is not a
    tracked file of a git work tree (an installed wheel: site-packages, even inside another project's tree) or
    without git."""
    pkg = Path(source) if source is not None else Path(__file__).resolve().parents[1]

    def git(*args: str, timeout: float = 10) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(pkg), *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    try:
        tracked = git("ls-files", "--error-unmatch", "--", "__init__.py")
        if tracked.returncode != 0:
            return "", None
        r = git("rev-parse", "HEAD")
        if r.returncode != 0:
            return "", None
        d = git("status", "--porcelain", "--untracked-files=no", timeout=30)
        return r.stdout.strip(), (bool(d.stdout.strip()) if d.returncode == 0 else None)
    except (OSError, subprocess.TimeoutExpired):
        return "", None




def _measurement(e: Entry) -> tuple[str, dict[str, list[float | None]]]:
    c = e.context

    def norm(vs: Sequence[Any]) -> list[float | None]:
        out = [finite(v) for v in vs]
        while out and out[-1] is None:
            out.pop()
        return out

    samples = {str(k): norm(vs) for k, vs in e.samples.items()}
    ctx = {"device": c.device, "model": c.label(), "precision": c.precision, "model_file": c.model_file,
           "model_sha256": c.model_sha256, "mmproj_file": c.mmproj_file, "mmproj_sha256": c.mmproj_sha256,
           "size_bytes": c.size_bytes, "runtime_commit": c.runtime_commit, "runtime_patches": list(c.runtime_patches),
           "protocol": c.protocol, "cpu_info": c.cpu_info, "gpu_info": c.gpu_info,
           "params": json.loads(json.dumps(c.params, sort_keys=True, default=str))}
    return json.dumps(ctx, sort_keys=True, default=str), {k: v for k, v in samples.items() if v}


def content_key(e: Entry) -> str:
    """What a measurement IS: its whole context (device, model and mmproj files and hashes, llama.cpp build and
    patches, protocol, parameters) and every repetition's value of every metric. Not its time, label or project
    commit: a `mvlm bench --json-file` report carries none of those, and the same runs imported twice (or a copy of the
    file, or a report of runs that `--save` already stored) are still one measurement."""
    ctx, samples = _measurement(e)
    return json.dumps([json.loads(ctx), samples], sort_keys=True, default=str)


def continues(stored: Entry, new: Entry) -> bool:
    """``new`` is ``stored`` with more repetitions after it (the same context, and each metric's stored values the
    start of the new ones): a bench whose history stopped taking repetitions half-way, then its spill file or its
    --jsonl imported. Its later repetitions belong to the stored entry."""
    (ca, sa), (cb, sb) = _measurement(stored), _measurement(new)
    if ca != cb or stored.repetitions >= new.repetitions or not set(sa) <= set(sb):
        return False
    n = stored.repetitions
    return all(sb[k][:n] == v[:n] for k, v in sa.items()) and all(len(v) <= n for v in sa.values())


def same_measurement(a: Entry, b: Entry) -> bool:
    """The same measurement (an import of a file that was already imported, a copy of it, or a report of stored
    runs), whatever ``created_at``, label or project commit each carries: see :func:`content_key`."""
    return content_key(a) == content_key(b)
