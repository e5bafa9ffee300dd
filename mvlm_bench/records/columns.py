"""The one column table: every metric a record carries and every setting a configuration has, with its header, unit,
number format, direction (is more better?) and the views that show it.

Every view is rendered from here: the terminal table and the Markdown report (``views``), CSV and JSON (every metric),
the comparison and the gate (``compare`` / ``gate``), the history list (``history``) and its plots (``plot``). A new
metric is one :class:`Column` line; nothing else lists metric keys by hand.

Layouts: the papers' tables differ by protocol. A group's layout is its protocol's when that protocol reproduces one
paper table of its own (``imp``: Imp Table 4; ``dataset``: Xmodel-VLM Table 6), else ``papers`` (MobileVLM Tables
5/6, MobileVLM V2 Table 5). A column lists the layouts whose main table shows it; the terminal table and the Markdown
report show a column when any of their groups has a value for it (VE only for image protocols, llama-bench's rates
only where measured).

Settings (:data:`SETTINGS`) are what a configuration is: two records whose settings differ are never pooled, and every
view that lists several configurations shows, as columns, the settings in which they differ (:func:`differing`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# number formats: how many decimals (None: .0f from 1000 on, else .2f)
_FORMATS = {"count": 0, "resource": 1, "seconds": 2, "rate": None, "ms": None, "time": 0}


@dataclass(frozen=True)
class Column:
    """One metric: ``key`` in records, JSON and the history; ``name`` as the papers call it; ``unit``; ``kind`` picks
    the number format; ``direction`` +1 (more is better: tokens/s), -1 (less is better: s, ms), 0 (not a speed);
    ``views``: the views and layouts that show it."""

    key: str
    name: str
    unit: str
    kind: str = "rate"
    direction: int = 0
    views: frozenset[str] = frozenset()
    short: str = ""  # the terminal table's header when it differs from ``name`` ("VE" for "VE total")

    @property
    def header(self) -> str:
        """``Eval (tokens/s)``: Markdown, CSV, compare."""
        return f"{self.name} ({self.unit})" if self.unit else self.name

    @property
    def table_header(self) -> str:
        """The terminal table's two-line header: ``Eval`` over ``tok/s``."""
        return f"{self.short or self.name}\n{self.unit.replace('tokens/s', 'tok/s')}"

    def format(self, v: float | int | None) -> str:
        """The value as the tables print it (``–`` when unknown)."""
        if v is None:
            return "–"
        digits = _FORMATS.get(self.kind)
        if digits is None:
            return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.2f}"
        return f"{v:.{digits}f}"


def _c(key: str, name: str, unit: str, kind: str, direction: int, views: str = "", short: str = "") -> Column:
    return Column(key, name, unit, kind, direction, frozenset(views.split()), short)


# Views: papers / imp / dataset (a layout's main table), decomposition and spread (the Markdown report's other tables),
# resources (on-device readings), compare (compared by default), gate (gated by default), plot, history (listed),
# noisy (flagged when its repetitions spread wider than records.groups.NOISY_CV).
COLUMNS: tuple[Column, ...] = (
    _c("ve_ms_per_patch", "VE", "ms/patch", "ms", -1, "papers spread compare"),
    _c("ve_ms", "VE total", "ms", "ms", -1, "papers compare gate plot noisy", short="VE"),
    _c("sample_tps", "Sample", "tokens/s", "rate", 1, "papers spread compare plot"),
    _c("prompt_tps", "Eval_prompt", "tokens/s", "rate", 1, "papers spread compare gate plot history noisy"),
    _c("eval_tps", "Eval", "tokens/s", "rate", 1, "papers spread compare gate plot history noisy"),
    _c("total_s", "Total", "s", "seconds", -1, "papers dataset decomposition spread compare gate plot history noisy"),
    _c("llama_total_s", "llama.cpp total", "s", "seconds", -1),
    _c("eval_avg", "Eval_avg", "tokens/s", "rate", 1, "papers compare"),
    _c("tks_in", "Tks_in", "tokens", "count", 0, "decomposition"),
    _c("tks_out", "Tks_out", "tokens", "count", 0, "decomposition"),
    _c("load_s", "Load", "s", "seconds", -1, "imp dataset decomposition compare plot"),
    _c("prompt_s", "Tks_in/Eval_prompt", "s", "seconds", -1, "decomposition"),
    _c("sample_s", "Tks_out/Sample", "s", "seconds", -1, "decomposition"),
    _c("eval_s", "Tks_out/Eval", "s", "seconds", -1, "decomposition"),
    _c("other_s", "Other", "s", "seconds", 0, "decomposition"),
    # on-device resources and when the repetition ran (mvlm_bench.device.resources / thermal); no speed metrics
    _c("peak_rss_mb", "Peak RSS", "MB", "resource", 0, "resources plot"),
    _c("temp_start_c", "Temp start", "°C", "resource", 0, "resources"),
    _c("temp_end_c", "Temp end", "°C", "resource", 0, "resources"),
    _c("t_start", "Start", "unix s", "time", 0),
    _c("t_end", "End", "unix s", "time", 0),
    # the imp protocol (Imp Table 4: metrics.imp_metrics), then the dataset protocol (Xmodel-VLM Table 6: a whole
    # evaluation set through one loaded model; its set time is total_s)
    _c("t_ve_s", "T_VE", "s", "seconds", -1, "imp"),
    _c("s_prompt_tps", "S_prompt", "tokens/s", "rate", 1, "imp noisy"),
    _c("s_gen_tps", "S_gen", "tokens/s", "rate", 1, "imp noisy"),
    _c("t_total_s", "T_total", "s", "seconds", -1, "imp noisy"),
    _c("n_prompt", "N_prompt", "tokens", "count", 0, "imp"),
    _c("n_gen", "N_gen", "tokens", "count", 0, "imp"),
    _c("t_other_s", "T_other", "s", "seconds", 0, "imp"),
    _c("n_samples", "N_samples", "", "count", 0, "dataset"),
    _c("samples_tps", "Samples", "tokens/s", "rate", 1, "dataset noisy"),
    _c("p50_s", "p50 latency", "s", "seconds", -1, "dataset"),
    _c("p90_s", "p90 latency", "s", "seconds", -1, "dataset"),
    _c("p99_s", "p99 latency", "s", "seconds", -1, "dataset"),
)
BY_KEY: dict[str, Column] = {c.key: c for c in COLUMNS}
METRIC_KEYS: tuple[str, ...] = tuple(c.key for c in COLUMNS)
# the layouts: imp and dataset reproduce a paper table of their own; everything else is the MobileVLM papers'
LAYOUTS = ("papers", "imp", "dataset")
# the order of a layout's main table (the imp and dataset tables list their figures in the paper's order)
_LAYOUT_ORDER = {
    "imp": ("t_ve_s", "s_prompt_tps", "s_gen_tps", "t_total_s", "n_prompt", "n_gen", "t_other_s", "load_s"),
    "dataset": ("samples_tps", "total_s", "n_samples", "p50_s", "p90_s", "p99_s", "load_s"),
    # the papers' Total = Load + Tks_in/Eval_prompt + Tks_out/Sample + Tks_out/Eval + Other
    "decomposition": ("tks_in", "tks_out", "load_s", "prompt_s", "sample_s", "eval_s", "other_s", "total_s"),
}
IMP_KEYS = tuple(k for k in _LAYOUT_ORDER["imp"] if k != "load_s")
DATASET_KEYS = ("n_samples", "samples_tps", "p50_s", "p90_s", "p99_s")
RESOURCE_KEYS = tuple(c.key for c in COLUMNS if "resources" in c.views)


def keys(view: str) -> tuple[str, ...]:
    """The metric keys a view shows, in the table's order (a layout's main table: its paper's order)."""
    if view in _LAYOUT_ORDER:
        return _LAYOUT_ORDER[view]
    return tuple(c.key for c in COLUMNS if view in c.views)


def layout_of(protocols: Iterable[str]) -> str:
    """The layout of a set of groups: their one protocol's own paper table (imp, dataset), else ``papers``."""
    ps = set(protocols)
    p = ps.pop() if len(ps) == 1 else ""
    return p if p in ("imp", "dataset") else "papers"


def column(key: str) -> Column:
    """The column of a metric key; a key not in the table (a llama-bench test such as ``pp512_tps``) names itself."""
    if key in BY_KEY:
        return BY_KEY[key]
    if key.endswith("_tps"):
        return Column(key, key[: -len("_tps")], "tokens/s", "rate", 1)
    return Column(key, key, "", "rate", direction(key))


def direction(key: str) -> int:
    """+1 when more is better (tokens/s), -1 when less is better (s, ms), 0 when not a speed (token counts, readings,
    and ``other_s``: the papers' "Other" is what Total leaves over and may be negative). Keys outside the table
    (llama-bench's ``pp512_tps``, imported metrics) by their suffix."""
    if key in BY_KEY:
        return BY_KEY[key].direction
    if key.endswith(("_tps", "_ts")):
        return 1
    if key.endswith(("_s", "_ms", "_ns")):
        return -1
    return 0


def metric_name(key: str) -> tuple[str, str]:
    """(the paper's name, unit) of a metric key."""
    c = column(key)
    return c.name, c.unit


def resolve_metric(text: str) -> str | None:
    """A metric as a user writes it: its key (``eval_tps``), its name as tables show it (``Eval``, ``Eval_prompt``,
    ``Peak RSS``: case and spaces ignored) or its header (``Eval (tokens/s)``); None when nothing matches."""
    t = text.strip()
    if t in BY_KEY:
        return t
    norm = "".join(t.lower().split())
    for c in COLUMNS:
        if norm in ("".join(c.name.lower().split()), "".join(c.header.lower().split()), c.key.lower()):
            return c.key
    for c in COLUMNS:  # name (or short name) and unit, as the tables head their columns: "Eval tok/s", "VE ms"
        for name in {c.name, getattr(c, "short", None) or c.name}:
            named = "".join(f"{name}{c.unit}".lower().split())
            if norm in (named, named.replace("tokens/s", "tok/s")):
                return c.key
    return None


# --- settings: what a configuration is ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One setting of a configuration: ``key`` (its name in params, JSON and the history), ``short`` (how a row label
    says it: ``t=2``), ``header`` (a column's title), ``get(context)`` (its value from a record's context)."""

    key: str
    short: str
    header: str
    get: Callable[[Any], Any]


def _param(key: str) -> Callable[[Any], Any]:
    return lambda c: c.params.get(key)


SETTINGS: tuple[Setting, ...] = (
    Setting("device", "device", "Device", lambda c: c.device),
    Setting("protocol", "protocol", "Protocol", lambda c: c.protocol),
    Setting("model", "model", "Model", lambda c: c.label()),
    Setting("precision", "precision", "Precision", lambda c: c.precision),
    Setting("mmproj_precision", "mmproj", "mmproj", _param("mmproj_precision")),
    Setting("n_threads", "t", "Threads", _param("n_threads")),
    Setting("n_gpu_layers", "ngl", "GPU layers", _param("n_gpu_layers")),
    Setting("ctx_size", "c", "Context", _param("ctx_size")),
    Setting("n_batch", "b", "Batch", _param("n_batch")),
    Setting("n_ubatch", "ub", "Ubatch", _param("n_ubatch")),
    Setting("flash_attn", "fa", "Flash attn", _param("flash_attn")),
    Setting("type_k", "ctk", "KV K type", _param("type_k")),
    Setting("type_v", "ctv", "KV V type", _param("type_v")),
    Setting("cpu_mask", "C", "CPU mask", _param("cpu_mask")),
    Setting("cpu_strict", "cpu-strict", "CPU strict", _param("cpu_strict")),
    Setting("poll", "poll", "Poll", _param("poll")),
    Setting("prio", "prio", "Priority", _param("prio")),
    Setting("n_depth", "d", "Depth", _param("n_depth")),
    Setting("n_predict", "n", "Tokens out", _param("n_predict")),
    Setting("test", "test", "Test", _param("test")),
    Setting("ab_side", "side", "A/B side", _param("ab_side")),
    Setting("runtime", "llama.cpp", "llama.cpp", lambda c: c.runtime_commit[:10] if c.runtime_commit else ""),
    Setting("cpu_variant", "cpu", "CPU variant", _param("cpu_variant")),
)
SETTING_KEYS = tuple(s.key for s in SETTINGS)


def _shown(v: Any) -> str:
    return "" if v is None else (v if isinstance(v, str) else json.dumps(v, default=str))


def setting_text(v: Any) -> str:
    """A setting's value in a table cell: ``–`` for none, text as it is, anything else as JSON."""
    return _shown(v) or "–"


def differing(contexts: Sequence[Any], skip: Iterable[str] = ()) -> list[Setting]:
    """The settings whose values differ among these contexts (records' or history entries'): the columns a view adds so
    that no two configurations look alike. ``skip``: settings the view shows anyway (its Model or Device column)."""
    skipped = set(skip)
    return [s for s in SETTINGS if s.key not in skipped and len({_shown(s.get(c)) for c in contexts}) > 1]


def describe(context: Any, settings: Sequence[Setting]) -> str:
    """A configuration in a few words, only the given settings: ``t=2 ngl=0`` (a row's label suffix, a plot series)."""
    return " ".join(f"{s.short}={_shown(s.get(context)) or '–'}" for s in settings)


def finite(v: Any) -> float | None:
    """A metric value as JSON and the history hold it: a finite float, else None."""
    if v is None or isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        f = float(v)  # an int beyond a float's range overflows
    except OverflowError:
        return None
    return f if math.isfinite(f) else None
