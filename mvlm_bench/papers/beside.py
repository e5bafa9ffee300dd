"""The papers' report (``mvlm report --paper NAME``): the user's stored measurements in a seed paper's latency-table
layout, beside the paper's own published rows (:mod:`mvlm_bench.papers.tables`), so a device is read next to Snapdragon
888 / 8Gen3, Jetson Orin or an RTX 3090.

Which history entries fill which table: the table's ``protocol`` (MobileVLM Table 5: ``lm``; MobileVLM Table 6 and
MobileVLM V2 Table 5: ``vlm``; Imp Table 4: ``imp``; Xmodel-VLM Table 6: ``dataset``). A user row shows, per column,
the median over the entry's repetitions of the stored metric with the column's key (the paper's Size column: the
entry's model + mmproj bytes, in GB). Metrics a protocol stores beyond the paper's columns (Imp: n_prompt, n_gen,
t_other_s, load_s; dataset: n_samples and the p50/p90/p99 latencies) are shown after them when present. A table
without user entries shows the paper's rows and the ``mvlm bench`` command that would fill it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from mvlm_bench.papers.tables import PAPERS, PaperTable, row_record, tables
from mvlm_bench.records.columns import describe, differing
from mvlm_core.errors import MvlmError
from mvlm_core.terminal import visible

# Metrics a protocol stores beyond the paper's columns, shown after them when an entry has them.
EXTRA_KEYS: dict[str, tuple[str, ...]] = {
    "imp": ("n_prompt", "n_gen", "t_other_s", "load_s"),
    "dataset": ("n_samples",),
}
_PERCENTILE = re.compile(r"^p(50|90|99)(_|$)")  # the dataset protocol's latency percentiles (p50_s, p90_ms, ...)

_FILL = {
    "lm": "mvlm bench --device {device} --protocol lm --model MODEL-Q4_K_S.gguf --save",
    "vlm": "mvlm bench --device {device} --protocol vlm --model MODEL-Q4_K_S.gguf --mmproj mmproj-MODEL-F16.gguf --save",
    "imp": "mvlm bench --device {device} --protocol imp --model Imp-3B-Q4_K_S.gguf --mmproj mmproj-Imp-3B-F16.gguf --save",
    "dataset": "mvlm bench --device {device} --protocol dataset --data FILE.jsonl --model MODEL-Q4_K_S.gguf "
               "--mmproj mmproj-MODEL-F16.gguf --save",
}


def check_paper(paper: str) -> str:
    key = paper.strip().lower()
    if key not in PAPERS:
        raise MvlmError(f"unknown paper {paper!r}: choose one of {', '.join(PAPERS)}")
    return key


def fill_command(protocol: str, device: str | None = None, db: str | None = None) -> str:
    """The `mvlm bench` command that stores entries for a table (with ``--db`` when the report was given one, so the
    entries land where the report reads); says so when this mvlm lacks the protocol. Values are shell-quoted."""
    import shlex

    from mvlm_bench.plan.protocols import PROTOCOLS

    cmd = _FILL[protocol].format(device=shlex.quote(device) if device else "DEVICE")
    if db is not None:
        from mvlm_bench.history.locations import db_option

        cmd += " " + db_option(db)
    if protocol not in PROTOCOLS:
        cmd += f"  (the {protocol} protocol is not in this version of mvlm yet)"
    return cmd


def _median(values: list[float | None]) -> float | None:
    from mvlm_bench.decide.stats import median

    xs = [float(v) for v in values if v is not None]
    return median(xs) if xs else None


def user_row(entry, table: PaperTable) -> dict[str, Any]:
    """One history entry in a table's columns: medians over its repetitions (None where it has no such metric)."""
    c = entry.context
    metrics: dict[str, float | None] = {}
    for col in table.columns:
        if col.key in ("size_gb", "size"):
            metrics[col.key] = None if c.size_bytes is None else c.size_bytes / 1e9
        else:
            metrics[col.key] = _median(entry.samples.get(col.key, []))
    extra_keys = list(EXTRA_KEYS.get(table.protocol, ()))
    if table.protocol == "dataset":
        extra_keys += sorted(k for k in entry.samples if _PERCENTILE.match(k))
    extra = {k: _median(entry.samples[k]) for k in extra_keys if k in entry.samples}
    return {
        "source": "yours", "id": entry.id, "created_at": entry.created_at, "label": entry.label or None,
        "model": c.label(), "device": c.device, "precision": c.precision or None, "protocol": c.protocol,
        "runtime_commit": c.runtime_commit or None, "repetitions": entry.repetitions,
        "metrics": metrics, "extra": extra,
    }


def build(paper: str, entries: list, db: Path | str | None = None, device: str | None = None,
          db_note: str | None = None, db_option: str | None = None) -> dict[str, Any]:
    """The whole report as JSON-able data: per table its columns, the paper's rows and the user's. ``db_option``: the
    ``--db`` the user gave (the fill commands repeat it)."""
    paper = check_paper(paper)
    out_tables = []
    for t in tables(paper):
        theirs = [e for e in entries if e.context.protocol == t.protocol]
        # rows of several configurations say theirs (t=2, ngl=0, ...): two configurations never look alike
        shown = differing([e.context for e in theirs], skip=("device", "model", "precision", "runtime"))
        mine = [user_row(e, t) | {"settings": describe(e.context, shown)} for e in theirs]
        out_tables.append({
            "paper": paper, "table": t.table, "page": t.page, "where": t.where, "caption": t.caption,
            "protocol": t.protocol, "setting": t.setting, "notes": list(t.notes),
            "columns": [{"key": c.key, "name": c.name, "unit": c.unit} for c in t.columns],
            "paper_rows": [row_record(r) for r in t.rows],
            "your_rows": mine,
            "fill_command": None if mine else fill_command(t.protocol, device, db_option),
        })
    return {"paper": paper, "title": PAPERS[paper], "db": str(db) if db is not None else None,
            "db_note": db_note, "device_filter": device, "tables": out_tables}


def _num(v: float | None, key: str = "") -> str:
    """A metric for the table: counts (n_prompt, n_gen, n_samples: keys starting with ``n_``) as whole numbers (a
    median of an even number of counts can end in .5: then one decimal), other values to 3-4 significant digits."""
    if v is None:
        return "–"
    if key.startswith("n_"):
        return f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}"
    a = abs(v)
    if a >= 1000:
        return f"{v:.0f}"
    return f"{v:.3f}" if a < 1 else f"{v:.2f}"


def _row_name(r: dict[str, Any]) -> str:
    return f"{r['model']}{' / ' + r['lm'] if r['lm'] else ''} {r['quantization']} on {r['device']}"


def render(report: dict[str, Any]) -> list[Table | str]:
    """Rich tables (one per paper table) with the lines that go under each: notes, inconsistencies, fill hints."""
    out: list[Table | str] = []
    for t in report["tables"]:
        extra_keys: list[str] = []
        for r in t["your_rows"]:
            extra_keys += [k for k in r["extra"] if k not in extra_keys]
        table = Table(title=escape(f"{t['where']}: {t['caption']} — paper rows, then yours ({t['protocol']} protocol)"))
        for name in ("Source", "Model", "Hardware", "Precision"):
            table.add_column(name, overflow="fold")
        for c in t["columns"]:
            table.add_column(f"{c['name']}\n{c['unit']}" if c["unit"] else c["name"], justify="right", overflow="fold")
        for k in extra_keys:
            table.add_column(k, justify="right", overflow="fold")
        marks, notes = [], []
        for i, r in enumerate(t["paper_rows"]):
            src = f"paper {r['table']}" + (f" p. {r['page']}" if r["page"] else "")
            if r["inconsistent"]:
                marks.append(r)
                src += f" (!{len(marks)})"
            if r["note"]:
                notes.append(r)
                src += f" (*{len(notes)})"
            model = r["model"] + (f" / {r['lm']}" if r["lm"] else "")
            quant = r["quantization"] + (f" ({r['quant_type']})" if r["quant_type"] else "")
            cells = [r["metrics"][c["key"]]["printed"] for c in t["columns"]]
            last = i == len(t["paper_rows"]) - 1
            table.add_row(*map(escape, (src, model, r["device"], quant, *cells)), *(["–"] * len(extra_keys)),
                          end_section=last)
        for r in t["your_rows"]:
            src = f"yours id:{r['id']}" + (f" {r['label']}" if r["label"] else "")
            cells = [_num(r["metrics"][c["key"]], c["key"]) for c in t["columns"]]
            model = r["model"] + (f" {r['settings']}" if r.get("settings") else "")
            table.add_row(*(visible(x, markup=True) for x in (src, model, r["device"], r["precision"] or "–")), *cells,
                          *[_num(r["extra"].get(k), k) for k in extra_keys])
        out.append(table)
        out.append(f"Paper setting: {t['setting']}.")
        out += [f"Note: {n}" for n in t["notes"]]
        for n, r in enumerate(notes, 1):
            out.append(f"(*{n}) {_row_name(r)}: {r['note']}.")
        for n, r in enumerate(marks, 1):
            out.append(f"(!{n}) {_row_name(r)}: the paper is inconsistent here: {r['inconsistent']} "
                       f"({r['formula_check']['detail']}).")
        if t["fill_command"]:
            out.append(f"No measurements of yours for {t['where']}; this fills them: {t['fill_command']}")
        out.append("")
    return out


def load_entries(db: str | Path | None, device: str | None) -> tuple[list, Path | str, str | None]:
    """The history's entries (optionally of one device). A history file that does not exist yet is no entries: the
    paper's rows are still worth showing, with the commands that fill that history (repeating its --db); one that is
    not a history is the history's own one-line error."""
    from mvlm_bench.history.database import History
    from mvlm_bench.history.errors import default_db_path
    from mvlm_bench.history.locations import cli_location, is_url

    path = cli_location(str(db)) if db is not None else default_db_path()
    if not is_url(path) and not path.exists() and not path.is_symlink():  # a PostgreSQL URL: the server says
        return [], path, f"no benchmark history at {path} yet"
    with History(path, create=False) as h:
        return h.entries(device=device), h.path, None  # h.path: a URL's password masked
