"""A failed run said in one line: the line of its output that best says why (:func:`relevant_line`) and how it ended
(:func:`describe_failure`); the whole output is kept for the log file the command names."""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass
class Failure:
    repetition: int
    message: str
    output_tail: str
    output: str = ""  # the whole output of the failed run (for the log file the CLI names)


# The line of a failed run's log that says most about why, best first: llama.cpp's own aborts ("file.cpp:2158: msg",
# GGML_ASSERT) and explicit errors of its loaders, crashes and the shell's own complaints (exec format / syntax errors
# of a binary built for another CPU), then any error line.
_RELEVANT = [
    re.compile(p, re.I)
    for p in (
        r"error loading model|failed to load|GGML_ASSERT|terminate called|what\(\):",
        r"[\w./-]+\.(?:c|cc|cpp|cxx|h|hpp|cu|m|mm):\d+: \S",
        r"Illegal instruction|Segmentation fault|Bus error|Aborted|core dumped|Killed",
        r"Syntax error|Exec format error|cannot execute|not found|No such file|Permission denied|CANNOT LINK",
        r"\berror\b|\bERROR\b",
        r"\bfailed\b|\bunable\b|\bcannot\b|\binvalid\b|out of memory",
    )
]
# ggml's crash handler attaches gdb and prints a backtrace: its lines ("#3 0x... in f () from lib.so", "30\t../sysdeps/
# unix/sysv/linux/wait4.c: No such file or directory.", "[New LWP 12]", ...) say nothing about why the run failed.
_BACKTRACE_NOISE = re.compile(
    r"^(#\d+\s+0x[0-9a-f]+|0x[0-9a-f]+ in |\d+\t|\[New LWP|\[New Thread|\[Thread debugging|\[Inferior \d|"
    r"Using host libthread_db|warning: (Unable to find libthread_db|could not find '\.gnu_debug)|\(gdb\)|ptrace: )"
    r"|\.\./(sysdeps|csu|nptl)/|(sysdeps|libc-start|libc_start)[\w./-]*: No such file",
    re.I,
)
# Where a llama.cpp abort message starts inside a line (printed right after the generated text: "Step 1:../src/…").
_ABORT_AT = re.compile(r"(?:\.{1,2}/)?[\w/-][\w./-]*\.(?:c|cc|cpp|cxx|h|hpp|cu|m|mm):\d+: \S")


LOG_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ [A-Z] ")


def relevant_line(output: str, limit: int = 240) -> str:
    """The one line of a failed run's output that best says why (see ``_RELEVANT``); else its last line, so marked.

    A crash handler's gdb backtrace is skipped; llama.cpp's abort message (``common.cpp:2158: get_sub_batch: failed
    to add token …``) is cut from the generated text printed before it on the same line."""
    # llama.cpp's timestamped log lines ("0.00.002.305 E llama_model_load: ...") lose the timestamp and level
    lines = [LOG_PREFIX.sub("", ln.strip()) for ln in output.splitlines()
             if ln.strip() and not ln.startswith("__MVLM_RC__")]
    lines = [ln for ln in lines if not _BACKTRACE_NOISE.search(ln)]
    if not lines:
        return "no output (llama.cpp can exit before its async logger flushes)"
    pick = f"last output line: {lines[-1]}"
    for rx in _RELEVANT:
        hit = next((ln for ln in lines if rx.search(ln)), None)
        if hit:
            pick = hit
            break
    at = _ABORT_AT.search(pick)
    if at and at.start() > 0:
        pick = pick[at.start():]
    return pick if len(pick) <= limit else pick[: limit - 3] + "..."



def describe_failure(r, timeout: float) -> str:
    """How a run ended, in words: timed out, killed by a signal (SIGILL: a binary for another CPU), a status."""
    if r.timed_out:
        return f"timed out after {timeout:.0f} s"
    if getattr(r, "signal", None) == 4:
        return ("killed by signal 4 (SIGILL: the binary uses an instruction this CPU does not run; host builds are "
                "-march=native: build the runtime on this CPU)")
    if getattr(r, "signal", None):
        return f"killed by signal {r.signal} (crash?)"
    return f"exited with status {r.returncode}"

