"""Report files written as records come: ``--json-file``, ``--markdown`` and ``--csv`` are rendered again after every
record and replaced atomically (a temporary file in the same directory, created exclusively, renamed over the report:
the file is whole at every moment, and a SIGKILL keeps every record before the one in flight); ``--jsonl`` gets one
line per repetition, appended and flushed to disk. Nothing is written before the first record, so a bench that fails at
its first run leaves an earlier report at the same path as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from mvlm_bench.records.groups import Group, Groups
from mvlm_bench.records.record import Run
from mvlm_bench.sinks.base import Sink
from mvlm_bench.views.exports import render_json_line
from mvlm_core.atomic import AtomicOutputs, fsync_path, is_disk_full
from mvlm_core.errors import MvlmError

EXIT_DISK_FULL = 28


def _write_error(path: Path, e: OSError) -> MvlmError:
    if is_disk_full(e):
        return MvlmError(f"disk full while writing {path}: free space and run again", exit_code=EXIT_DISK_FULL)
    return MvlmError(f"cannot write {path}: {e.strerror or e}")


def replace_text(path: Path, text: str) -> None:
    """``path`` replaced by ``text`` atomically (the old file stays whole until the new one is)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with AtomicOutputs() as out:
            out.path(path).write_text(text, encoding="utf-8")
            out.commit()
    except OSError as e:
        raise _write_error(path, e) from None


class ReportFile(Sink):
    """A report rendered from every group so far (``render(groups) -> text``) after each record."""

    def __init__(self, path: Path, option: str, render: Callable[[Sequence[Group]], str]):
        self.path, self.name, self.render = Path(path), option, render
        self.written = 0

    def receive(self, run: Run, group: Group, groups: Sequence[Group]) -> None:
        replace_text(self.path, self.render(groups))
        self.written += 1

    def kept(self) -> str | None:
        return str(self.path) if self.written else None


class JsonLinesFile(Sink):
    """One JSON line per repetition: the JSON report's record of that repetition alone (its ``runs[0].repetition``
    is its index in its configuration), appended and fsynced; the first line starts the file afresh."""

    def __init__(self, path: Path, option: str = "--jsonl", label: str = "", project: tuple[str, bool | None] = ("", None)):
        self.path, self.name, self.label, self.project = Path(path), option, label, project
        self.written = 0

    def receive(self, run: Run, group: Group, groups: Sequence[Group]) -> None:
        line = render_json_line(Groups().add(run), self.label, self.project, repetition=len(group.runs) - 1)
        if not self.written:
            replace_text(self.path, line)
        else:
            self._append(line)
        self.written += 1

    def _append(self, line: str) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise _write_error(self.path, e) from None

    def close(self) -> None:
        if self.written:
            fsync_path(self.path.parent)

    def kept(self) -> str | None:
        return str(self.path) if self.written else None
