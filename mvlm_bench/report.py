"""Latency reports in the MobileVLM papers' terms, from parsed llama.cpp timings.

The papers (MobileVLM Tables 5/6, MobileVLM V2 Table 5) report, per model and device: Sample, Eval_prompt and Eval in
tokens/s, Total in s (model loading included), VE (vision encoder) in ms per image patch, Eval_avg = Tks_out / Total
(V2), and explain Total as Load + Tks_in/Eval_prompt + Tks_out/Sample + Tks_out/Eval + Others. This module computes
those numbers per run, aggregates repetitions (median, min, max, stdev) and renders them four ways, so a benchmark
runner hands over its runs once and gets every view.

Usage::

    from mvlm_bench.report import Run, RunContext, render_table, render_markdown, render_csv, render_json
    from mvlm_bench.timings import parse_text

    ctx = RunContext(device="Snapdragon 888", model="MobileVLM-1.7B", precision="q4_k_s",
                     model_file="mobilevlm-1.7b.Q4_K_S.gguf", model_sha256="ab12...", size_bytes=1_400_000_000,
                     runtime_commit="0c1e570", runtime_patches=["0001-clip-cls-first.patch"], protocol="vlm",
                     params={"n_threads": 4, "n_predict": 256})
    runs = [Run(parse_text(log), ctx, tokens_out=256) for log in logs]     # one Run per repetition
    rich_console.print(render_table(runs)); print(render_markdown(runs))
    open("r.csv", "w").write(render_csv(runs)); open("r.json", "w").write(render_json(runs))

Runs whose contexts are equal form one group (one table row); each run in a group is a repetition.
Tks_out is ``Run.tokens_out`` when the runner knows it (e.g. ``-n 256 --ignore-eos``), else the record's
``eval_runs`` (llama-completion decodes one token fewer than it generates; the report says when it fell back).

Total is the paper's: the whole inference, model loading included. The best witness is the process's wall time,
measured by the runner (``Run.wall_s``). Without it, Total is rebuilt from llama.cpp's own numbers, whose "total
time" excludes loading in most programs since mid 2023 (common_init's warm-up decode is followed by
``llama_perf_context_reset``, common/common.cpp:1451) but includes it in llava-cli and in 2023's early main; see
:func:`paper_total_s`. Every run says which rule it used (``total_source``).

When: ``Run.ended_at`` is the unix time a repetition ended (a Run is made as its process exits). Each JSON record
carries its group's measurement time like llama-bench: ``test_time`` (ISO 8601 UTC of the first repetition's start)
plus ``start_time`` / ``end_time`` (unix seconds); ``mvlm history import`` stores the record at that time.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import json
import math
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

from mvlm_bench.timings import FIELDS, TimingRecord

# Per-run metrics, in report order: (key, paper name, unit).
METRICS: tuple[tuple[str, str, str], ...] = (
    ("ve_ms_per_patch", "VE", "ms/patch"),
    ("ve_ms", "VE total", "ms"),
    ("sample_tps", "Sample", "tokens/s"),
    ("prompt_tps", "Eval_prompt", "tokens/s"),
    ("eval_tps", "Eval", "tokens/s"),
    ("total_s", "Total", "s"),
    ("llama_total_s", "llama.cpp total", "s"),
    ("eval_avg", "Eval_avg", "tokens/s"),
    ("tks_in", "Tks_in", "tokens"),
    ("tks_out", "Tks_out", "tokens"),
    ("load_s", "Load", "s"),
    ("prompt_s", "Tks_in/Eval_prompt", "s"),
    ("sample_s", "Tks_out/Sample", "s"),
    ("eval_s", "Tks_out/Eval", "s"),
    ("other_s", "Other", "s"),
)
METRIC_KEYS = tuple(k for k, _, _ in METRICS)
STATS = ("median", "min", "max", "stdev")

# llama-bench field names: params with these names are promoted to the top level of the JSON rendering.
LLAMA_BENCH_FIELDS = (
    "build_commit", "build_number", "cpu_info", "gpu_info", "backends", "model_filename", "model_type", "model_size",
    "model_n_params", "n_batch", "n_ubatch", "n_threads", "cpu_mask", "cpu_strict", "poll", "type_k", "type_v",
    "n_gpu_layers", "n_cpu_moe", "split_mode", "main_gpu", "no_kv_offload", "flash_attn", "devices", "tensor_split",
    "tensor_buft_overrides", "load_mode", "use_mmap", "embeddings", "no_op_offload", "no_host", "repack", "n_prompt",
    "n_gen", "n_depth", "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "samples_ns", "samples_ts",
)  # fmt: skip


@dataclass
class RunContext:
    """What was measured where: everything a reader needs to reproduce or compare a row.

    ``params`` holds the run's parameters (n_threads, n_predict, n_gpu_layers, prompt, image, ...); keys that are
    llama-bench field names appear under those names in the JSON rendering.
    """

    device: str = ""
    model: str = ""
    precision: str = ""
    model_file: str = ""
    model_sha256: str = ""
    mmproj_file: str = ""
    mmproj_sha256: str = ""
    size_bytes: int | None = None  # LM file, plus the mmproj for a VLM (the papers' "Size")
    runtime_commit: str = ""
    runtime_patches: tuple[str, ...] | list[str] = ()
    protocol: str = ""
    cpu_info: str = ""
    gpu_info: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        """Identity of a group: two runs with equal keys are repetitions of one measurement."""
        d = dataclasses.asdict(self)
        d["runtime_patches"] = list(self.runtime_patches)
        return json.dumps(d, sort_keys=True, default=str)

    def label(self) -> str:
        return self.model or (self.model_file.rsplit("/", 1)[-1] if self.model_file else "?")


@dataclass
class Run:
    """One repetition: the parsed timings, where they came from, and (optionally) how many tokens were generated."""

    timing: TimingRecord
    context: RunContext = field(default_factory=RunContext)
    tokens_out: int | None = None
    wall_s: float | None = None  # process start to exit, measured by the runner: the paper's Total
    # unix time the repetition ended: a Run is made right after its process exited (bench.py), so the default is it
    ended_at: float = field(default_factory=time.time)


def measured_between(runs: Sequence[Run]) -> tuple[float, float]:
    """(start, end) unix times of a group of repetitions: the first one's end minus its Total (approximate over a
    link: llama.cpp's own total + load), and the last one's end."""
    starts = [r.ended_at - (paper_total_s(r)[0] or 0.0) for r in runs]
    return min(starts), max(r.ended_at for r in runs)


def iso_utc(t: float) -> str:
    """A unix time as llama-bench writes its ``test_time``: ISO 8601 UTC, e.g. 2026-01-01T12:00:00Z."""
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def paper_total_s(run: Run) -> tuple[float | None, str | None]:
    """The papers' Total (s, loading included) and the rule that produced it.

    1. ``wall``: the runner's wall-clock time for the whole process.
    2. ``llama.cpp total + load``: llama.cpp's total started after loading. That is so in the llama_perf and
       common_perf_print eras (warm-up, then the perf counters are reset; only ``--no-warmup`` changes this), and
       in llama_print_timings output whose total barely exceeds sample + prompt eval + eval (less than half the load
       time left over: the loading cannot be inside).
    3. ``llama.cpp total``: the total already covers loading (llava-cli, recognised by its CLIP line; main in early
       2023; any other output where the total leaves room for the load time).
    """
    t = run.timing
    if run.wall_s is not None:
        return run.wall_s, "wall"
    if t.total_ms is None:
        return None, None
    total = t.total_ms / 1000.0
    if t.load_ms is None:
        return total, "llama.cpp total"
    excludes_load = False
    if t.source_format in ("llama_perf", "common_perf_print"):
        excludes_load = True
    elif t.source_format == "llama_print_timings" and t.vision_ms_per_token is None:
        busy = sum(v for v in (t.sample_ms, t.prompt_eval_ms, t.eval_ms) if v is not None)
        excludes_load = t.total_ms - busy < 0.5 * t.load_ms
    if excludes_load:
        return total + t.load_ms / 1000.0, "llama.cpp total + load"
    return total, "llama.cpp total"


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def run_metrics(run: Run) -> dict[str, Any]:
    """The papers' numbers for one run (None where the timings lack what a metric needs).

    Decomposition terms follow the paper's formula literally (token counts divided by rates), so Other is
    whatever Total leaves over: tokenization, image preprocessing, printing. It goes negative when llama.cpp's
    load time overlaps the first prompt batch, as in llava-cli (no warm-up: load time is stamped after the
    first real decode, src/llama-context.cpp:795).
    """
    t = run.timing
    tks_in = t.prompt_tokens
    tks_out = run.tokens_out if run.tokens_out is not None else t.eval_runs
    total_s, total_source = paper_total_s(run)
    load_s = t.load_ms / 1000.0 if t.load_ms is not None else None
    prompt_s = _div(tks_in, t.prompt_tps)
    sample_s = _div(tks_out, t.sample_tps)
    eval_s = _div(tks_out, t.eval_tps)
    parts = (load_s, prompt_s, sample_s, eval_s)
    other_s = total_s - sum(parts) if total_s is not None and None not in parts else None  # type: ignore[arg-type]
    m = {
        "ve_ms_per_patch": t.vision_ms_per_token,
        "ve_ms": t.vision_encode_ms,
        "sample_tps": t.sample_tps,
        "prompt_tps": t.prompt_tps,
        "eval_tps": t.eval_tps,
        "total_s": total_s,
        "llama_total_s": t.total_ms / 1000.0 if t.total_ms is not None else None,
        "eval_avg": _div(tks_out, total_s),
        "tks_in": tks_in,
        "tks_out": tks_out,
        "load_s": load_s,
        "prompt_s": prompt_s,
        "sample_s": sample_s,
        "eval_s": eval_s,
        "other_s": other_s,
    }
    m["tks_out_source"] = "runner" if run.tokens_out is not None else ("eval_runs" if tks_out is not None else None)
    m["total_source"] = total_source
    return m


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


def aggregate(runs: Sequence[Run]) -> list[Group]:
    """Group runs by context (first-seen order) and aggregate every metric over the repetitions."""
    order: dict[str, list[Run]] = {}
    for r in runs:
        order.setdefault(r.context.key(), []).append(r)
    groups = []
    for rs in order.values():
        per = [run_metrics(r) for r in rs]
        agg = {k: stats(p[k] for p in per) for k in METRIC_KEYS}
        groups.append(Group(rs[0].context, rs, per, agg))
    return groups


# --- formatting ---------------------------------------------------------------------------------------------------
def _fmt(v: float | int | None, key: str = "") -> str:
    if v is None:
        return "–"
    if key in ("tks_in", "tks_out"):
        return f"{v:.0f}"
    a = abs(v)
    if key.endswith("_s") or key == "total_s":
        return f"{v:.2f}"
    if a >= 1000:
        return f"{v:.0f}"
    return f"{v:.2f}"


def _gb(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e9:.2f}"


def _has_vision(groups: Sequence[Group]) -> bool:
    return any(g.agg["ve_ms"]["n"] or g.agg["ve_ms_per_patch"]["n"] for g in groups)


_SHORT = {k: (n, u.replace("tokens/s", "tok/s")) for k, n, u in METRICS} | {"ve_ms": ("VE", "ms")}


def render_table(runs: Sequence[Run], title: str | None = "Latency (medians over repetitions)") -> Table:
    """A rich Table, one row per group: medians, with min–max under them when repetitions differ.

    The Total decomposition is in :func:`render_markdown` / CSV / JSON; the table is the at-a-glance view."""
    groups = aggregate(runs)
    vision = _has_vision(groups)
    table = Table(title=title)
    for name in ("Model", "Hardware", "Precision", "Size (GB)", "Reps"):
        table.add_column(name, justify="right" if name in ("Size (GB)", "Reps") else "left", overflow="fold")
    keys = [k for k in ("ve_ms_per_patch", "ve_ms") if vision] + [
        "sample_tps", "prompt_tps", "eval_tps", "total_s", "eval_avg",
    ]  # fmt: skip
    for k in keys:
        name, unit = _SHORT[k]
        table.add_column(f"{name}\n{unit}", justify="right", overflow="fold")
    for g in groups:
        cells = [g.context.label(), g.context.device, g.context.precision, _gb(g.context.size_bytes), str(len(g.runs))]
        for k in keys:
            a = g.agg[k]
            cell = _fmt(a["median"], k)
            if a["n"] and a["n"] > 1 and a["min"] != a["max"]:
                cell += f"\n[dim]{_fmt(a['min'], k)}–{_fmt(a['max'], k)}[/dim]"
            cells.append(cell)
        table.add_row(*cells)
    return table


def _md_row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def render_markdown(runs: Sequence[Run]) -> str:
    """Markdown in the layout of the papers' tables, then the Total decomposition, spread and provenance.

    Without vision timings: MobileVLM Table 5 (Model | Hardware | Precision | Size | Sample | Eval_prompt | Eval |
    Total); with them: Table 6 (VE in ms/patch before Sample). Eval_avg (V2 Table 5) closes both. Cells are medians.
    """
    groups = aggregate(runs)
    if not groups:
        return "_no runs_\n"
    vision = _has_vision(groups)
    head = ["Model", "Hardware"] + ([] if vision else ["Precision"]) + ["Size (GB)"]
    head += ["VE (ms/patch)"] if vision else []
    head += ["Sample (tokens/s)", "Eval_prompt (tokens/s)", "Eval (tokens/s)", "Total (s)", "Eval_avg (tokens/s)"]
    keys = (["ve_ms_per_patch"] if vision else []) + ["sample_tps", "prompt_tps", "eval_tps", "total_s", "eval_avg"]
    lines = [_md_row(head), _md_row(["---"] * (len(head) - len(keys) - 1) + ["---:"] * (len(keys) + 1))]
    for g in groups:
        c = g.context
        row = [c.label(), c.device] + ([] if vision else [c.precision]) + [_gb(c.size_bytes)]
        row += [_fmt(g.median(k), k) for k in keys]
        lines.append(_md_row(row))
    reps = sorted({len(g.runs) for g in groups})
    lines.append("")
    lines.append(
        f"Medians over {'/'.join(map(str, reps))} repetition(s). Sample, Eval_prompt, Eval and Eval_avg in tokens/s; "
        "Total in s, model loading included; Eval_avg = Tks_out / Total."
        + (" VE = vision-encoder time per image patch (token)." if vision else "")
    )

    lines += ["", "Total = Load + Tks_in/Eval_prompt + Tks_out/Sample + Tks_out/Eval + Other (s, medians):", ""]
    dkeys = ["tks_in", "tks_out", "load_s", "prompt_s", "sample_s", "eval_s", "other_s", "total_s"]
    dhead = ["Model", "Hardware", "Tks_in", "Tks_out", "Load", "Tks_in/Eval_prompt", "Tks_out/Sample",
             "Tks_out/Eval", "Other", "Total"]  # fmt: skip
    lines += [_md_row(dhead), _md_row(["---"] * 2 + ["---:"] * len(dkeys))]
    for g in groups:
        lines.append(_md_row([g.context.label(), g.context.device] + [_fmt(g.median(k), k) for k in dkeys]))

    lines += ["", "Spread over repetitions (min–max, sample stdev):", ""]
    skeys = (["ve_ms_per_patch"] if vision else []) + ["sample_tps", "prompt_tps", "eval_tps", "total_s"]
    names = {k: f"{n} ({u})" for k, n, u in METRICS}
    lines += [_md_row(["Model", "Hardware", "Reps"] + [names[k] for k in skeys])]
    lines += [_md_row(["---"] * 2 + ["---:"] * (len(skeys) + 1))]
    for g in groups:
        cells = []
        for k in skeys:
            a = g.agg[k]
            sd = "" if a["stdev"] is None else f", sd {_fmt(a['stdev'], k)}"
            cells.append("–" if a["n"] == 0 else f"{_fmt(a['min'], k)}–{_fmt(a['max'], k)}{sd}")
        lines.append(_md_row([g.context.label(), g.context.device, str(len(g.runs))] + cells))

    lines += ["", "Provenance:", ""]
    for g in groups:
        c = g.context
        bits = [f"**{c.label()}** on {c.device or '?'}"]
        if c.runtime_commit:
            patches = ", ".join(c.runtime_patches) if c.runtime_patches else "no patches"
            bits.append(f"llama.cpp {c.runtime_commit} ({patches})")
        if c.model_file:
            bits.append(f"`{c.model_file}`" + (f" sha256 {c.model_sha256}" if c.model_sha256 else ""))
        if c.mmproj_file:
            bits.append(f"mmproj `{c.mmproj_file}`" + (f" sha256 {c.mmproj_sha256}" if c.mmproj_sha256 else ""))
        if c.protocol:
            bits.append(f"protocol {c.protocol}")
        if c.params:
            shown = (f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in sorted(c.params.items()))
            bits.append("params " + ", ".join(shown))
        fmts = sorted({r.timing.source_format for r in g.runs})
        bits.append("output format " + "/".join(fmts))
        if any(p["tks_out_source"] == "eval_runs" for p in g.per_run):
            bits.append("Tks_out taken from llama.cpp's eval count")
        sources = sorted({p["total_source"] for p in g.per_run if p["total_source"]})
        if sources:
            bits.append("Total from " + " / ".join(sources))
        lines.append("- " + "; ".join(bits))
    return "\n".join(lines) + "\n"


def _context_columns(c: RunContext) -> dict[str, Any]:
    return {
        "device": c.device,
        "model": c.label(),
        "precision": c.precision,
        "model_filename": c.model_file,
        "model_sha256": c.model_sha256,
        "mmproj_filename": c.mmproj_file,
        "mmproj_sha256": c.mmproj_sha256,
        "model_size": c.size_bytes,
        "build_commit": c.runtime_commit,
        "runtime_patches": ";".join(c.runtime_patches),
        "protocol": c.protocol,
        "cpu_info": c.cpu_info,
        "gpu_info": c.gpu_info,
        "params": json.dumps(c.params, sort_keys=True, default=str),
    }


def render_csv(runs: Sequence[Run], aggregated: bool = False) -> str:
    """CSV: one row per run (repetition index, metrics, raw timing fields), or per group with metric_{stat} columns."""
    groups = aggregate(runs)
    buf = io.StringIO()
    if aggregated:
        cols = list(_context_columns(RunContext())) + ["repetitions"]
        cols += [f"{k}_{s}" for k in METRIC_KEYS for s in STATS]
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for g in groups:
            row = _context_columns(g.context) | {"repetitions": len(g.runs)}
            row |= {f"{k}_{s}": g.agg[k][s] for k in METRIC_KEYS for s in STATS}
            w.writerow(row)
        return buf.getvalue()
    cols = list(_context_columns(RunContext())) + ["repetition", "source_format"] + list(METRIC_KEYS) + list(FIELDS)
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for g in groups:
        for i, (r, m) in enumerate(zip(g.runs, g.per_run, strict=True)):
            row = _context_columns(g.context) | {"repetition": i, "source_format": r.timing.source_format}
            row |= {k: m[k] for k in METRIC_KEYS}
            row |= {f: getattr(r.timing, f) for f in FIELDS}
            w.writerow(row)
    return buf.getvalue()


def _bench_samples(g: Group) -> dict[str, Any]:
    """llama-bench's pp+tg view of the runs: tokens decoded (prompt + generated) per decode time."""
    ns, ts = [], []
    for r in g.runs:
        t = r.timing
        if None in (t.prompt_eval_ms, t.eval_ms, t.prompt_tokens, t.eval_runs):
            continue
        ms = t.prompt_eval_ms + t.eval_ms  # type: ignore[operator]
        if ms <= 0:
            continue
        ns.append(int(round(ms * 1e6)))
        ts.append((t.prompt_tokens + t.eval_runs) * 1000.0 / ms)  # type: ignore[operator]
    if not ns:
        return {}
    sd = statistics.stdev if len(ns) > 1 else (lambda _xs: 0.0)
    return {
        "avg_ns": int(round(statistics.mean(ns))),
        "stddev_ns": int(round(sd(ns))),
        "avg_ts": statistics.mean(ts),
        "stddev_ts": sd(ts),
        "samples_ns": ns,
        "samples_ts": ts,
    }


def _common(values: Iterable[Any]) -> Any:
    vs = {v for v in values if v is not None}
    return vs.pop() if len(vs) == 1 else (None if not vs else statistics.median(vs))


def report_records(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """The JSON rendering as Python objects: one record per group, llama-bench names where they overlap."""
    out = []
    for g in aggregate(runs):
        c = g.context
        rec: dict[str, Any] = {
            "build_commit": c.runtime_commit or None,
            "cpu_info": c.cpu_info or None,
            "gpu_info": c.gpu_info or None,
            "model_filename": c.model_file or None,
            "model_size": c.size_bytes,
        }
        rec |= {k: v for k, v in c.params.items() if k in LLAMA_BENCH_FIELDS}
        start, end = measured_between(g.runs)
        # when it was measured: llama-bench's field name (its first repetition's start), plus unix start/end times;
        # `mvlm history import` stores the measurement at this time
        rec["test_time"] = iso_utc(start)
        rec["start_time"], rec["end_time"] = round(start, 3), round(end, 3)
        n_prompt = _common(r.timing.prompt_tokens for r in g.runs)
        n_gen = _common(r.timing.eval_runs for r in g.runs)
        rec["n_prompt"], rec["n_gen"], rec["n_depth"] = n_prompt, n_gen, 0
        if n_prompt is not None and n_gen is not None:
            rec["test"] = f"pp{n_prompt}+tg{n_gen}"
        rec |= _bench_samples(g)
        rec |= {
            "device": c.device,
            "model": c.label(),
            "precision": c.precision or None,
            "model_sha256": c.model_sha256 or None,
            "mmproj_filename": c.mmproj_file or None,
            "mmproj_sha256": c.mmproj_sha256 or None,
            "runtime_patches": list(c.runtime_patches),
            "protocol": c.protocol or None,
            "params": c.params,
            "repetitions": len(g.runs),
            "metrics": {k: g.agg[k] for k in METRIC_KEYS},
            "runs": [
                {"repetition": i, "metrics": m, "timing": r.timing.to_dict()}
                for i, (r, m) in enumerate(zip(g.runs, g.per_run, strict=True))
            ],
        }
        out.append(rec)
    return out


def render_json(runs: Sequence[Run]) -> str:
    """JSON: a list like llama-bench's ``-o json`` (avg_ts etc. describe the pp+tg decode), plus the papers' metrics."""
    return json.dumps(report_records(runs), indent=2, default=str, allow_nan=False) + "\n"


def render_all(runs: Sequence[Run]) -> dict[str, Any]:
    """Every rendering at once: {'table': rich Table, 'markdown': str, 'csv': str, 'csv_aggregated': str, 'json': str}."""
    return {
        "table": render_table(runs),
        "markdown": render_markdown(runs),
        "csv": render_csv(runs),
        "csv_aggregated": render_csv(runs, aggregated=True),
        "json": render_json(runs),
    }
