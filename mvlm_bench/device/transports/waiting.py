"""Waiting for a local client process (transports.base.run_client) without waking on the cores the measured binary
uses: one blocking system call per wait, and the live output read back at most every ``STREAM_POLL_S``."""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Callable

OutputFn = Callable[[str], None]  # a run's output as it arrives (Transport.run's on_output)

STREAM_POLL_S = 0.25


def wait_quietly(proc: subprocess.Popen, timeout: float | None) -> int:
    """``proc.wait(timeout)`` asleep in one system call (a Linux pidfd; elsewhere CPython's wait, which polls every
    50 ms: 20 wake-ups a second on the cores the measured binary uses). Signal handlers run and raise as in ``wait``."""
    try:
        fd = os.pidfd_open(proc.pid) if timeout is not None and proc.returncode is None else None
    except (AttributeError, OSError):  # not Linux >= 5.3, or the process already reaped
        fd = None
    if fd is None:
        return proc.wait(timeout=timeout)
    try:
        deadline = time.monotonic() + timeout
        while not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(proc.args, timeout)
        return proc.wait()
    finally:
        os.close(fd)


def wait_streaming(proc: subprocess.Popen, timeout: float | None, out, on_output: OutputFn) -> int:
    """``proc.wait(timeout)`` that hands each new piece of the captured output to ``on_output`` meanwhile (read with
    pread, so the writer's file offset is untouched). Raises ``subprocess.TimeoutExpired`` like ``wait``."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    deadline = None if timeout is None else time.monotonic() + timeout
    offset = 0

    def feed() -> None:
        nonlocal offset
        while chunk := os.pread(out.fileno(), 1 << 16, offset):
            offset += len(chunk)
            text = decoder.decode(chunk)
            if text:
                on_output(text)

    while True:
        step = STREAM_POLL_S if deadline is None else max(0.0, min(STREAM_POLL_S, deadline - time.monotonic()))
        try:
            rc = wait_quietly(proc, step)
        except subprocess.TimeoutExpired:
            feed()
            if deadline is not None and time.monotonic() >= deadline:
                raise
            continue
        feed()
        return rc
