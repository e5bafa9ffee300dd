"""Groups of records as files for machines: CSV (one row per repetition, or per group), JSON (one record per group:
every llama-bench field in llama-bench's order, then mvlm's own) and JSON Lines (one record per repetition, the same
shape with one run). ``mvlm history import`` reads the JSON and JSON Lines back into exactly the entries ``--save``
stores (the label and mvlm's commit travel with them).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from mvlm_bench.records.columns import METRIC_KEYS, SETTINGS
from mvlm_bench.records.groups import STATS, Group
from mvlm_bench.records.metrics import iso_utc, measured_between
from mvlm_bench.records.record import RunContext
from mvlm_bench.records.timings import FIELDS

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
# raw timing fields a CSV row carries beside the metrics (those the metrics do not already hold)
_TIMING_ONLY = tuple(f for f in FIELDS if f not in METRIC_KEYS)


def _context_columns(c: RunContext) -> dict[str, Any]:
    cols = {"device": c.device, "model": c.label(), "precision": c.precision, "model_filename": c.model_file,
            "model_sha256": c.model_sha256, "mmproj_filename": c.mmproj_file, "mmproj_sha256": c.mmproj_sha256,
            "model_size": c.size_bytes, "build_commit": c.runtime_commit, "runtime_patches": ";".join(c.runtime_patches),
            "protocol": c.protocol, "cpu_info": c.cpu_info, "gpu_info": c.gpu_info}
    cols |= {s.key: s.get(c) for s in SETTINGS if s.key not in cols and s.key not in ("runtime", "model")}
    cols["params"] = json.dumps(c.params, sort_keys=True, default=str)
    return cols


def render_csv(groups: Sequence[Group], aggregated: bool = False) -> str:
    """CSV: one row per repetition (its configuration's settings, metrics and the raw timing fields not among them), or
    one per group with metric_{stat} columns."""
    buf = io.StringIO()
    head = list(_context_columns(RunContext()))
    if aggregated:
        w = csv.DictWriter(buf, fieldnames=head + ["repetitions"] + [f"{k}_{s}" for k in METRIC_KEYS for s in STATS],
                           lineterminator="\n")
        w.writeheader()
        for g in groups:
            row = _context_columns(g.context) | {"repetitions": len(g.runs)}
            w.writerow(row | {f"{k}_{s}": g.agg[k][s] for k in METRIC_KEYS for s in STATS})
        return buf.getvalue()
    w = csv.DictWriter(buf, fieldnames=head + ["repetition", "source_format", *METRIC_KEYS, *_TIMING_ONLY],
                       lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for g in groups:
        for i, (r, m) in enumerate(zip(g.runs, g.per_run, strict=True)):
            row = _context_columns(g.context) | {"repetition": i, "source_format": r.timing.source_format}
            w.writerow(row | {k: m[k] for k in METRIC_KEYS} | {f: getattr(r.timing, f) for f in _TIMING_ONLY})
    return buf.getvalue()


def _bench_samples(g: Group) -> dict[str, Any]:
    """llama-bench's view of the runs: tokens decoded (prompt + generated) per decode time, one sample a repetition."""
    ns, ts = [], []
    for r in g.runs:
        t = r.timing
        parts = [(n, ms) for n, ms in ((t.prompt_tokens, t.prompt_eval_ms), (t.eval_runs, t.eval_ms))
                 if n is not None and ms is not None]
        if not parts and t.total_ms is not None and t.source_format.startswith("llama-bench"):
            parts = [(t.total_tokens, t.total_ms)]  # a llama-bench pp+tg test
        ms = sum(x for _, x in parts)
        if not parts or ms <= 0 or any(n is None for n, _ in parts):
            continue
        ns.append(int(round(ms * 1e6)))
        ts.append(sum(n for n, _ in parts) * 1000.0 / ms)
    if not ns:
        return {}
    sd = statistics.stdev if len(ns) > 1 else (lambda _xs: 0.0)
    return {"avg_ns": int(round(statistics.mean(ns))), "stddev_ns": int(round(sd(ns))), "avg_ts": statistics.mean(ts),
            "stddev_ts": sd(ts), "samples_ns": ns, "samples_ts": ts}


def _common(values: Iterable[Any]) -> Any:
    vs = {v for v in values if v is not None}
    return vs.pop() if len(vs) == 1 else (None if not vs else statistics.median(vs))


def _llama_bench_fields(g: Group) -> dict[str, Any]:
    """A group as one llama-bench test: every field of ``LLAMA_BENCH_FIELDS``, in its order.

    A papers' protocol run is llama-bench's prompt+generation test (``-pg``): ``n_prompt`` tokens decoded as the
    prompt, then ``n_gen`` generated (llama.cpp's prompt eval and eval counts; t/s over prompt eval + eval time,
    loading and sampling left out, as in llama-bench); a llama-bench record is its own test. The other fields are what
    the run said about itself (Run.facts: its log, the device's binary and /proc/cpuinfo, the GGUF), else the
    context (build commit, CPU, model file)."""
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
    if c.model_file:  # the file the user gave, as the history stores it (llama-bench names the device's copy)
        rec["model_filename"] = c.model_file
    rec["test_time"] = iso_utc(measured_between(g.runs)[0])
    if "n_prompt" in c.params and "n_gen" in c.params:  # a llama-bench test says which it is
        rec["n_prompt"], rec["n_gen"] = c.params["n_prompt"], c.params["n_gen"]
    else:
        rec["n_prompt"] = _common(r.timing.prompt_tokens for r in g.runs)
        rec["n_gen"] = _common(r.timing.eval_runs for r in g.runs)
    rec["n_depth"] = c.params.get("n_depth", 0)
    return rec | _bench_samples(g)


def report_records(groups: Sequence[Group], label: str = "", project: tuple[str, bool | None] = ("", None)) \
        -> list[dict[str, Any]]:
    """The JSON report as Python objects: one record per group, every llama-bench field (in llama-bench's order) and
    then mvlm's own, with the label and mvlm's commit (``project``) the history would store with it."""
    out = []
    for g in groups:
        c = g.context
        rec = _llama_bench_fields(g)
        start, end = measured_between(g.runs)
        # when it was measured: llama-bench's test_time (its first repetition's start), plus unix start/end times;
        # `mvlm history import` stores the measurement at this time
        rec["start_time"], rec["end_time"] = round(start, 3), round(end, 3)
        if rec["n_prompt"] is not None and rec["n_gen"] is not None:
            rec["test"] = c.params.get("test") or f"pp{rec['n_prompt']}+tg{rec['n_gen']}"
        rec |= {"device": c.device, "model": c.label(), "precision": c.precision or None,
                "model_sha256": c.model_sha256 or None, "file_size": c.size_bytes,
                "mmproj_filename": c.mmproj_file or None, "mmproj_sha256": c.mmproj_sha256 or None,
                "runtime_patches": list(c.runtime_patches), **_cpu_fields(g),
                "protocol": c.protocol or None, "params": c.params,
                "label": label, "project_commit": project[0], "project_dirty": project[1],
                "repetitions": len(g.runs), "repetitions_planned": c.params.get("repetitions_planned"),
                "noisy": bool(g.noisy()), "noisy_cv": g.noisy(),
                "metrics": dict(g.agg), "runs": _runs(g)}
        out.append(rec)
    return out


CPU_FIELDS = ("cpu_variant", "cpu_variant_source", "cpu_kernels", "cpu_features", "cpu_features_source")


def _cpu_fields(g: Group) -> dict[str, Any]:
    """The build's CPU variant (``cpu_variant_source``: system_info, llama.cpp's own line of the run, else build, the
    build's manifest) and kernels, and the device's CPU features (mvlm_bench.device.cpu_features): the first run's
    that says each."""
    out: dict[str, Any] = dict.fromkeys(CPU_FIELDS)
    for r in g.runs:
        for k in CPU_FIELDS:
            if out[k] is None and r.facts.get(k) is not None:
                out[k] = r.facts[k]
    return out


def _runs(g: Group) -> list[dict[str, Any]]:
    out = []
    for i, (r, m) in enumerate(zip(g.runs, g.per_run, strict=True)):
        rec = {"repetition": i, "t_start": m["t_start"], "t_end": m["t_end"], "peak_rss_mb": m["peak_rss_mb"],
               "rss_source": m["rss_source"], "total_source": m["total_source"],
               "temp_start_c": m["temp_start_c"], "temp_end_c": m["temp_end_c"], "metrics": m,
               "timing": r.timing.to_dict()}
        if r.per_sample:  # the dataset protocol: every sample's latency and server timings
            rec["per_sample"] = r.per_sample
        out.append(rec)
    return out


def render_json(groups: Sequence[Group], label: str = "", project: tuple[str, bool | None] = ("", None)) -> str:
    """JSON: a list like llama-bench's ``-o json`` (avg_ts etc. describe the pp+tg decode), plus the papers' metrics."""
    return json.dumps(report_records(groups, label, project), indent=2, default=str, allow_nan=False) + "\n"


def render_json_line(group: Group, label: str = "", project: tuple[str, bool | None] = ("", None),
                     repetition: int = 0, session: str = "") -> str:
    """One JSON Lines record: the JSON report's record of one repetition (a group holding that record alone);
    ``repetition``: its index in its configuration; ``session``: the bench that measured it (a file that several
    benches appended to keeps their measurements apart)."""
    rec = report_records([group], label, project)[0]
    for run in rec["runs"]:
        run["repetition"] = repetition
    if session:
        rec["session"] = session
    return json.dumps(rec, default=str, allow_nan=False) + "\n"


# llama-bench's column types (tools/llama-bench/llama-bench.cpp, test::get_field_type): INTEGER, booleans as 0/1, REAL
_SQL_INT = {"build_number", "n_batch", "n_ubatch", "n_threads", "poll", "model_size", "model_n_params", "n_gpu_layers",
            "main_gpu", "n_prompt", "n_gen", "n_depth", "avg_ns", "stddev_ns", "no_op_offload", "n_cpu_moe",
            "fit_target", "fit_min_ctx", "flash_attn", "no_kv_offload", "cpu_strict", "embeddings", "no_host",
            "repack"}
_SQL_REAL = {"avg_ts", "stddev_ts"}
SQL_FIELDS = tuple(f for f in LLAMA_BENCH_FIELDS if f not in ("samples_ns", "samples_ts"))


def _sql_value(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "'1'" if v else "'0'"
    return "'" + str(v).replace("'", "''") + "'"


def render_sql(groups: Sequence[Group]) -> str:
    """llama-bench's ``-o sql``: its CREATE TABLE (its field types) and one INSERT per record (a group: its tests'
    averages over the repetitions, as llama-bench prints one row per test), for ``sqlite3 db < file``."""
    types = {f: "INTEGER" if f in _SQL_INT else "REAL" if f in _SQL_REAL else "TEXT" for f in SQL_FIELDS}
    lines = ["CREATE TABLE IF NOT EXISTS llama_bench ("]
    lines += [f"  {f} {t}{',' if i < len(SQL_FIELDS) - 1 else ''}" for i, (f, t) in enumerate(types.items())]
    lines += [");", ""]
    for rec in report_records(groups):
        values = ", ".join(_sql_value(rec.get(f)) for f in SQL_FIELDS)
        lines.append(f"INSERT INTO llama_bench ({', '.join(SQL_FIELDS)}) VALUES ({values});")
    return "\n".join(lines) + "\n"


def render_jsonl(groups: Sequence[Group], label: str = "", project: tuple[str, bool | None] = ("", None)) -> str:
    """llama-bench's ``-o jsonl``: one line per test (a record: every llama-bench field, then mvlm's own, its
    repetitions in ``samples_*`` and ``runs``)."""
    return "".join(json.dumps(rec, default=str, allow_nan=False) + "\n" for rec in report_records(groups, label, project))


def _bench_value(v: Any) -> str:
    """A value as llama-bench's text printers write it (``std::to_string``: booleans 0/1, floats to 6 places)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)


def render_bench_csv(groups: Sequence[Group]) -> str:
    """llama-bench's ``-o csv``: its fields (as its SQL table's) as the header, one quoted row per test."""
    def quoted(v: Any) -> str:
        return '"' + _bench_value(v).replace('"', '""') + '"'

    lines = [",".join(SQL_FIELDS)]
    lines += [",".join(quoted(rec.get(f)) for f in SQL_FIELDS) for rec in report_records(groups)]
    return "\n".join(lines) + "\n"


# llama-bench's defaults: a column of these shows in its Markdown only when a record differs (or values vary)
_MD_OPTIONAL = {"cpu_mask": "0x0", "cpu_strict": False, "poll": 50, "n_batch": 2048, "n_ubatch": 512, "type_k": "f16",
                "type_v": "f16", "flash_attn": -1, "n_depth": None}
_MD_NAMES = {"n_gpu_layers": "ngl", "n_threads": "threads", "flash_attn": "fa"}


def render_bench_markdown(groups: Sequence[Group]) -> str:
    """llama-bench's ``-o md``: model, size, params, backend, threads (ngl off the CPU), the settings that are not
    llama-bench's defaults, test and ``t/s`` as ``mean ± stdev``; its ``build:`` line last."""
    recs = report_records(groups)
    if not recs:
        return ""
    cpu = all("CPU" in str(r.get("backends") or "CPU") for r in recs)
    fields = ["model", "size", "params", "backend", *([] if cpu else ["n_gpu_layers"]), "n_threads"]
    fields += [f for f, d in _MD_OPTIONAL.items() if f != "n_depth" and any(r.get(f, d) != d for r in recs)]
    fields += ["test", "t/s"]

    def cell(r: dict[str, Any], f: str) -> str:
        if f == "model":
            return str(r.get("model_type") or r.get("model") or "")
        if f == "size":
            n = r.get("model_size") or 0
            return f"{n / 2**20:.2f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"
        if f == "params":
            n = r.get("model_n_params") or 0
            return f"{n / 1e6:.2f} M" if n < 1e9 else f"{n / 1e9:.2f} B"
        if f == "backend":
            return str(r.get("backends") or "")
        if f == "test":
            p, g, d = r.get("n_prompt") or 0, r.get("n_gen") or 0, r.get("n_depth") or 0
            name = f"pp{p}" if p and not g else f"tg{g}" if g and not p else f"pp{p}+tg{g}"
            return name + (f" @ d{d}" if d else "")
        if f == "t/s":
            return "–" if r.get("avg_ts") is None else f"{r['avg_ts']:.2f} ± {r.get('stddev_ts') or 0:.2f}"
        return _bench_value(r.get(f))

    rows = [[_MD_NAMES.get(f, f) for f in fields], ["---:" if f not in ("model", "backend") else "---" for f in fields]]
    rows += [[cell(r, f) for f in fields] for r in recs]
    out = ["| " + " | ".join(row) + " |" for row in rows]
    first = recs[0]
    return "\n".join(out) + f"\n\nbuild: {first.get('build_commit') or '?'} ({first.get('build_number') or 0})\n"


STDOUT_FORMATS = ("json", "jsonl", "csv", "md", "sql")


def render_format(fmt: str, groups: Sequence[Group], label: str = "",
                  project: tuple[str, bool | None] = ("", None)) -> str:
    """The results in one of llama-bench's ``-o`` formats (:data:`STDOUT_FORMATS`), as llama-bench writes them: one
    row, line or INSERT per test (a record), its fields and forms (the papers' Markdown and mvlm's per-repetition CSV
    are ``--markdown FILE`` and ``--csv FILE``)."""
    if fmt == "json":
        return render_json(groups, label, project)
    if fmt == "jsonl":
        return render_jsonl(groups, label, project)
    if fmt == "csv":
        return render_bench_csv(groups)
    if fmt == "md":
        return render_bench_markdown(groups)
    if fmt == "sql":
        return render_sql(groups)
    raise ValueError(fmt)
