"""Latency reports in the MobileVLM papers' terms: groups of records (aggregated once, :mod:`mvlm_bench.records.groups`)
as a rich table and as Markdown, every column from the one column table (:mod:`mvlm_bench.records.columns`).

The main table's layout is the groups' protocol's paper table (the MobileVLM papers' Tables 5/6 and V2 Table 5; Imp
Table 4 for ``imp``; Xmodel-VLM Table 6 for ``dataset``); a metric column shows when any group has a value for it.
Rows that differ in a setting (threads, GPU layers, the A/B side, the mmproj's precision, ...) get that setting as a
column: no two configurations look alike. Cells are medians over the repetitions; the table shows min–max under a
median that varies, the Markdown report a spread table, the Total decomposition, on-device readings and provenance.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from rich.table import Table

from mvlm_bench.records.columns import RESOURCE_KEYS, Column, Setting, column, differing, keys, layout_of, setting_text
from mvlm_bench.records.groups import NOISY_CV, Group, noisy_text
from mvlm_core.terminal import visible

# Shown anyway by the table's own columns, so never as "a setting that differs"
_OWN_COLUMNS = ("device", "model", "precision")
_NOTES = {
    "papers": "Sample, Eval_prompt, Eval and Eval_avg in tokens/s; Total in s, model loading included; Eval_avg = "
              "Tks_out / Total.",
    "imp": "Imp Table 4's layout. Model loading excluded: T_total runs from the end of loading (llama-mtmd-cli's "
           "\"main: loading model:\" line) to its perf block, by the log's timestamps; T_VE = the image encode time; "
           "S_prompt / S_gen = llama.cpp's prompt eval / eval rates; N_prompt = the text tokens (chat template "
           "included) plus the image embeddings; T_other = T_total - T_VE - N_prompt/S_prompt - N_gen/S_gen; Load = "
           "llama.cpp's load time (the LM only), shown apart.",
    "dataset": "Xmodel-VLM Table 6's layout. Samples = generated tokens / generation time over the whole set "
               "(llama-server's predicted_n / predicted_ms); Total = the whole set, first request to last answer "
               "(model loading, shown as Load, excluded); p50/p90/p99 = per-sample latencies.",
}


def _gb(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e9:.2f}"


def _present(groups: Sequence[Group], ks: Sequence[str]) -> list[Column]:
    """The columns among ``ks`` that any group has a value for."""
    return [column(k) for k in ks if any(g.agg[k]["n"] for g in groups)]


def main_columns(groups: Sequence[Group]) -> tuple[str, list[Column]]:
    """(the layout, its metric columns that have values)."""
    layout = layout_of(g.context.protocol for g in groups)
    return layout, _present(groups, keys(layout))


def settings_shown(groups: Sequence[Group]) -> list[Setting]:
    """The settings in which these groups differ (each a column of their own)."""
    return differing([g.context for g in groups], skip=_OWN_COLUMNS)


def _setting_cell(s: Setting, g: Group) -> str:
    return setting_text(s.get(g.context))


def render_table(groups: Sequence[Group], title: str | None = "Latency (medians over repetitions)") -> Table:
    """A rich Table, one row per group: medians, with min–max under them when repetitions differ."""
    layout, cols = main_columns(groups)
    cols += _present(groups, RESOURCE_KEYS)
    shown = settings_shown(groups)
    table = Table(title=title)
    for name in ["Model", *(s.header for s in shown), "Hardware", "Precision", "Size (GB)", "Reps"]:
        table.add_column(name, justify="right" if name in ("Size (GB)", "Reps") else "left", overflow="fold")
    for c in cols:
        table.add_column(c.table_header, justify="right", overflow="fold")
    noisy = any(g.noisy() for g in groups)
    if noisy:
        table.add_column(f"Noisy\n(CV > {100 * NOISY_CV:.0f}%)", overflow="fold")
    for g in groups:
        ctx = g.context
        text = [ctx.label(), *(_setting_cell(s, g) for s in shown), ctx.device, ctx.precision]  # names from files
        cells = [*(visible(t, markup=True) for t in text), _gb(ctx.size_bytes), reps_cell(g)]  # escapes shown, not run
        for c in cols:
            a = g.agg[c.key]
            cell = c.format(a["median"])
            if a["n"] and a["n"] > 1 and a["min"] != a["max"]:
                cell += f"\n[dim]{c.format(a['min'])}–{c.format(a['max'])}[/dim]"
            cells.append(cell)
        if noisy:
            cells.append(noisy_text(g.noisy()) or "–")
        table.add_row(*cells)
    return table


def reps_cell(g: Group) -> str:
    """How many repetitions a row has: ``5``, or ``2 of 5`` when fewer were measured than planned."""
    planned = g.context.params.get("repetitions_planned")
    n = len(g.runs)
    return f"{n} of {planned}" if isinstance(planned, int) and not isinstance(planned, bool) and n < planned else str(n)


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _md_table(groups: Sequence[Group], shown: Sequence[Setting], head: Sequence[str], cells_of) -> list[str]:
    """A Markdown table: Model, the differing settings, Hardware, then ``head`` with ``cells_of(group)``."""
    names = ["Model", *(s.header for s in shown), "Hardware", *head]
    lines = [_md_row(names), _md_row(["---"] * (2 + len(shown)) + ["---:"] * len(head))]
    for g in groups:
        lines.append(_md_row([g.context.label(), *(_setting_cell(s, g) for s in shown), g.context.device,
                              *cells_of(g)]))
    return lines


def render_markdown(groups: Sequence[Group]) -> str:
    """Markdown in the layout of the paper table the groups reproduce, then (the MobileVLM papers' layout) the Total
    decomposition and the spread, the on-device readings and the provenance of every row."""
    if not groups:
        return "_no runs_\n"
    layout, cols = main_columns(groups)
    shown = settings_shown(groups)
    noisy = any(g.noisy() for g in groups)
    lines = _md_table(groups, shown, ["Precision", "Size (GB)", *(c.header for c in cols), *(["Noisy"] if noisy else [])],
                      lambda g: [g.context.precision, _gb(g.context.size_bytes), *(c.format(g.median(c.key)) for c in cols),
                                 *([noisy_text(g.noisy()) or "–"] if noisy else [])])
    reps = sorted({len(g.runs) for g in groups})
    vision = " VE = vision-encoder time per image patch (token)." if any(c.key == "ve_ms_per_patch" for c in cols) else ""
    lines += ["", f"Medians over {'/'.join(map(str, reps))} repetition(s). {_NOTES[layout]}{vision}"]
    if noisy:
        lines += ["", f"**Noisy:** a metric whose repetitions spread wider than a coefficient of variation of "
                  f"{100 * NOISY_CV:.0f}% (sample stdev / median): its median says less than it seems to; re-measure "
                  "on a quieter device (cooled, nothing else running) or with more repetitions."]
    partial = [g for g in groups if reps_cell(g) != str(len(g.runs))]
    if partial:
        lines += ["", "**Partial:** " + "; ".join(f"{g.context.label()}: {reps_cell(g)} repetitions" for g in partial)
                  + " (the bench was interrupted or a run failed: the rest were not measured)."]
    if layout == "papers":
        lines += _decomposition(groups, shown) + _spread(groups, shown)
    lines += _resources(groups, shown)
    lines += ["", "Provenance:", ""] + [f"- {_provenance(g)}" for g in groups]
    return "\n".join(lines) + "\n"


def _decomposition(groups: Sequence[Group], shown: Sequence[Setting]) -> list[str]:
    dcols = [column(k) for k in keys("decomposition")]
    if not any(g.agg["total_s"]["n"] for g in groups):
        return []
    return ["", "Total = Load + Tks_in/Eval_prompt + Tks_out/Sample + Tks_out/Eval + Other (s, medians):", ""] + \
        _md_table(groups, shown, [c.name for c in dcols], lambda g: [c.format(g.median(c.key)) for c in dcols])


def _spread(groups: Sequence[Group], shown: Sequence[Setting]) -> list[str]:
    scols = _present(groups, keys("spread"))

    def cells(g: Group) -> list[str]:
        out = [reps_cell(g)]
        for c in scols:
            a = g.agg[c.key]
            sd = "" if a["stdev"] is None else f", sd {c.format(a['stdev'])}"
            out.append("–" if a["n"] == 0 else f"{c.format(a['min'])}–{c.format(a['max'])}{sd}")
        return out

    return ["", "Spread over repetitions (min–max, sample stdev):", ""] + \
        _md_table(groups, shown, ["Reps", *(c.header for c in scols)], cells)


def _resources(groups: Sequence[Group], shown: Sequence[Setting]) -> list[str]:
    rcols = _present(groups, RESOURCE_KEYS)
    if not rcols:
        if any(r.started_at is not None for g in groups for r in g.runs) and \
                any(g.context.protocol != "llama-bench" for g in groups):
            return ["", "On the device: no peak RSS or temperature reading (no /proc, no thermal zones)."]
        return []

    def cells(g: Group) -> list[str]:
        out = []
        for c in rcols:
            a = g.agg[c.key]
            out.append("–" if a["n"] == 0 else f"{c.format(a['median'])} ({c.format(a['min'])}–{c.format(a['max'])})")
        return out

    return ["", "On the device (median, min–max over repetitions): peak RSS of the llama.cpp process (VmHWM; under an "
            "emulator, the emulator's process) and the hottest thermal zone before and after each run:", ""] + \
        _md_table(groups, shown, [c.header for c in rcols], cells)


def _provenance(g: Group) -> str:
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
    bits.append("output format " + "/".join(sorted({r.timing.source_format for r in g.runs})))
    if any(p["tks_out_source"] == "eval_runs" for p in g.per_run):
        bits.append("Tks_out taken from llama.cpp's eval count")
    sources = sorted({p["total_source"] for p in g.per_run if p["total_source"]})
    if sources:
        bits.append("Total from " + " / ".join(sources))
    return "; ".join(bits)
