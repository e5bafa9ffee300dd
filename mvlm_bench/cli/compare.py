"""``mvlm compare``: two measurements (history selectors or bench JSON files) metric by metric, and the regression gate.

Exit codes: 0 fine; 2 bad input (unknown selector or metric, unreadable file, a history that is not one, ...); 28 the
disk holding the history is full; 4: a gated metric is slower than the baseline by more than ``--fail-on-regression``
AND the repetitions support it (:mod:`mvlm_bench.decide`). CI tells a regression from a broken job by that code.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mvlm_core.console import console as make_console
from mvlm_core.errors import MvlmError

console = make_console()
err = make_console(stderr=True)

_SELECTOR_HELP = ("latest, latest~N, id:N, label:NAME, commit:SHA, runtime:SHA (llama.cpp commit), "
                  "or a JSON file written by `mvlm bench --json-file`")
_BASELINE = typer.Argument("latest~1", help=f"Baseline: {_SELECTOR_HELP}.")
_CANDIDATE = typer.Argument("latest", help=f"Candidate: {_SELECTOR_HELP}.")
_DB = typer.Option(None, "--db", help="History: a SQLite file or a PostgreSQL URL postgresql://user@host:port/db "
                                      "(default $MVLM_HISTORY or ./mvlm-history.sqlite; docs/lab.md).")
_JSON = typer.Option(False, "--json", help="Print the comparison as JSON.")
_MARKDOWN = typer.Option(None, "--markdown", help="Also write the table as Markdown.")
_METRIC = typer.Option(None, "--metric", help="Metric to compare (repeatable): its name as the tables show it (Eval, "
                                              "Eval_prompt, Total, VE total) or its key (eval_tps, ...).")
_DEVICE = typer.Option(None, "--device", help="Only history entries of this device.")
_MODEL = typer.Option(None, "--model", help="Only entries of this model (name, file or sha256 prefix).")
_PROTOCOL = typer.Option(None, "--protocol", help="Only entries of this protocol.")
_ALPHA = typer.Option(0.05, "--alpha", help="Significance level of the one-sided Mann-Whitney test.")
_FAIL = typer.Option(None, "--fail-on-regression", help="Exit 4 when a gated metric is slower by more than this (5%, or "
                                                        "the fraction 0.05; a bare 5 is refused) and the evidence "
                                                        "supports it (docs/ci.md).")
_GATE = typer.Option("auto", "--gate", help="How the gate judges: history (the baseline's stored sessions give the "
                                            "noise; needs 3 or more), within-session (the two sessions' repetitions "
                                            "only: cries wolf across sessions), auto (history for a stored baseline, "
                                            "within-session for a JSON file).")


def compare_cmd(baseline: str = _BASELINE, candidate: str = _CANDIDATE, db: str | None = _DB, json_out: bool = _JSON,
                markdown_out: Path | None = _MARKDOWN, metric: list[str] | None = _METRIC, device: str | None = _DEVICE,
                model: str | None = _MODEL, protocol: str | None = _PROTOCOL, alpha: float = _ALPHA,
                fail_on_regression: str | None = _FAIL, gate_mode: str = _GATE) -> None:
    """Compare two measurements metric by metric: medians, speedup, 95% CI, Mann-Whitney p and a verdict.

    The baseline of a history selector is looked for among entries of the candidate's setup (same device, model file,
    protocol and settings), so `mvlm compare` with no arguments compares the latest run with the one before it.

      mvlm compare                                  # latest~1 vs latest

      mvlm compare label:main latest --fail-on-regression 5%

      mvlm compare base.json cand.json --metric Eval
    """
    from mvlm_bench.decide import gate, stats, verdict
    from mvlm_bench.views.comparison import print_verdict, verdict_markdown

    if not 0 < alpha < 1:  # also refuses nan
        raise MvlmError(f"--alpha {alpha:g} is not a significance level: pass a number between 0 and 1 such as 0.05")
    threshold = stats.parse_threshold(fail_on_regression) if fail_on_regression else None
    if gate_mode not in verdict.GATE_MODES:
        raise MvlmError(f"--gate {gate_mode!r}: choose one of {', '.join(verdict.GATE_MODES)}")
    if gate_mode != "auto" and threshold is None:
        raise MvlmError(f"--gate {gate_mode} only decides with a threshold: add --fail-on-regression (e.g. 5%), "
                        "or leave --gate out")
    metrics = verdict.check_metrics(metric)
    if markdown_out is not None:
        _check_markdown(markdown_out, baseline, candidate, db)
    cands = verdict.resolve(candidate, db, device, model, protocol)
    if verdict.is_report_file(baseline):
        bases = verdict.resolve(baseline, db)
    else:
        bases = verdict.resolve(baseline, db, device, model, protocol, like=cands[0] if len(cands) == 1 else None)
    v = verdict.judge_pairs(gate.pair_entries(bases, cands), metrics, alpha, threshold, db=db, gate_mode=gate_mode)
    if json_out:
        print(json.dumps(v.as_json(), indent=2, default=str))
    else:
        print_verdict(v, console, err)
    if markdown_out is not None:
        from mvlm_core.atomic import write_text

        write_text(markdown_out, verdict_markdown(v))  # one line (MvlmError) when it cannot be written
    error = v.error()
    if error is not None:
        raise error


def _check_markdown(markdown_out: Path, baseline: str, candidate: str, db: str | None) -> None:
    from mvlm_bench.decide.verdict import is_report_file
    from mvlm_bench.history.errors import default_db_path
    from mvlm_core.atomic import check_output_path

    inputs = [Path(s) for s in (baseline, candidate) if is_report_file(s)] + [db or default_db_path()]
    check_output_path(markdown_out, inputs, option="--markdown")
