"""``mvlm history`` (list, filtered), ``history plot``, ``history import``, ``history delete`` and ``history prune``.

Exit codes: 0 fine; 2 bad input (unknown selector, unreadable file, a history that is not one, ...); 28 the disk
holding the history is full.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer
from rich.table import Table

from mvlm_core.console import console as make_console
from mvlm_core.errors import MvlmError
from mvlm_core.terminal import visible

console = make_console()
err = make_console(stderr=True)

app = typer.Typer(invoke_without_command=True)

DB_HELP = ("History: a SQLite file or a PostgreSQL URL postgresql://user@host:port/db (default $MVLM_HISTORY or "
           "./mvlm-history.sqlite; docs/lab.md).")
_DB = typer.Option(None, "--db", help=DB_HELP)
_DEVICE = typer.Option(None, "--device", help="Only this device.")
_MODEL = typer.Option(None, "--model", help="Only this model (name, file or sha256 prefix).")
_PROTOCOL = typer.Option(None, "--protocol", help="Only this protocol.")
_LABEL = typer.Option(None, "--label", help="Only entries with this label (e.g. main, pr-42).")


def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}"


def _entries(db, device, model, protocol, label):
    from mvlm_bench.history.database import History

    with History(db, create=False) as h:
        found = h.entries(device, model, protocol, label)
        if not found and any(x is not None for x in (device, model, protocol, label)):
            err.print(f"[yellow]note:[/] {visible(_no_match(h.entries(samples=False), device, model, protocol, label))}",
                      highlight=False, soft_wrap=True)
        return found, h.path


def _no_match(every, device, model, protocol, label) -> str:
    """Which filter matched nothing, and what the history holds for it (a typo, or a path where a name goes)."""
    held = {"--device": {e.context.device for e in every}, "--model": {e.context.label() for e in every},
            "--protocol": {e.context.protocol for e in every}, "--label": {e.label for e in every if e.label}}
    given = {"--device": device, "--model": model, "--protocol": protocol, "--label": label}
    parts = []
    for opt, value in given.items():
        if value is None:
            continue
        names = sorted(held[opt])
        listed = ", ".join(names[:8]) + (f", … ({len(names)} in all)" if len(names) > 8 else "")
        parts.append(f"{opt} {value} (the history has {listed or 'none'})")
    extra = " (--model takes a model's name, file name or sha256 prefix, not a path)" if model and "/" in model else ""
    return f"no stored entry matches {'; '.join(parts)}{extra}"


def _history_table(entries, path) -> Table:
    """The entries as a table: when, which, the settings in which they differ (each a column), and the medians of the
    column table's history view (Eval, Total)."""
    from mvlm_bench.decide.stats import median
    from mvlm_bench.records.columns import column, differing, keys, setting_text

    shown = differing([e.context for e in entries], skip=("device", "model", "protocol", "runtime"))
    metrics = [column(k) for k in keys("history")]
    t = Table(title=visible(f"Benchmark history ({path})", markup=True))
    heads = ["id", "time (UTC)", "label", "device", "model", "protocol", *(s.header for s in shown), "llama.cpp",
             "commit", "reps", *(f"{c.name} {c.unit.replace('tokens/s', 'tok/s')}" for c in metrics)]
    numeric = {"id", "reps", *heads[-len(metrics):]}
    for col in heads:
        t.add_column(col, overflow="fold", justify="right" if col in numeric else "left")
    for e in entries:
        def med(k: str, e=e) -> str:
            if k == "eval_tps" and k not in e.samples:  # llama-bench rows: the one tg test's rate, if there is one
                tg = [m for m in e.samples if re.fullmatch(r"tg\d+_tps", m)]
                k = tg[0] if len(tg) == 1 else k
            vals = [v for v in e.samples.get(k, []) if v is not None]
            return _fmt(median(vals)) if vals else "–"

        settings = [setting_text(s.get(e.context)) for s in shown]
        cells = (e.created_at, e.label, e.context.device, e.context.label(), e.context.protocol, *settings,
                 e.context.runtime_commit[:10], e.project_commit[:10] + ("+" if e.project_dirty else ""))
        planned = e.context.params.get("repetitions_planned")
        reps = f"{e.repetitions} of {planned}" if isinstance(planned, int) and e.repetitions < planned else \
            str(e.repetitions)
        t.add_row(str(e.id), *(visible(str(x), markup=True) for x in cells), reps,
                  *(med(c.key) for c in metrics))
    return t


@app.callback()
def history_cmd(ctx: typer.Context, db: str | None = _DB,
                json_out: bool = typer.Option(False, "--json", help="JSON list (with every repetition) instead of a "
                                                                    "table."),
                device: str | None = _DEVICE, model: str | None = _MODEL, protocol: str | None = _PROTOCOL,
                label: str | None = _LABEL,
                limit: int = typer.Option(50, "--limit", min=0, help="Show the newest N entries (0: all).")) -> None:
    """List stored benchmark measurements (newest last), with the settings in which they differ as columns.
    `mvlm history plot --out DIR` draws them; `delete` and `prune` remove entries; `import` stores files."""
    if ctx.invoked_subcommand is not None:
        import shlex

        given = [p for p in ctx.command.params if getattr(ctx.get_parameter_source(p.name), "name", "") == "COMMANDLINE"]
        if given:  # `mvlm history --db lab.sqlite delete ...` must never delete from another history
            said = " ".join(p.opts[0] if isinstance(ctx.params[p.name], bool) else
                            f"{p.opts[0]} {shlex.quote(str(ctx.params[p.name]))}" for p in given)
            raise MvlmError(f"{', '.join(p.opts[0] for p in given)} before '{ctx.invoked_subcommand}' would not apply to "
                            f"it: write `mvlm history {ctx.invoked_subcommand} {said} ...` (nothing was changed)")
        return
    from mvlm_bench.decide.verdict import entry_json

    entries, path = _entries(db, device, model, protocol, label)
    if limit > 0:
        entries = entries[-limit:]
    if json_out:
        print(json.dumps([entry_json(e) | {"samples": e.samples} for e in entries], indent=2, default=str))
        return
    console.print(_history_table(entries, path))


@app.command("plot")
def plot_cmd(out: Path = typer.Option(Path("mvlm-history-plots"), "--out", "-o", help="Directory for the PNGs and "
                                                                                      "index.html."),
             db: str | None = _DB,
             metric: list[str] | None = typer.Option(None, "--metric", help="Metric to plot (repeatable): its key "
                                                                            "(eval_tps) or its name (Eval)."),
             device: str | None = _DEVICE, model: str | None = _MODEL, protocol: str | None = _PROTOCOL,
             label: str | None = _LABEL) -> None:
    """Draw the metrics' history, one PNG per configuration (two configurations are never one line), and a
    self-contained index.html."""
    from mvlm_bench.decide.verdict import check_metrics
    from mvlm_bench.views import plots

    keys = check_metrics(metric)
    entries, _ = _entries(db, device, model, protocol, label)
    if not entries:
        if any(x is not None for x in (device, model, protocol, label)):
            raise MvlmError("nothing to plot: no stored entry matches the filters (see the note above)")
        raise MvlmError("no stored measurements to plot: run `mvlm bench ... --save` first")
    if out.exists() and not out.is_dir():
        raise MvlmError(f"--out {out} is a file: pass a directory for the PNGs and index.html")
    try:
        files = plots.plot_history(entries, out, tuple(keys) if keys else plots.PLOT_METRICS)
    except OSError as e:
        from mvlm_core.atomic import is_disk_full

        if is_disk_full(e):
            raise MvlmError(f"disk full while writing plots to {out}: free space and run again", exit_code=28) from None
        raise MvlmError(f"cannot write plots to {out}: {e.strerror or e}; choose another --out") from None
    for f in files:
        console.print(str(f))


@app.command("import")
def import_cmd(files: list[Path] = typer.Argument(..., help="Reports written by `mvlm bench --json-file` or --jsonl, the "
                                                            ".unsaved-*.json a failed `mvlm bench --save` wrote, or "
                                                            "llama-bench output (-o json, jsonl or sql; also csv, md).",
                                                   show_default=False),
               db: str | None = _DB,
               device: str | None = typer.Option(None, "--device", help="Device name for llama-bench rows (default: "
                                                                        "their cpu_info, or gpu_info)."),
               label: str | None = typer.Option(None, "--label", help="Label every imported measurement with this.")
               ) -> None:
    """Store measurements from files in the history (one transaction). A measurement already stored (the same context,
    build and per-repetition values, whatever its time or label), or given twice, is skipped, also when several imports
    run at once. A `mvlm bench` report is stored exactly as `--save` stores it, at the time it was measured.
    llama-bench output becomes one measurement per configuration, each test (pp512, tg128, ...) a metric whose values
    are its samples; a file that is none of these is refused in one line and nothing is stored."""
    from mvlm_bench.history.database import History
    from mvlm_bench.history.entries import check_label
    from mvlm_bench.history.imports import check_report_file, entries_from_json

    check_label(label)
    entries = []
    for f in files:
        check_report_file(f, "pass a JSON file written by `mvlm bench --json-file` or by a failed `mvlm bench --save`, "
                             "or llama-bench output")
        entries += entries_from_json(f, device=device, need_device=True)
    if label is not None:
        for e in entries:
            e.label = label
    with History(db) as h:
        ids, skipped, continued = h.save_new(entries)
        path = h.path
    note = f" ({skipped} already stored or given twice, skipped)" if skipped else ""
    if continued:
        note += f"; the later repetitions of {', '.join(f'id:{i}' for i in continued)} added to it"
    err.print(f"imported {len(ids)} measurement(s){': ' + ', '.join(f'id:{i}' for i in ids) if ids else ''} "
              f"into {path}{note}", soft_wrap=True, highlight=False)


def _say_removed(verb: str, doomed, path, dry_run: bool) -> None:
    ids = ", ".join(f"id:{e.id}" for e in doomed)
    if dry_run:
        err.print(f"would {verb} {len(doomed)} entr{'y' if len(doomed) == 1 else 'ies'} from {path}: {ids or 'none'} "
                  "(--dry-run: nothing changed)", highlight=False, soft_wrap=True)
    else:
        err.print(f"{verb}d {len(doomed)} entr{'y' if len(doomed) == 1 else 'ies'} from {path}"
                  + (f": {ids}" if ids else ""), highlight=False, soft_wrap=True)


@app.command("delete")
def delete_cmd(selectors: list[str] | None = typer.Argument(None, help="Entries to delete: id:N (or N), latest, "
                                                                      "label:NAME, commit:SHA, runtime:SHA (each names "
                                                                      "one entry).", show_default=False),
               db: str | None = _DB, device: str | None = _DEVICE, model: str | None = _MODEL,
               protocol: str | None = _PROTOCOL, label: str | None = _LABEL,
               dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be deleted; change nothing.")
               ) -> None:
    """Delete stored measurements with every repetition: the entries the selectors name, or, without selectors, every
    entry the filters (--label, --device, --model, --protocol; at least one) match. One transaction."""
    from mvlm_bench.history.database import History

    if not selectors and not any((device, model, protocol, label)):
        raise MvlmError("history delete needs selectors (id:3 latest ...) or a filter (--label pr-42, --device, --model, "
                        "--protocol); nothing was deleted")
    with History(db, create=False) as h:
        if selectors:
            doomed = {e.id: e for s in selectors
                      for e in [h.select(s, device=device, model=model, protocol=protocol, label=label)]}
        else:
            doomed = {e.id: e for e in h.entries(device, model, protocol, label, samples=False)}
        if not dry_run and doomed:
            h.delete(sorted(i for i in doomed if i is not None))
        _say_removed("delete", list(doomed.values()), h.path, dry_run)


@app.command("prune")
def prune_cmd(keep: int = typer.Option(..., "--keep", min=1, help="Entries to keep per configuration (the newest)."),
              db: str | None = _DB, device: str | None = _DEVICE, model: str | None = _MODEL,
              protocol: str | None = _PROTOCOL, label: str | None = _LABEL,
              dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be deleted; change nothing.")) -> None:
    """Keep the newest --keep entries of each configuration (device, model, protocol, settings and label) and delete
    the older ones (optionally among the entries the filters match). One transaction."""
    from mvlm_bench.history.database import History
    from mvlm_bench.history.entries import setup_key

    with History(db, create=False) as h:
        by_config: dict[tuple, list] = {}
        for e in h.entries(device, model, protocol, label, samples=False):
            by_config.setdefault((setup_key(e), e.label), []).append(e)
        doomed = [e for es in by_config.values() for e in es[:-keep]]
        if not dry_run and doomed:
            h.delete([e.id for e in doomed])
        _say_removed("delete", doomed, h.path, dry_run)
