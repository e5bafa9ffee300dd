"""Sinks receive a bench's records as they come, and :class:`Sinks` hands each record to every one of them.

A record reaches every sink before the next run starts (the runner's ``emit``), inside
:meth:`mvlm_core.stops.StopSignals.held`: a stop signal that arrives while a report is replaced or a history
transaction commits is raised once the record is in every output. A sink that fails (disk full, a history that will not
take it) keeps its error and is left out afterwards; the others go on, and the measurement goes on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from mvlm_bench.records.groups import Group, Groups
from mvlm_bench.records.record import Run
from mvlm_core.errors import MvlmError


class Sink:
    """One output of a bench. ``receive`` is called with every record (and its group, and all groups so far, each
    aggregated once); ``close`` at the end, interrupted or not; ``kept()`` says where the records are, for the line an
    interrupted or failed bench prints (None: nothing kept there)."""

    name = "output"

    def receive(self, run: Run, group: Group, groups: Sequence[Group]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        return None

    def kept(self) -> str | None:
        return None


class Sinks:
    """The fan-out: ``emit(run)`` puts the record in its group and gives it to every sink (see the module docstring)."""

    def __init__(self, sinks: Sequence[Sink], stops=None):
        self.sinks = list(sinks)
        self.stops = stops
        self.groups = Groups()
        self.errors: list[tuple[Sink, MvlmError]] = []
        self._failed: set[int] = set()

    @property
    def records(self) -> int:
        return len(self.groups.runs)

    def emit(self, run: Run) -> None:
        held = self.stops.held() if self.stops is not None else contextlib.nullcontext()
        with held:
            group = self.groups.add(run)
            groups = self.groups.all()
            for i, sink in enumerate(self.sinks):
                if i in self._failed:
                    continue
                try:
                    sink.receive(run, group, groups)
                except MvlmError as e:
                    self._failed.add(i)
                    self.errors.append((sink, e))

    def close(self) -> None:
        held = self.stops.held() if self.stops is not None else contextlib.nullcontext()
        with held:
            for i, sink in enumerate(self.sinks):
                try:
                    sink.close()
                except MvlmError as e:
                    if i not in self._failed:
                        self._failed.add(i)
                        self.errors.append((sink, e))

    def kept(self) -> list[str]:
        """Where the records are, sink by sink: a sink that failed says what it kept before (a report's last whole
        version, the history's entries and its spill file)."""
        return [k for s in self.sinks if (k := s.kept())]
