"""`mvlm bench parse FILE... [--json]`: read saved llama.cpp output (any era) and show its timings.

Useful on logs from devices the runner never touched (a phone's Termux session, a paper's README, an issue
thread): one row per file with what was found, or JSON (one object per file, the TimingRecord field names plus
``file``) to feed into other tools.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from mvlm_bench.timings import TimingRecord, parse_file


def _cell(v: float | int | None, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}"


def _rate(tps: float | None, n: int | None) -> str:
    """'12.64 (178)': the rate the papers report, then the token count it was measured over."""
    if tps is None and n is None:
        return "–"
    return _cell(tps) + (f" ({n})" if n is not None else "")


def _table(rows: list[tuple[Path, TimingRecord]]) -> Table:
    t = Table(title="llama.cpp timings (tok/s (count); ms)", title_justify="left")
    t.add_column("file", overflow="fold")
    t.add_column("format", overflow="fold")
    for name in ("load ms", "sample", "prompt", "eval", "total ms", "VE ms (img tok)"):
        t.add_column(name, justify="right")
    for path, r in rows:
        vision = "–"
        if r.vision_encode_ms is not None or r.image_tokens is not None:
            vision = _cell(r.vision_encode_ms) + (f" ({r.image_tokens})" if r.image_tokens is not None else "")
        t.add_row(
            path.name,
            r.source_format,
            _cell(r.load_ms),
            _rate(r.sample_tps, r.sample_runs),
            _rate(r.prompt_tps, r.prompt_tokens),
            _rate(r.eval_tps, r.eval_runs),
            _cell(r.total_ms),
            vision,
        )
    return t


def parse_cmd(
    files: list[Path] = typer.Argument(
        ...,
        help="Saved output of llama-cli / llama-completion / llava-cli / llama-mtmd-cli (stdout+stderr merged) "
        "or of llama-bench (md, csv, json, jsonl). Any llama.cpp era.",
        show_default=False,
    ),
    json_: bool = typer.Option(
        False,
        "--json",
        help="Print a JSON list, one object per file: the timing fields (None when absent), source_format, "
        "missing, warnings, file.",
    ),
) -> None:
    """Parse saved llama.cpp output into timing records: a table, or JSON with --json."""
    rows = [(p, parse_file(p)) for p in files]  # parse_file raises MvlmError (one line) on an unreadable file
    if json_:
        out = [{"file": str(p)} | r.to_dict() for p, r in rows]
        typer.echo(json.dumps(out, indent=2, allow_nan=False))
        return
    console = Console()
    console.print(_table(rows))
    for path, r in rows:
        for w in r.warnings:
            console.print(f"[yellow]{path.name}:[/] {w}", highlight=False, markup=True)
