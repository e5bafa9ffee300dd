"""Report files written as records come: ``--json-file``, ``--markdown`` and ``--csv`` are rendered again after every
record and replaced atomically (a temporary file in the same directory, created exclusively, renamed over the report:
the file is whole at every moment, and a SIGKILL keeps every record before the one in flight); ``--jsonl`` gets one
line per repetition, appended and flushed to disk. Nothing is written before the first record, so a bench that fails at
its first run leaves an earlier report at the same path as it was.
"""

from __future__ import annotations

import errno
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


def check_appendable(path: Path, option: str = "--jsonl") -> None:
    """An existing ``--jsonl`` file must be mvlm's JSON Lines (every line a record with ``runs``, the last one whole)
    or empty: lines are appended to it, and a file of anything else (notes, /proc/version) is not a place for them."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
            f.seek(max(0, os.fstat(f.fileno()).st_size - 1))
            last = f.read(1)
    except FileNotFoundError:
        return
    except OSError as e:
        raise MvlmError(f"{option} {path}: cannot be read ({e.strerror or e}); choose another path") from None
    if not head.strip():
        return
    import json

    lines = head.split(b"\n")
    complete = lines[:-1] if len(head) == 1 << 16 else [ln for ln in lines if ln.strip()]
    for n, line in enumerate(complete[:50], 1):
        try:
            ok = isinstance(obj := json.loads(line), dict) and "runs" in obj
        except ValueError:
            ok = False
        if not ok:
            raise MvlmError(f"{option} {path} exists and line {n} is not an mvlm bench record: repetitions are appended "
                            "to a --jsonl file; give a new path or an earlier --jsonl file")
    if last != b"\n":
        raise MvlmError(f"{option} {path} ends with a partial line (a damaged file?): give a new path, or remove that "
                        "line first")


class JsonLinesFile(Sink):
    """One JSON line per repetition: the JSON report's record of that repetition alone (its ``runs[0].repetition``
    is its index in its configuration, its ``session`` names this bench), appended to the file (created when absent)
    and fsynced. A write that fails (a full disk) is cut back: the file never ends in half a line."""

    def __init__(self, path: Path, option: str = "--jsonl", label: str = "", project: tuple[str, bool | None] = ("", None)):
        self.path, self.name, self.label, self.project = Path(path), option, label, project
        self.session = session_id()
        self.written = 0

    def receive(self, run: Run, group: Group, groups: Sequence[Group]) -> None:
        line = render_json_line(Groups().add(run), self.label, self.project, repetition=len(group.runs) - 1,
                                session=self.session)
        self._append(line)
        self.written += 1

    def _append(self, line: str) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise _write_error(self.path, e) from None
        try:
            size = os.fstat(fd).st_size
            try:
                data = line.encode("utf-8")
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write")
                os.fsync(fd)
            except OSError as e:
                try:
                    os.ftruncate(fd, size)  # no half line left behind
                except OSError:
                    pass
                raise _write_error(self.path, e) from None
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.written:
            fsync_path(self.path.parent)

    def kept(self) -> str | None:
        return str(self.path) if self.written else None


def session_id() -> str:
    """A name for one bench invocation: its start (UTC) and a random part (two benches started at once differ)."""
    import secrets
    import time

    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)
