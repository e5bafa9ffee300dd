"""`mvlm bench parse FILE... [--json]`: read saved llama.cpp output (any era) and show its timings.

Useful on logs from devices the runner never touched (a phone's Termux session, a paper's README, an issue
thread): one row per file with what was found, or JSON (one object per file, the TimingRecord field names plus
``file``) to feed into other tools.

Files are read as streams (linear time, bounded memory: a 200 MB log is fine). When no file holds llama.cpp timing
output (no perf lines, no vision-encoder lines, no llama-bench table in md/csv/json/jsonl), the command fails with
one line naming what the file holds instead (SQL, JSON of another kind, binary data, ...); among several files, one
without timings gets its row and a warning.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from mvlm_bench.records.llama_bench_output import parse_llama_bench_file
from mvlm_bench.records.log_facts import describe_content
from mvlm_bench.records.timings import TimingRecord, parse_file
from mvlm_core.console import console as make_console
from mvlm_core.errors import MvlmError


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
    names: list[str] = typer.Argument(
        ...,
        metavar="FILE",
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
    if any(not n.strip() for n in names):
        raise MvlmError("an empty FILE argument (an unset variable in a script?): give the saved output's path")
    files = [Path(n) for n in names]
    rows = [(p, parse_file(p)) for p in files]  # parse_file raises MvlmError (one line) on an unreadable file
    for p, r in rows:  # llama-bench rows that give no rate (e.g. only tests at a depth): nothing to show
        if r.source_format.startswith("llama-bench") and r.prompt_tps is None and r.eval_tps is None:
            rows_found = parse_llama_bench_file(p)
            if rows_found and all("protocol" in x and "metrics" in x for x in rows_found):
                raise MvlmError(f"{p} is an `mvlm bench` report: its timings are parsed already (see its \"metrics\" "
                                "and \"runs\"); show it beside another with `mvlm compare FILE OTHER`, or store it "
                                "with `mvlm history import FILE`")
            raise MvlmError(f"{p}: llama-bench output ({r.source_format.removeprefix('llama-bench-')}) without a pp or "
                            "tg rate at depth 0: store every row with `mvlm history import`")
    empty = [(p, r) for p, r in rows if r.source_format == "unrecognised"]
    if empty and len(empty) == len(rows):
        raise MvlmError(_nothing_found([p for p, _ in empty]))
    for p, r in empty:
        r.warnings.append(f"found {describe_content(p)} instead")
    if json_:
        out = [{"file": str(p)} | r.to_dict() | _bench_rows(p, r) for p, r in rows]
        typer.echo(json.dumps(out, indent=2, allow_nan=False))
        _warn_negatives(rows)
        return
    console = make_console()
    console.print(_table(rows))
    for path, r in rows:
        for w in r.warnings:
            if not _is_negative(w):
                console.print(f"[yellow]{path.name}:[/] {w}", highlight=False, markup=True)
    _warn_negatives(rows)


def _is_negative(warning: str) -> bool:
    return "negative: not a measurement; the value" in warning


def _warn_negatives(rows: list[tuple[Path, TimingRecord]]) -> None:
    """A negative time, count or rate (left empty in the record): one line per file on stderr, with --json too."""
    errors = make_console(stderr=True)
    for p, r in rows:
        for w in r.warnings:
            if _is_negative(w):
                errors.print(f"warning: {p.name}: {w}", highlight=False, markup=False, soft_wrap=True)


def _bench_rows(path: Path, r: TimingRecord) -> dict:
    """llama-bench output's every test row (llama-bench's own field names), beside the record's summary."""
    if not r.source_format.startswith("llama-bench"):
        return {}
    return {"llama_bench_rows": parse_llama_bench_file(path)}


_WHAT_TO_PASS = ("pass the merged stdout+stderr (2>&1) of llama-cli / llama-completion / llava-cli / llama-mtmd-cli, "
                 "or llama-bench output written with -o md, csv, json, jsonl or sql")


def _nothing_found(paths: list[Path]) -> str:
    """One line: which file(s) hold no timing output, what they hold instead, and what to pass."""
    if len(paths) == 1:
        return f"{paths[0]}: no llama.cpp timing output, found {describe_content(paths[0])} instead: {_WHAT_TO_PASS}"
    found = "; ".join(f"{p.name}: {describe_content(p)}" for p in paths[:3]) + ("; ..." if len(paths) > 3 else "")
    return f"none of the {len(paths)} files holds llama.cpp timing output (found {found}): {_WHAT_TO_PASS}"
