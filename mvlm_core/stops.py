"""Stop signals (Ctrl-C, SIGTERM, SIGHUP, SIGQUIT) as one exception, held back while something must not be cut.

A long command (a bench, a server) installs :class:`StopSignals`. The first stop signal raises :class:`Stopped` (a
``BaseException`` like ``KeyboardInterrupt``, so every ``finally`` runs and no ``except Exception`` swallows it; not a
``KeyboardInterrupt``, which typer would turn into exit 130 whatever the signal): the device's process is killed, the
lease released, temporaries removed — unless it arrives inside :meth:`StopSignals.held` (a sink writing a finished
measurement, a history transaction committing): then it is raised when that block ends, so a signal never costs a
finished measurement. Once stopping (:meth:`begin`, or after the first signal) a further stop signal never raises: it
only hastens the stop (SIGKILL to the registered processes' groups). ``Stopped.exit_code`` is 128 + the signal (130,
143, 129, 131). The ``mvlm`` entry point installs them first thing, paused until the command runs.

Installing the handlers also undoes an inherited "ignore SIGINT" (a job started with ``&`` by a non-interactive shell):
a user's Ctrl-C, or a CI runner's SIGINT, stops the command however it was started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class Stopped(BaseException):  # noqa: N818 - a stop, like KeyboardInterrupt and SystemExit, not an error
    """A stop signal: unwinds like Ctrl-C. ``signum``; ``exit_code`` = 128 + signum; ``name`` (SIGTERM, ...)."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(self.name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_CURRENT: list[StopSignals] = []


def installed() -> StopSignals | None:
    """The handlers installed last in this process (the ``mvlm`` entry point installs them first thing), else None."""
    return _CURRENT[-1] if _CURRENT else None


class StopSignals:
    """Handlers for the stop signals while a command runs (module docstring). ``procs``: processes to SIGKILL when a
    second signal hastens the stop (a server being stopped)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.stopping = False
        self.pending: int | None = None
        self.depth = 0
        self.procs: list[subprocess.Popen] = []
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
            _CURRENT.append(self)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        if threading.current_thread() is threading.main_thread():
            for sig, old in self._previous.items():
                signal.signal(sig, old)  # type: ignore[arg-type]
        self._previous.clear()

    def begin(self) -> None:
        """From now on a stop signal hastens the stop and never raises."""
        self.stopping = True

    def done(self) -> None:
        """Stopped and reaped: stop signals are ignored from here on (Python's own shutdown would otherwise restore the
        default action, death by the signal, for a handler it installed)."""
        self.stopping = True
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                signal.signal(sig, signal.SIG_IGN)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A block a stop signal must not cut (writing a finished measurement): a signal that arrives inside is raised
        as :class:`Stopped` when the outermost held block ends."""
        self.pause()
        try:
            yield
        finally:
            self.depth -= 1
        self.resume(0)

    def pause(self) -> None:
        """Hold stop signals back until :meth:`resume` (the ``mvlm`` entry point: while the command starts up)."""
        self.depth += 1

    def resume(self, step: int = 1) -> None:
        """End a :meth:`pause`; a signal that arrived meanwhile is raised now as :class:`Stopped`."""
        self.depth -= step
        if self.depth == 0 and self.pending is not None and not self.stopping:
            signum, self.pending = self.pending, None
            self.stopping = True
            raise Stopped(signum)

    def _handle(self, signum: int, frame: object) -> None:
        if self.stopping:
            self._hasten()
            return
        if self.depth:
            self.pending = self.pending or signum
            return
        self.stopping = True
        raise Stopped(signum)

    def _hasten(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:  # not reaped yet, so the pid is still this process's
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def starting() -> contextlib.AbstractContextManager:
    """Hold stop signals back while a child process starts (``with starting(): proc = Popen(...)``): a signal that
    came between the fork and the ``Popen`` object reaching the caller would leave a child nobody stops. Held only
    when mvlm's handlers are installed; raised once the ``with`` ends, when the caller holds the process."""
    stops = installed()
    return stops.held() if stops is not None else contextlib.nullcontext()


def stop_exit_code(e: BaseException) -> int | None:
    """128 + signal for a stop (:class:`Stopped`; a plain KeyboardInterrupt is SIGINT's 130; the ``SystemExit(143)``
    the mvlm entry point makes of SIGTERM where no :class:`StopSignals` is installed), else None."""
    if isinstance(e, Stopped):
        return e.exit_code
    if isinstance(e, KeyboardInterrupt):
        return 128 + signal.SIGINT
    if isinstance(e, SystemExit) and e.code in (128 + signal.SIGTERM, 128 + signal.SIGHUP):
        return int(e.code)
    return None
