"""``mvlm compare``, ``mvlm history`` (+ ``history plot``) and the history/gate half of ``mvlm bench``.

Exit codes: 0 fine; 2 bad input (unknown selector, unreadable file, a history that is not one, ...); 28 the disk
holding the history is full; 4 = ``EXIT_REGRESSION``: a gated metric is slower than the baseline by more than
``--fail-on-regression`` AND the repetitions support it (see :mod:`mvlm_bench.compare`). CI tells a regression from
a broken job by that code.

``mvlm bench --save`` never loses a measurement: when the history cannot take it, the runs go to a JSON file beside
it (:func:`mvlm_bench.history.save_or_spill`), the command says where in one line and exits non-zero, and
``mvlm history import FILE`` stores them later.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from mvlm_core.errors import MvlmError
from mvlm_core.terminal import visible

EXIT_REGRESSION = 4

console = Console()
err = Console(stderr=True)

app = typer.Typer(invoke_without_command=True)

_DB_HELP = ("History: a SQLite file or a PostgreSQL URL postgresql://user@host:port/db (default $MVLM_HISTORY or "
            "./mvlm-history.sqlite; docs/lab.md).")
_SELECTOR_HELP = ("latest, latest~N, id:N, label:NAME, commit:SHA, runtime:SHA (llama.cpp commit), "
                  "or a JSON file written by `mvlm bench --json-file`")


_SELECTOR = re.compile(r"(?:id:)?[0-9]+|(?:latest|label:.+?|commit:[0-9a-fA-F]+|runtime:[0-9a-zA-Z]+)(?:~[0-9]+)?",
                       re.ASCII | re.DOTALL)


def _is_file(spec: str) -> bool:
    """A JSON/llama-bench file rather than a history selector: ``*.json``, an existing file, or a directory given
    by mistake (a one-line error later) unless it reads as a selector."""
    if spec.endswith(".json"):
        return True
    try:
        p = Path(spec)  # a FIFO, device or directory too: refused in one line later (check_report_file)
        return p.is_file() or (p.exists() and not _SELECTOR.fullmatch(spec.strip()))
    except (OSError, ValueError):  # a name too long for the OS, a NUL byte: not a file
        return False


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:  # also refuses nan
        raise MvlmError(f"--alpha {alpha:g} is not a significance level: pass a number between 0 and 1 such as 0.05")


def _open(db: Path | str | None, create: bool = False):
    from mvlm_bench.history import History

    return History(db, create=create)


def resolve(spec: str, db: Path | str | None, device: str | None = None, model: str | None = None,
            protocol: str | None = None, like=None, exclude: tuple[int, ...] = ()) -> list:
    """Entries named by a selector or a JSON file (a file may hold several measurements)."""
    from mvlm_bench.history import check_report_file, entries_from_json

    if _is_file(spec):
        check_report_file(Path(spec), "pass a JSON file written by `mvlm bench --json-file` or a selector")
        return entries_from_json(Path(spec))
    with _open(db) as h:
        return [h.select(spec, device=device, model=model, protocol=protocol, like=like, exclude=exclude)]


def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}"


def comparison_table(comps: list, title: str) -> Table:
    """The comparison as a table. For an interleaved session the speedup column is "Pair speedup": the median of
    the per-pair speedups (the caption says so), which need not equal the ratio of the two medians beside it."""
    from mvlm_bench.compare import PAIR_SPEEDUP_NOTE

    paired = bool(comps) and all(c.paired for c in comps)
    t = Table(title=visible(title, markup=True), caption=PAIR_SPEEDUP_NOTE if paired else None)
    for col in ("Metric", "Baseline", "Candidate", "Pair speedup" if paired else "Speedup", "95% CI", "p", "Verdict"):
        t.add_column(col, justify="left" if col in ("Metric", "Verdict") else "right", overflow="fold")
    for c in comps:
        p = {"slower": c.p_slower, "faster": c.p_faster}.get(c.verdict)
        if p is None and c.p_slower is not None and c.p_faster is not None:
            p = min(c.p_slower, c.p_faster)
        style = {"slower": "bold red", "faster": "bold green"}.get(c.verdict, "")
        verdict = f"[{style}]{c.verdict}[/]" if style else c.verdict
        t.add_row(visible(f"{c.name} ({c.unit})", markup=True), f"{_fmt(c.baseline_median)} [dim]n={c.n_baseline}[/]",
                  f"{_fmt(c.candidate_median)} [dim]n={c.n_candidate}[/]",
                  "–" if c.speedup is None else f"{c.speedup:.3f}",
                  "–" if c.ci_low is None else f"{c.ci_low:.3f}–{c.ci_high:.3f}",
                  "–" if p is None else f"{p:.3g}", verdict + (f" [dim]({visible(c.note, markup=True)})[/]" if c.note else ""))
    return t


GATE_MODES = ("auto", "history", "within-session")


def _history_sessions(db: Path | str | None, base, cand) -> list:
    """The stored sessions of the baseline (same setup, build and label; gate.baseline_sessions), never the
    candidate."""
    from mvlm_bench import gate
    from mvlm_bench.history import History

    with History(db, create=False) as h:
        entries = h.entries(base.context.device)
    return gate.baseline_sessions(entries, base, candidate=cand)


def _change_words(slowdown: float) -> str:
    """A slowdown fraction as words: 0.255 -> '25.5% worse', -0.031 -> '3.1% better'."""
    if round(slowdown, 3) == 0:
        return "no different"
    return f"{abs(slowdown):.1%} {'worse' if slowdown > 0 else 'better'}"


def _print_gate(d, json_out: bool) -> None:
    if json_out:
        return
    for v in d.history:
        if v.verdict in ("slower", "suspected", "no change") and v.center is not None and v.slowdown is not None:
            err.print(f"[dim]history: {visible(v.name, markup=True)} {_change_words(v.slowdown)} than the centre of "
                      f"{v.n_sessions} baseline session(s) (noise band ±{v.band:.1%}): {v.verdict}[/]", highlight=False)
    for w in d.warnings:
        err.print(f"[yellow]warning:[/] {visible(w, markup=True)}", highlight=False)


def run_comparison(pairs: list[tuple], metrics: list[str] | None, alpha: float, threshold: float | None,
                   json_out: bool = False, markdown_out: Path | None = None, *, db: Path | str | None = None,
                   gate_mode: str = "auto", confirm=None) -> None:
    """Compare each pair, print (table or JSON), write Markdown if asked, then apply the gate if a threshold is set.

    The table always shows the two sessions' Mann-Whitney comparison. The gate (``mvlm_bench.gate``) judges a
    baseline stored in the history by its own session-to-session noise (``history``), and a baseline from a JSON file
    within-session (no sessions to learn the noise from; said in a warning). ``confirm(base, cand)``, when given,
    returns a callable that re-measures both interleaved (``mvlm bench`` passes it when the baseline can be re-run).
    """
    from mvlm_bench import compare, gate
    from mvlm_bench.history import setup_differences

    if gate_mode not in GATE_MODES:
        raise MvlmError(f"--gate {gate_mode!r}: choose one of {', '.join(GATE_MODES)}")
    gate_metrics = tuple(metrics) if metrics else compare.GATE_METRICS
    results, md, failures, decisions = [], [], [], []
    for base, cand in pairs:
        if base.id is not None and base.id == cand.id:
            raise MvlmError(f"baseline and candidate are the same entry ({base.describe()}): pick two different ones")
        _check_common_metrics(base, cand, gate_metrics if threshold is not None else None, bool(metrics))
        comps = compare.compare_samples(base.samples, cand.samples, metrics=metrics or None, alpha=alpha)
        invalid = {c.key: f"{c.name}: {c.dropped_warning}" for c in comps if c.dropped_warning}
        diffs = setup_differences(base, cand)
        title = f"{cand.context.label()} on {cand.context.device}: {base.describe()} -> {cand.describe()}"
        decision = None
        if threshold is not None:
            use_history = gate_mode == "history" or (gate_mode == "auto" and base.id is not None)
            if use_history and base.id is None:
                raise MvlmError("--gate history needs a baseline stored in the history (a selector, not a JSON file)")
            if use_history:
                sessions = _history_sessions(db, base, cand)
                decision = gate.decide_history([e.samples for e in sessions], cand.samples, threshold, gate_metrics,
                                               confirm=confirm(base, cand) if confirm else None)
            else:
                regs, warns = compare.gate_summary(comps, threshold, gate_metrics)
                decision = gate.GateDecision("within-session", threshold, bool(regs),
                                             [compare.describe_regression(r, threshold) for r in regs], warns)
                if gate_mode == "auto":
                    decision.warnings.append(
                        "the baseline is a file, so its session-to-session noise is unknown: gating within one pair "
                        "of sessions, which can cry wolf; prefer a history baseline or an interleaved bench (--against)")
            failures += [(title, line) for line in decision.regressions]
            decisions.append(decision)
            # non-positive values left out: said once per metric (the gate's own warnings already name its metrics)
            said = ({v.key for v in decision.history if v.dropped_warning} if decision.history
                    else {c.key for c in comps if c.key in gate_metrics})
            decision.warnings = [w for k, w in invalid.items() if k not in said] + decision.warnings
        elif not json_out:
            for w in invalid.values():
                err.print(f"[yellow]warning:[/] {visible(w, markup=True)}", highlight=False)
        results.append({"baseline": _entry_json(base), "candidate": _entry_json(cand), "setup_differences": diffs,
                        "metrics": [c.as_dict() for c in comps],
                        "regressions": decision.regressions if decision else [],
                        "warnings": decision.warnings if decision else list(invalid.values()),
                        "gate": decision.as_dict() if decision else None})
        md.append(compare.render_markdown(comps, title))
        if decision is not None and decision.interleaved:
            md.append(compare.render_markdown(decision.interleaved, "interleaved re-measure (A/B)"))
        if diffs:
            md.append("Setups differ: " + "; ".join(diffs) + "\n")
        if not json_out:
            console.print(comparison_table(comps, title))
            if decision is not None and decision.interleaved:
                console.print(comparison_table(decision.interleaved, "interleaved re-measure (A/B pairs)"))
            if diffs:
                err.print("[yellow]warning:[/] the two measurements differ in setup: "
                          + visible("; ".join(diffs), markup=True), highlight=False)
        if decision is not None:
            _print_gate(decision, json_out)
    if json_out:
        print(json.dumps({"alpha": alpha, "threshold": threshold, "comparisons": results}, indent=2, default=str))
    if markdown_out is not None:
        if threshold is not None:
            md.append(f"\n**Gate** ({threshold:.1%} on {', '.join(gate_metrics)}): "
                      + ("regression: " + "; ".join(line for _, line in failures) if failures else "passed") + "\n")
        from mvlm_core.atomic import write_text

        write_text(markdown_out, "\n".join(md))  # one line (MvlmError) when it cannot be written
    if failures:
        raise MvlmError("performance regression: " + visible("; ".join(line for _, line in failures)),
                        exit_code=EXIT_REGRESSION)
    if threshold is not None and not json_out:
        if decisions and not any(d.judged for d in decisions):
            err.print("[yellow]gate not applied[/]: no gated metric could be judged (see the warnings above)")
        else:
            err.print(f"[green]gate passed[/]: no gated metric is slower by more than {threshold:.1%} beyond its noise")


def _metric_list(e) -> str:
    keys = sorted(e.samples)
    return visible(", ".join(keys[:8]) + (f", … ({len(keys)} in all)" if len(keys) > 8 else "")) if keys else "none"


def _check_common_metrics(base, cand, gated: tuple[str, ...] | None, chosen: bool) -> None:
    """Refuse, in one line, a pair with no metric in common (an empty table) or, when gating, no gated metric in
    common (the gate could judge nothing and would pass silently)."""
    common = sorted(set(base.samples) & set(cand.samples))
    sides = (f"the baseline ({base.describe()}) has {_metric_list(base)}; "
             f"the candidate ({cand.describe()}) has {_metric_list(cand)}")
    if not common:
        raise MvlmError(f"the two measurements have no metric in common: {sides}; compare measurements of the same "
                        "protocol and tests")
    if gated is not None and not set(gated) & set(common):
        what = "--metric" if chosen else f"gated metric ({', '.join(gated)})"
        raise MvlmError(f"--fail-on-regression: no {what} is in both measurements: {sides}; gate on one they share "
                        f"with --metric {visible(common[0])}")


def run_interleaved_report(ab, metrics: list[str] | None, alpha: float, threshold: float | None,
                           json_out: bool = False) -> dict:
    """Print the paired comparison of an interleaved session and gate on it; returns the JSON-able summary."""
    from mvlm_bench import gate
    from mvlm_bench.history import entries_from_runs

    base = entries_from_runs(ab.baseline.runs)
    cand = entries_from_runs(ab.candidate.runs)
    if not base or not cand:
        raise MvlmError("the A/B session completed no pair of runs: nothing to compare")
    comps = gate.compare_interleaved(base[0].samples, cand[0].samples, metrics or None, alpha=alpha)
    title = (f"interleaved A/B on {cand[0].context.device}: {base[0].describe()} -> {cand[0].describe()}, "
             f"{len(ab.order) // 2} pairs, order {''.join(ab.order)}")
    decision = gate.decide_interleaved(comps, threshold, metrics) if threshold is not None else None
    if not json_out:
        console.print(comparison_table(comps, title))
        if decision is not None:
            _print_gate(decision, json_out)
    summary = {"mode": "interleaved", "order": ab.order, "alpha": alpha, "threshold": threshold,
               "metrics": [c.as_dict() for c in comps], "gate": decision.as_dict() if decision else None}
    if decision is not None and decision.failed:
        raise MvlmError("performance regression (interleaved A/B): " + visible("; ".join(decision.regressions)),
                        exit_code=EXIT_REGRESSION)
    if decision is not None and not json_out:
        err.print(f"[green]gate passed[/]: no gated metric is slower by more than {threshold:.1%} in the A/B pairs")
    return summary


def _entry_json(e) -> dict:
    c = e.context
    return {"id": e.id, "source": e.source, "created_at": e.created_at, "label": e.label,
            "project_commit": e.project_commit, "device": c.device, "model": c.label(), "model_sha256": c.model_sha256,
            "protocol": c.protocol, "runtime_commit": c.runtime_commit, "runtime_patches": list(c.runtime_patches),
            "params": c.params, "repetitions": e.repetitions}


def compare_cmd(
    baseline: str = typer.Argument("latest~1", help=f"Baseline: {_SELECTOR_HELP}."),
    candidate: str = typer.Argument("latest", help=f"Candidate: {_SELECTOR_HELP}."),
    db: str | None = typer.Option(None, "--db", help=_DB_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
    markdown_out: Path | None = typer.Option(None, "--markdown", help="Also write the table as Markdown."),
    metric: list[str] | None = typer.Option(None, "--metric", help="Metric to compare (repeatable): eval_tps, ..."),
    device: str | None = typer.Option(None, "--device", help="Only history entries of this device."),
    model: str | None = typer.Option(None, "--model", help="Only entries of this model (name, file or sha256 prefix)."),
    protocol: str | None = typer.Option(None, "--protocol", help="Only entries of this protocol."),
    alpha: float = typer.Option(0.05, "--alpha", help="Significance level of the one-sided Mann-Whitney test."),
    fail_on_regression: str | None = typer.Option(
        None, "--fail-on-regression", help="Exit 4 when a gated metric is slower by more than this (5%, or the "
                                           "fraction 0.05; a bare 5 is refused) and the evidence supports it "
                                           "(docs/ci.md)."),
    gate_mode: str = typer.Option(
        "auto", "--gate", help="How the gate judges: history (the baseline's stored sessions give the noise; needs 3 or "
                               "more), within-session (the two sessions' repetitions only: cries wolf across sessions), "
                               "auto (history for a stored baseline, within-session for a JSON file)."),
) -> None:
    """Compare two measurements metric by metric: medians, speedup, 95% CI, Mann-Whitney p and a verdict.

    The baseline of a history selector is looked for among entries of the candidate's setup (same device, model file,
    protocol and parameters), so `mvlm compare` with no arguments compares the latest run with the one before it.

      mvlm compare                                  # latest~1 vs latest

      mvlm compare label:main latest --fail-on-regression 5%

      mvlm compare base.json cand.json --metric eval_tps
    """
    from mvlm_bench import compare, gate

    _check_alpha(alpha)
    threshold = compare.parse_threshold(fail_on_regression) if fail_on_regression else None
    if gate_mode not in GATE_MODES:
        raise MvlmError(f"--gate {gate_mode!r}: choose one of {', '.join(GATE_MODES)}")
    if gate_mode != "auto" and threshold is None:
        raise MvlmError(f"--gate {gate_mode} only decides with a threshold: add --fail-on-regression (e.g. 5%), "
                        "or leave --gate out")
    if markdown_out is not None:
        from mvlm_bench.history import default_db_path
        from mvlm_core.atomic import check_output_path

        inputs = [Path(s) for s in (baseline, candidate) if _is_file(s)] + [db or default_db_path()]
        check_output_path(markdown_out, inputs, option="--markdown")
        if markdown_out.is_file() and _is_sqlite(markdown_out):
            raise MvlmError(f"--markdown {markdown_out} is a SQLite file (a history?); refusing to overwrite it: "
                            "choose another path")
    cands = resolve(candidate, db, device, model, protocol)
    if _is_file(baseline):
        bases = resolve(baseline, db)
    else:
        like = cands[0] if len(cands) == 1 else None
        bases = resolve(baseline, db, device, model, protocol, like=like)
    run_comparison(gate.pair_entries(bases, cands), metric, alpha, threshold, json_out, markdown_out, db=db, gate_mode=gate_mode)


def _is_sqlite(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def bench_history(res, *, save: bool, db: Path | str | None, label: str, baseline: str | None,
                  fail_on_regression: str | None, alpha: float = 0.05, confirm=None) -> None:
    """After ``mvlm bench``: store the measurement, compare it with ``--baseline``, apply the gate.

    The measurement is never lost: a history that cannot take it gets it spilled to a JSON file (one line says
    where; exit != 0). The baseline is resolved before saving (so ``latest`` means the previous measurement), but a
    baseline that cannot be resolved does not stop the save.
    """
    from mvlm_bench import compare, gate
    from mvlm_bench.history import entries_from_runs, entry_from_llama_bench, save_or_spill

    threshold = compare.parse_threshold(fail_on_regression) if fail_on_regression else None
    if threshold is not None and not baseline:
        raise MvlmError("--fail-on-regression needs --baseline SELECTOR (e.g. label:main or latest)")
    if res.llama_bench_rows:
        from mvlm_bench.history import _BENCH_TEST_FIELDS

        groups: dict[str, list] = {}
        for r in res.llama_bench_rows:
            groups.setdefault(json.dumps({k: v for k, v in r.items() if k not in _BENCH_TEST_FIELDS}, sort_keys=True,
                                         default=str), []).append(r)
        entries = [entry_from_llama_bench(rows, res.context, label=label) for rows in groups.values()]
    else:
        entries = entries_from_runs(res.runs, label=label)
    if not entries:
        return
    bases: list = []
    base_error: MvlmError | None = None
    if baseline:  # resolved before saving, so `latest` means the previous measurement
        try:
            bases = resolve(baseline, db) if _is_file(baseline) else resolve(baseline, db, like=entries[0])
        except MvlmError as e:
            if not save:
                raise
            base_error = e
    if save:
        outcome = save_or_spill(entries, db)
        if outcome.saved:
            err.print(outcome.message())
            for e, i in zip(entries, outcome.ids, strict=False):
                e.id = i  # so the gate does not count this measurement among the baseline's sessions
        else:
            if outcome.spilled is None:
                print(outcome.unsaved_json, flush=True)  # the last place left for the runs: stdout
            save_error = MvlmError(outcome.message(), exit_code=outcome.exit_code)
            if bases:  # the comparison can still be shown; a regression keeps its exit code, naming both
                try:
                    run_comparison(gate.pair_entries(bases, entries), None, alpha, threshold, db=db)
                except MvlmError as e:
                    raise MvlmError(f"{e}; and {save_error}", exit_code=e.exit_code) from None
            raise save_error
        if base_error is not None:
            raise MvlmError(f"{base_error} (this measurement was saved: {outcome.message()})",
                            exit_code=base_error.exit_code)
    if baseline:
        run_comparison(gate.pair_entries(bases, entries), None, alpha, threshold, db=db, confirm=confirm)


@app.callback()
def history_cmd(
    ctx: typer.Context,
    db: str | None = typer.Option(None, "--db", help=_DB_HELP),
    json_out: bool = typer.Option(False, "--json", help="JSON list (with every repetition) instead of a table."),
    device: str | None = typer.Option(None, "--device", help="Only this device."),
    model: str | None = typer.Option(None, "--model", help="Only this model (name, file or sha256 prefix)."),
    protocol: str | None = typer.Option(None, "--protocol", help="Only this protocol."),
    limit: int = typer.Option(50, "--limit", min=0, help="Show the newest N entries (0: all)."),
) -> None:
    """List stored benchmark measurements (newest last). `mvlm history plot --out DIR` draws them."""
    if ctx.invoked_subcommand is not None:
        return
    from mvlm_bench.compare import median

    with _open(db) as h:
        entries = h.entries(device, model, protocol)
        path = h.path
    if limit > 0:
        entries = entries[-limit:]
    if json_out:
        print(json.dumps([_entry_json(e) | {"samples": e.samples} for e in entries], indent=2, default=str))
        return
    t = Table(title=visible(f"Benchmark history ({path})", markup=True))
    for col in ("id", "time (UTC)", "label", "device", "model", "protocol", "llama.cpp", "commit", "reps",
                "Eval tok/s", "Total s"):
        right = col in ("id", "reps", "Eval tok/s", "Total s")
        t.add_column(col, overflow="fold", justify="right" if right else "left")
    for e in entries:
        def med(k: str, e=e) -> str:
            if k == "eval_tps" and k not in e.samples:  # llama-bench rows: the one tg test's rate, if there is one
                tg = [m for m in e.samples if re.fullmatch(r"tg\d+_tps", m)]
                k = tg[0] if len(tg) == 1 else k
            vals = [v for v in e.samples.get(k, []) if v is not None]
            return _fmt(median(vals)) if vals else "–"

        cells = (e.created_at, e.label, e.context.device, e.context.label(), e.context.protocol,
                 e.context.runtime_commit[:10], e.project_commit[:10] + ("+" if e.project_dirty else ""))
        t.add_row(str(e.id), *(visible(x, markup=True) for x in cells), str(e.repetitions), med("eval_tps"),
                  med("total_s"))
    console.print(t)


@app.command("plot")
def plot_cmd(
    out: Path = typer.Option(Path("mvlm-history-plots"), "--out", "-o", help="Directory for the PNGs and index.html."),
    db: str | None = typer.Option(None, "--db", help=_DB_HELP),
    metric: list[str] | None = typer.Option(None, "--metric", help="Metric key to plot (repeatable)."),
    device: str | None = typer.Option(None, "--device", help="Only this device."),
    model: str | None = typer.Option(None, "--model", help="Only this model."),
    protocol: str | None = typer.Option(None, "--protocol", help="Only this protocol."),
) -> None:
    """Draw metric history per device/model/protocol: PNGs and a self-contained index.html."""
    from mvlm_bench import plots

    with _open(db) as h:
        entries = h.entries(device, model, protocol)
    if not entries:
        raise MvlmError("no stored measurements to plot: run `mvlm bench ... --save` first")
    if out.exists() and not out.is_dir():
        raise MvlmError(f"--out {out} is a file: pass a directory for the PNGs and index.html")
    try:
        files = plots.plot_history(entries, out, tuple(metric) if metric else plots.PLOT_METRICS)
    except OSError as e:
        from mvlm_core.atomic import is_disk_full

        if is_disk_full(e):
            raise MvlmError(f"disk full while writing plots to {out}: free space and run again", exit_code=28) from None
        raise MvlmError(f"cannot write plots to {out}: {e.strerror or e}; choose another --out") from None
    for f in files:
        console.print(str(f))


@app.command("import")
def import_cmd(
    files: list[Path] = typer.Argument(..., help="Reports written by `mvlm bench --json-file`, the .unsaved-*.json a "
                                                 "failed `mvlm bench --save` wrote, or llama-bench output (-o json, "
                                                 "jsonl or sql; also csv, md).", show_default=False),
    db: str | None = typer.Option(None, "--db", help=_DB_HELP),
    device: str | None = typer.Option(None, "--device", help="Device name for llama-bench rows (default: their "
                                                             "cpu_info, or gpu_info)."),
    label: str | None = typer.Option(None, "--label", help="Label every imported measurement with this."),
) -> None:
    """Store measurements from files in the history (one transaction). A measurement already stored (the same
    context, build and per-repetition values, whatever its time or label), or given twice, is skipped. A
    `mvlm bench` report is stored at the time it was measured (its test_time). llama-bench output becomes one
    measurement per configuration, each test (pp512, tg128, ...) a metric whose values are its samples; a file that is
    none of these is refused in one line and nothing is stored."""
    from mvlm_bench.history import History, check_report_file, content_key, entries_from_json

    entries = []
    for f in files:
        check_report_file(f, "pass a JSON file written by `mvlm bench --json-file` or by a failed `mvlm bench --save`, "
                             "or llama-bench output")
        entries += entries_from_json(f, device=device)
    if label is not None:
        for e in entries:
            e.label = label
    with History(db) as h:
        seen = {content_key(e) for e in h.entries()}
        new = []
        for e in entries:
            k = content_key(e)
            if k not in seen:
                seen.add(k)
                new.append(e)
        ids = h.save_many(new) if new else []
        path = h.path
    skipped = len(entries) - len(new)
    note = f" ({skipped} already stored or given twice, skipped)" if skipped else ""
    err.print(f"imported {len(ids)} measurement(s){': ' + ', '.join(f'id:{i}' for i in ids) if ids else ''} "
              f"into {path}{note}")
