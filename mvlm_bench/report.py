"""Latency reports in the MobileVLM papers' terms: the records of ``mvlm_bench.records`` rendered four ways.

A benchmark runner hands over its runs once and gets every view: a rich table, Markdown, CSV (per run or aggregated)
and JSON (llama-bench's ``-o json`` fields where they overlap, plus the papers' metrics). Runs whose contexts are
equal form one group (one table row); each run in a group is a repetition (``records.aggregate``).

Usage::

    from mvlm_bench.records import Run, RunContext
    from mvlm_bench.report import render_table, render_markdown, render_csv, render_json
    from mvlm_bench.timings import parse_text

    ctx = RunContext(device="Snapdragon 888", model="MobileVLM-1.7B", precision="q4_k_s",
                     model_file="mobilevlm-1.7b.Q4_K_S.gguf", model_sha256="ab12...", size_bytes=1_400_000_000,
                     runtime_commit="0c1e570", runtime_patches=["0001-clip-cls-first.patch"], protocol="vlm",
                     params={"n_threads": 4, "n_predict": 256})
    runs = [Run(parse_text(log), ctx, tokens_out=256) for log in logs]     # one Run per repetition
    rich_console.print(render_table(runs)); print(render_markdown(runs))
    open("r.csv", "w").write(render_csv(runs)); open("r.json", "w").write(render_json(runs))
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from rich.table import Table

from mvlm_bench.records import (
    METRIC_KEYS,
    METRICS,
    RESOURCE_KEYS,
    STATS,
    Group,
    Run,
    RunContext,
    aggregate,
    iso_utc,
    measured_between,
)
from mvlm_bench.timings import FIELDS

# llama-bench's JSON fields, in its order (the pinned llama.cpp's tools/llama-bench/llama-bench.cpp, test::get_fields,
# then samples_ns / samples_ts); scripts/compare-llama-bench.py's LLAMA_BENCH_DB_FIELDS are all among them. Every
# record of the JSON report carries every one of them (null where the run did not say).
LLAMA_BENCH_FIELDS = (
    "build_commit", "build_number", "cpu_info", "gpu_info", "backends", "model_filename", "model_type", "model_size",
    "model_n_params", "n_batch", "n_ubatch", "n_threads", "cpu_mask", "cpu_strict", "poll", "type_k", "type_v",
    "n_gpu_layers", "n_cpu_moe", "split_mode", "main_gpu", "no_kv_offload", "flash_attn", "devices", "tensor_split",
    "tensor_buft_overrides", "load_mode", "lazy_mode", "embeddings", "no_op_offload", "no_host", "repack",
    "fit_target", "fit_min_ctx", "n_prompt", "n_gen", "n_depth", "test_time", "avg_ns", "stddev_ns", "avg_ts",
    "stddev_ts", "samples_ns", "samples_ts",
)  # fmt: skip


# --- formatting ---------------------------------------------------------------------------------------------------
def _fmt(v: float | int | None, key: str = "") -> str:
    if v is None:
        return "–"
    if key in ("tks_in", "tks_out", "n_prompt", "n_gen", "n_samples"):
        return f"{v:.0f}"
    if key in RESOURCE_KEYS:
        return f"{v:.1f}"
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


# The layouts of the protocols that reproduce one paper table each: Imp Table 4 (T_VE, S_prompt, S_gen, T_total;
# then the terms of its Eq. (1)) and Xmodel-VLM Table 6 (Samples, Total; then the set's size and latency percentiles).
PROTOCOL_LAYOUT: dict[str, tuple[str, ...]] = {
    "imp": ("t_ve_s", "s_prompt_tps", "s_gen_tps", "t_total_s", "n_prompt", "n_gen", "t_other_s", "load_s"),
    "dataset": ("samples_tps", "total_s", "n_samples", "p50_s", "p90_s", "p99_s", "load_s"),
}


def _layout(groups: Sequence[Group]) -> tuple[str, ...] | None:
    """The paper-table layout when every group is of one protocol that has one (imp, dataset), else None."""
    protocols = {g.context.protocol for g in groups}
    return PROTOCOL_LAYOUT.get(protocols.pop()) if len(protocols) == 1 else None


SWEPT_PARAMS = (("n_threads", "t"), ("n_gpu_layers", "ngl"), ("ctx_size", "c"))


def _label(g: Group, groups: Sequence[Group]) -> str:
    """A row's model name; when the rows differ in threads, GPU layers or context size (an ``mvlm bench`` sweep),
    with those values too (``SmolLM2 t=2 ngl=0``), so that every configuration's row says which it is."""
    shown = [(k, short) for k, short in SWEPT_PARAMS if len({str(x.context.params.get(k)) for x in groups}) > 1]
    extra = " ".join(f"{short}={g.context.params.get(k)}" for k, short in shown)
    return f"{g.context.label()} {extra}" if extra else g.context.label()


def render_table(runs: Sequence[Run], title: str | None = "Latency (medians over repetitions)") -> Table:
    """A rich Table, one row per group: medians, with min–max under them when repetitions differ.

    The Total decomposition is in :func:`render_markdown` / CSV / JSON; the table is the at-a-glance view. Runs of the
    imp or dataset protocol get their paper table's columns (``PROTOCOL_LAYOUT``)."""
    groups = aggregate(runs)
    vision = _has_vision(groups)
    table = Table(title=title)
    for name in ("Model", "Hardware", "Precision", "Size (GB)", "Reps"):
        table.add_column(name, justify="right" if name in ("Size (GB)", "Reps") else "left", overflow="fold")
    keys = list(_layout(groups) or [k for k in ("ve_ms_per_patch", "ve_ms") if vision] + [
        "sample_tps", "prompt_tps", "eval_tps", "total_s", "eval_avg",
    ])  # fmt: skip
    keys += [k for k in RESOURCE_KEYS if any(g.agg[k]["n"] for g in groups)]  # measured on the device (bench.py)
    for k in keys:
        name, unit = _SHORT[k]
        table.add_column(f"{name}\n{unit}", justify="right", overflow="fold")
    for g in groups:
        cells = [_label(g, groups), g.context.device, g.context.precision, _gb(g.context.size_bytes), str(len(g.runs))]
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
    if _layout(groups):
        return _render_protocol_markdown(groups)
    vision = _has_vision(groups)
    head = ["Model", "Hardware"] + ([] if vision else ["Precision"]) + ["Size (GB)"]
    head += ["VE (ms/patch)"] if vision else []
    head += ["Sample (tokens/s)", "Eval_prompt (tokens/s)", "Eval (tokens/s)", "Total (s)", "Eval_avg (tokens/s)"]
    keys = (["ve_ms_per_patch"] if vision else []) + ["sample_tps", "prompt_tps", "eval_tps", "total_s", "eval_avg"]
    lines = [_md_row(head), _md_row(["---"] * (len(head) - len(keys) - 1) + ["---:"] * (len(keys) + 1))]
    for g in groups:
        c = g.context
        row = [_label(g, groups), c.device] + ([] if vision else [c.precision]) + [_gb(c.size_bytes)]
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
        lines.append(_md_row([_label(g, groups), g.context.device] + [_fmt(g.median(k), k) for k in dkeys]))

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
        lines.append(_md_row([_label(g, groups), g.context.device, str(len(g.runs))] + cells))

    rkeys = [k for k in RESOURCE_KEYS if any(g.agg[k]["n"] for g in groups)]
    if rkeys:
        lines += ["", "On the device (median, min–max over repetitions): peak RSS of the llama.cpp process (VmHWM; "
                  "under an emulator, the emulator's process) and the hottest thermal zone before and after each run:", ""]
        lines += [_md_row(["Model", "Hardware"] + [names[k] for k in rkeys]), _md_row(["---"] * 2 + ["---:"] * len(rkeys))]
        for g in groups:
            cells = []
            for k in rkeys:
                a = g.agg[k]
                cells.append("–" if a["n"] == 0 else f"{_fmt(a['median'], k)} ({_fmt(a['min'], k)}–{_fmt(a['max'], k)})")
            lines.append(_md_row([_label(g, groups), g.context.device] + cells))
    elif any(r.started_at is not None for g in groups for r in g.runs):
        lines += ["", "On the device: no peak RSS or temperature reading (no /proc, no thermal zones)."]

    lines += ["", "Provenance:", ""]
    for g in groups:
        c = g.context
        bits = [f"**{_label(g, groups)}** on {c.device or '?'}"]
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


_PROTOCOL_NOTES = {
    "imp": "Imp Table 4's layout. Model loading excluded: T_total runs from the end of loading (llama-mtmd-cli's "
           "\"main: loading model:\" line) to its perf block, by the log's timestamps; T_VE = the image encode time; "
           "S_prompt / S_gen = llama.cpp's prompt eval / eval rates; N_prompt = the text tokens (chat template "
           "included) plus the image embeddings; T_other = T_total - T_VE - N_prompt/S_prompt - N_gen/S_gen; Load = "
           "llama.cpp's load time (the LM only), shown apart.",
    "dataset": "Xmodel-VLM Table 6's layout. Samples = generated tokens / generation time over the whole set "
               "(llama-server's predicted_n / predicted_ms); Total = the whole set, first request to last answer "
               "(model loading, shown as Load, excluded); p50/p90/p99 = per-sample latencies.",
}


def _render_protocol_markdown(groups: Sequence[Group]) -> str:
    """Markdown in the layout of the paper table an imp or dataset measurement reproduces, then provenance."""
    protocol = groups[0].context.protocol
    keys = PROTOCOL_LAYOUT[protocol]
    names = {k: f"{n} ({u})" if u else n for k, n, u in METRICS}
    names["load_s"] = "Load (s)"
    head = ["Model", "Hardware", "Precision", "Size (GB)"] + [names[k] for k in keys]
    lines = [_md_row(head), _md_row(["---"] * 3 + ["---:"] * (len(keys) + 1))]
    for g in groups:
        c = g.context
        lines.append(_md_row([c.label(), c.device, c.precision, _gb(c.size_bytes)] + [_fmt(g.median(k), k) for k in keys]))
    reps = sorted({len(g.runs) for g in groups})
    lines += ["", f"Medians over {'/'.join(map(str, reps))} repetition(s). {_PROTOCOL_NOTES[protocol]}", ""]
    lines += ["Provenance:", ""]
    for g in groups:
        c = g.context
        shown = ", ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in sorted(c.params.items()))
        lines.append(f"- **{c.label()}** on {c.device or '?'}; llama.cpp {c.runtime_commit or '?'}; `{c.model_file}`"
                     + (f" + `{c.mmproj_file}`" if c.mmproj_file else "") + f"; params {shown}")
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
    # llama-bench's own forms: whole nanoseconds, rates from each sample
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


def _llama_bench_fields(g: Group) -> dict[str, Any]:
    """A group as one llama-bench test: every field of ``LLAMA_BENCH_FIELDS``, in its order.

    The test is llama-bench's prompt+generation one (``-pg``: ``n_prompt`` tokens decoded as the prompt, then
    ``n_gen`` generated; t/s = (n_prompt + n_gen) / time), one sample per repetition: n_prompt is llama.cpp's prompt
    eval count, n_gen its eval count, the time prompt eval + eval (loading, sampling and printing left out, as in
    llama-bench). The other fields are what the run said about itself (Run.facts: its log, the device's binary and
    /proc/cpuinfo, the GGUF), else the context (build commit, CPU, model file)."""
    c = g.context
    facts: dict[str, Any] = {}
    for r in g.runs:
        for k, v in r.facts.items():
            facts.setdefault(k, v)
    rec: dict[str, Any] = dict.fromkeys(LLAMA_BENCH_FIELDS)
    rec |= {"build_commit": c.runtime_commit or None, "cpu_info": c.cpu_info or None, "gpu_info": c.gpu_info or None,
            "model_filename": c.model_file or None}
    rec |= {k: v for k, v in c.params.items() if k in LLAMA_BENCH_FIELDS}
    rec |= {k: v for k, v in facts.items() if k in LLAMA_BENCH_FIELDS and v is not None}
    if c.cpu_info:  # read on the device: it wins over anything else
        rec["cpu_info"] = c.cpu_info
    start, _ = measured_between(g.runs)
    rec["test_time"] = iso_utc(start)
    rec["n_prompt"] = _common(r.timing.prompt_tokens for r in g.runs)
    rec["n_gen"] = _common(r.timing.eval_runs for r in g.runs)
    rec["n_depth"] = 0
    rec |= _bench_samples(g)
    return rec


def report_records(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """The JSON rendering as Python objects: one record per group, every llama-bench field (in llama-bench's order)
    and then mvlm's own fields."""
    out = []
    for g in aggregate(runs):
        c = g.context
        rec = _llama_bench_fields(g)
        start, end = measured_between(g.runs)
        # when it was measured: llama-bench's test_time (its first repetition's start), plus unix start/end times;
        # `mvlm history import` stores the measurement at this time
        rec["start_time"], rec["end_time"] = round(start, 3), round(end, 3)
        if rec["n_prompt"] is not None and rec["n_gen"] is not None:
            rec["test"] = f"pp{rec['n_prompt']}+tg{rec['n_gen']}"
        rec |= {
            "device": c.device,
            "model": c.label(),
            "precision": c.precision or None,
            "model_sha256": c.model_sha256 or None,
            "file_size": c.size_bytes,
            "mmproj_filename": c.mmproj_file or None,
            "mmproj_sha256": c.mmproj_sha256 or None,
            "runtime_patches": list(c.runtime_patches),
            "protocol": c.protocol or None,
            "params": c.params,
            "repetitions": len(g.runs),
            "metrics": {k: g.agg[k] for k in METRIC_KEYS},
            "runs": [
                {"repetition": i, "t_start": m["t_start"], "t_end": m["t_end"], "peak_rss_mb": m["peak_rss_mb"],
                 "temp_start_c": m["temp_start_c"], "temp_end_c": m["temp_end_c"], "metrics": m,
                 "timing": r.timing.to_dict()}
                for i, (r, m) in enumerate(zip(g.runs, g.per_run, strict=True))
            ],
        }
        for run_rec, r in zip(rec["runs"], g.runs, strict=True):
            if r.per_sample:  # the dataset protocol: every sample's latency and server timings
                run_rec["per_sample"] = r.per_sample
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
