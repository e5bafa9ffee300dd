"""``mvlm report --paper NAME``: your stored latencies in a seed paper's table layout (:mod:`mvlm_bench.papers`)."""

from __future__ import annotations

import json

import typer

from mvlm_bench.papers.beside import build, check_paper, load_entries, render
from mvlm_bench.papers.tables import PAPERS
from mvlm_core.console import console as make_console
from mvlm_core.terminal import visible

console = make_console()


def report_cmd(
    paper: str = typer.Option(..., "--paper", help=f"Which paper's tables: {', '.join(PAPERS)}."),
    db: str | None = typer.Option(None, "--db", help="History: a SQLite file or a PostgreSQL URL (default $MVLM_HISTORY "
                                                     "or ./mvlm-history.sqlite)."),
    device: str | None = typer.Option(None, "--device", help="Only your entries of this device."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Your stored latency measurements in a paper's table layout, beside the paper's own published rows.

      mvlm report --paper mobilevlm --device sd888
    """
    key = check_paper(paper)
    entries, path, note = load_entries(db, device)
    from mvlm_bench.history.locations import is_url

    # the --db to repeat in fill commands: as given (a URL as shown, its password left out: fill_command)
    db_option = None if db is None else str(path) if is_url(path) else str(db)
    rep = build(key, entries, path, device, note, db_option)
    if json_out:
        print(json.dumps(rep, indent=2, allow_nan=False))
        return
    console.print(visible(f"{PAPERS[key]}; your measurements from {path}" + (f" ({note})" if note else "")),
                  highlight=False, markup=False)
    for item in render(rep):
        if isinstance(item, str):
            console.print(visible(item), highlight=False, markup=False, soft_wrap=True)
        else:
            console.print(item)
