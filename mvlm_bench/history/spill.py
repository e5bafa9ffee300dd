"""Saving without ever losing a measurement: when the history cannot take it, the entries go to a JSON file beside it
that ``mvlm compare`` reads and ``mvlm history import`` stores later."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import shlex
import sqlite3
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mvlm_bench.history.database import History
from mvlm_bench.history.entries import Entry, entries_to_records
from mvlm_bench.history.errors import DEFAULT_DB_NAME, HistoryError, db_error, default_db_path, pg_error
from mvlm_bench.history.locations import db_option, location, mask_url
from mvlm_core.errors import MvlmError


@dataclasses.dataclass
class SaveOutcome:
    """What :func:`save_or_spill` did: saved (``ids``), or not (``error``) with the entries ``spilled`` to a JSON file
    (or, when no file could be written anywhere, ``unsaved_json`` for the caller to print)."""

    db: Path | str  # a SQLite file, or a PostgreSQL URL with its password masked
    entries: list[Entry]
    ids: list[int] = dataclasses.field(default_factory=list)
    error: MvlmError | None = None
    spilled: Path | None = None
    unsaved_json: str = ""

    @property
    def saved(self) -> bool:
        return self.error is None

    @property
    def exit_code(self) -> int:
        return self.error.exit_code if self.error is not None else 0

    def message(self) -> str:
        """One line: why the history did not take the measurement, where it is instead, and what to do."""
        if self.error is None:
            return f"saved as {', '.join(f'id:{i}' for i in self.ids)} in {self.db}"
        what, todo = ((self.error.what, self.error.todo) if isinstance(self.error, HistoryError)
                      else (str(self.error), ""))
        reps = sum(e.repetitions for e in self.entries)
        n = f"{len(self.entries)} measurement(s), {reps} repetition(s)"
        if self.spilled is not None:
            kept = f"the runs ({n}) were written to {self.spilled} instead"
            then = (f"`mvlm history import {shlex.quote(str(self.spilled))} {db_option(self.db)}` stores them "
                    "(`mvlm compare` reads the file as it is)")
        else:
            kept = f"the runs ({n}) could not be written to any file either and were printed on stdout as JSON"
            then = "save that JSON to a file and `mvlm history import` it"
        return f"not saved to the benchmark history: {what}; {kept}: {todo + ', then ' if todo else ''}{then}"


def spill_entries(entries: Sequence[Entry], db: Path | str) -> tuple[Path | None, str]:
    """Write entries to ``<db>.unsaved-<UTC time>.json`` beside the history, else in the current directory, else in
    the temporary directory (a PostgreSQL history: ``mvlm-history-<database>.unsaved-...`` in the current directory,
    else the temporary one). Returns (the file or None when none could be written, the JSON text)."""
    from mvlm_core.atomic import write_text

    text = json.dumps(entries_to_records(entries), indent=2, default=str) + "\n"
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    loc = location(db)
    if isinstance(loc, str):
        dbname = re.sub(r"[^A-Za-z0-9._-]+", "_", loc.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1])[:60]
        stem, beside = f"mvlm-history-{dbname or 'postgresql'}.unsaved-{stamp}", []
    else:
        stem, beside = f"{loc.name or DEFAULT_DB_NAME}.unsaved-{stamp}", [loc.parent]
    dirs: list[Path] = []
    for d in (*beside, Path.cwd(), Path(tempfile.gettempdir())):
        try:
            d = d.resolve()
        except OSError:
            continue
        if d not in dirs:
            dirs.append(d)
    for d in dirs:
        if not d.is_dir():
            continue
        k = 0
        while (d / f"{stem}{f'-{k}' if k else ''}.json").exists() and k < 1000:
            k += 1
        target = d / f"{stem}{f'-{k}' if k else ''}.json"
        try:
            return write_text(target, text), text
        except (MvlmError, OSError):
            continue
    return None, text


def save_or_spill(entries: Sequence[Entry], db: Path | str | None = None) -> SaveOutcome:
    """Store the entries in the history in one transaction; if that fails for any reason (not a history, damaged,
    locked, read-only, disk full, a directory, ...), write them to a JSON file instead (:func:`spill_entries`).

    Never raises for a history problem: the outcome says what happened (``message()`` is one line for the user). The
    entries get their ``created_at`` now, so a later ``mvlm history import`` of the spilled file keeps the time.
    """
    loc = location(db if db is not None else default_db_path())
    path = mask_url(loc) if isinstance(loc, str) else loc
    entries = list(entries)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    for e in entries:
        e.created_at = e.created_at or now
    out = SaveOutcome(db=path, entries=entries)
    try:
        with History(loc) as h:
            out.ids = h.save_many(entries)
        return out
    except MvlmError as e:
        out.error = e
    except (sqlite3.Error, OSError) as e:
        out.error = db_error(loc, e, "writing") if isinstance(loc, Path) else pg_error(loc, e, "writing")
    except BaseException:  # Ctrl-C / SIGTERM while saving: keep the runs, then stop as asked
        spill_entries(entries, loc)
        raise
    out.spilled, text = spill_entries(entries, loc)
    if out.spilled is None:
        out.unsaved_json = text
    return out


