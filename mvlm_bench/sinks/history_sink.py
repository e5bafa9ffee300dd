"""``--save``: every repetition committed to the history the moment it ends, one transaction each (the first of a
configuration stores its entry, the next ones append to it), so a bench killed by any signal — SIGKILL included —
keeps every repetition before the one in flight.

When the history will not take a record (not a history, damaged, locked, read-only, disk full, a server gone), every
configuration it did not take whole is written to a JSON file beside it instead (:mod:`mvlm_bench.history.spill`),
with all its repetitions (those the history took too), rewritten after every later record; ``mvlm history import
FILE`` then adds the missing repetitions to the entries the history holds (one measurement stays one entry). The
bench goes on measuring either way.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from mvlm_bench.history.database import History
from mvlm_bench.history.entries import Entry, entries_to_records, entry_from_group
from mvlm_bench.history.errors import db_error, default_db_path, pg_error
from mvlm_bench.history.locations import location, mask_url
from mvlm_bench.history.spill import SaveOutcome, spill_entries
from mvlm_bench.records.groups import Group
from mvlm_bench.records.record import Run
from mvlm_bench.sinks.base import Sink
from mvlm_core.errors import MvlmError


class HistorySink(Sink):
    """The history (``db``: a SQLite path, a PostgreSQL URL, None: ``$MVLM_HISTORY`` / ./mvlm-history.sqlite) as a sink.
    ``ids`` maps a group's context key to its entry id; ``entries`` are the stored entries (for the gate)."""

    name = "--save"

    def __init__(self, db: Path | str | None, label: str = "", project: tuple[str, bool | None] = ("", None)):
        self.loc = location(db if db is not None else default_db_path())
        self.shown = mask_url(self.loc) if isinstance(self.loc, str) else self.loc
        self.label, self.project = label, project
        self.history: History | None = None
        self.ids: dict[str, int] = {}
        self.entries: dict[str, Entry] = {}
        self.stored: dict[str, int] = {}  # repetitions of each group stored
        self.error: MvlmError | None = None
        self.unsaved: dict[str, Group] = {}  # configurations the history did not take whole: every repetition
        self.outcome: SaveOutcome | None = None

    def receive(self, run: Run, group: Group, groups: Sequence[Group]) -> None:
        key = run.context.key()
        if self.error is None:
            try:
                self._store(key, group)
                return
            except (MvlmError, sqlite3.Error, OSError) as e:
                self.error = self._as_error(e)
                self._close_history()
        self.unsaved[key] = group
        self._spill()

    def _store(self, key: str, group: Group) -> None:
        if self.history is None:
            self.history = History(self.loc)
        entry = entry_from_group(group, self.label, self.project)
        if key not in self.ids:
            (self.ids[key],) = self.history.save_many([entry])
        else:
            entry.id = self.ids[key]
            self.history.append_repetition(entry)
        self.entries[key] = entry
        self.stored[key] = len(group.runs)

    def _as_error(self, e: BaseException) -> MvlmError:
        if isinstance(e, MvlmError):
            return e
        return db_error(self.loc, e, "writing") if isinstance(self.loc, Path) else pg_error(self.loc, e, "writing")

    def _spill(self) -> None:
        entries = [entry_from_group(g, self.label, self.project) for g in self.unsaved.values()]
        if self.outcome is None:
            self.outcome = SaveOutcome(db=self.shown, entries=entries, error=self.error)
            self.outcome.spilled, text = spill_entries(entries, self.loc)
        else:
            self.outcome.entries = entries
            text = _rewrite(self.outcome.spilled, entries)
            if text is not None:
                self.outcome.spilled = None
        self.outcome.unsaved_json = text if self.outcome.spilled is None else ""

    def _close_history(self) -> None:
        if self.history is not None:
            try:
                self.history.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
            self.history = None

    def close(self) -> None:
        self._close_history()
        if self.outcome is not None:
            message = self.outcome.message()
            if self.ids:
                message += f" (the history took the repetitions before it: {self.saved_ids()})"
            raise MvlmError(message, exit_code=self.outcome.exit_code)

    def saved_ids(self) -> str:
        return ", ".join(f"id:{i}" for i in self.ids.values())

    def kept(self) -> str | None:
        parts = []
        if self.ids:
            parts.append(f"the history {self.shown} ({self.saved_ids()})")
        if self.outcome is not None and self.outcome.spilled is not None:
            parts.append(str(self.outcome.spilled))
        return " and ".join(parts) or None

    def message(self) -> str:
        """The line a finished bench prints: where the measurement was saved."""
        return f"saved as {self.saved_ids()} in {self.shown}"


def _rewrite(path: Path | None, entries: list[Entry]) -> str | None:
    """Rewrite the spill file with every unsaved entry; the JSON text when it cannot be written (None: written)."""
    import json

    from mvlm_core.atomic import write_text

    text = json.dumps(entries_to_records(entries), indent=2, default=str) + "\n"
    if path is None:
        return text
    try:
        write_text(path, text)
        return None
    except (MvlmError, OSError):
        return text
