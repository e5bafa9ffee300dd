"""A bench's live progress on the terminal (rich): the push's bytes, then one line saying what runs (``warm-up 1/1``,
``run 2/3``; in a sweep also ``config 2/4`` and what it is; an A/B session's side), the tokens generated so far in this
run, an ETA from the runs completed, and what a wait is for (cooling, --delay, another bench's lease). Its hooks are
the runner's events (:class:`mvlm_bench.session.runners.Events`). Off when stderr is not a terminal; log lines then go
to stderr as plain lines."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from mvlm_bench.plan.sweep import describe, varying


class _AmountColumn(DownloadColumn):
    """The progress bar's amount in each task's own unit: bytes for the push, ``2/4 runs`` for the runs."""

    def render(self, task):
        unit = task.fields.get("unit", "bytes")
        if unit == "bytes":
            return super().render(task)
        if task.total is None:
            return Text("")
        return Text(f"{int(task.completed)}/{int(task.total)} {unit}", style="progress.download")


class BenchProgress:
    """The progress display of one bench (a context manager). ``plan``: what runs (its protocol, configurations)."""

    def __init__(self, err: Console, plan, device: str):
        self.err, self.plan = err, plan
        self.prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), _AmountColumn(), TimeElapsedColumn(),
                             TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal,
                             refresh_per_second=1)  # a redraw is work on the cores a local run is measured on
        self.head = f"{plan.protocol} on {device}"
        self.push_task = self.prog.add_task(f"push to {device}", total=None, visible=False, unit="bytes")
        self.run_task = self.prog.add_task(self.head, total=None, visible=False,
                                           unit="samples" if plan.protocol == "dataset" else "runs")
        self.varying = varying(plan.configs)
        self.starts: list[float] = []
        self.run, self.tokens, self.note, self.config = "", "", "", ""
        self.waiting: list[str] = []
        self.live = False

    def __enter__(self) -> BenchProgress:
        self.prog.__enter__()
        self.live = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.live = False
        self.prog.__exit__(*exc)

    def log(self, message: str) -> None:
        (self.prog.console if self.live else self.err).print(f"[dim]{message}[/]", highlight=False, markup=True)

    def sync_progress(self, done: int, total: int) -> None:
        self.prog.update(self.push_task, completed=done, total=total, visible=True)

    def on_wait(self, message: str) -> None:
        """The lease is another bench's: said once as a line (logs, CI), then on the live status line."""
        if not self.waiting:
            self.log(message)
        self.waiting.append(message)
        self.prog.update(self.push_task, visible=False)
        self.prog.update(self.run_task, visible=True, description=message)

    def on_status(self, text: str) -> None:  # a wait before the next run (cooling, --delay)
        self.prog.update(self.push_task, visible=False)
        self.prog.update(self.run_task, visible=True, description=f"{self.head}: {text}")

    def on_step(self, step) -> None:
        now = time.monotonic()
        self.starts.append(now)
        self.config = ""
        if step.configs > 1:
            self.config = f" config {step.config + 1}/{step.configs} ({describe(step.spec, self.varying)})"
        self.run, self.tokens = step.label, ""
        self.note = self._eta(now, step.total - step.index)
        self.prog.update(self.push_task, visible=False)
        self.prog.update(self.run_task, completed=step.index, total=step.total, visible=True, description=self._text())

    def on_tokens(self, n: int, of: int) -> None:
        self.tokens = f"{n}/{of} tokens"
        self.prog.update(self.run_task, description=self._text())

    def token_hook(self) -> Callable[[int, int], None] | None:
        """The live token count is for a live progress line only."""
        return self.on_tokens if self.err.is_terminal else None

    def _eta(self, now: float, left: int) -> str:
        if len(self.starts) < 2 or left <= 0:
            return ""
        per = (now - self.starts[0]) / (len(self.starts) - 1)
        s = int(per * left + 0.5)
        return f"ETA {s // 60}:{s % 60:02d}"

    def _text(self) -> str:
        parts = [f"{self.head}{self.config}: {self.run}"] + [p for p in (self.tokens, self.note) if p]
        return " · ".join(parts)
