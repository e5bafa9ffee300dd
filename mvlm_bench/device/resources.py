"""On-device resources of one benchmark run: the llama.cpp process's peak resident memory (and, with
:mod:`mvlm_bench.device.thermal`, the device's temperature before and after it).

**Peak RSS.** The command runs under a small POSIX ``sh`` wrapper on the device (the same on Linux, over ssh, and on
Android's mksh/toybox): the binary starts in the background, a poller reads its ``VmHWM`` (the kernel's high-water
mark of the resident set, in kB) from ``/proc/PID/status`` (every 10 ms for the first 50 samples, then every
0.25 s) and appends each new value to a small file next to the work dir, and the wrapper ``wait``s for the binary
itself, so its exit is seen at once (the local wall time, the papers' Total, gains only the wrapper's own start, about
a millisecond, not a polling interval). Only samples after the exec count: until then the background child is a fork
of the wrapper shell (same ``/proc/PID/comm``) and its VmHWM is the shell's few kB. When the binary has exited, the
poller is stopped and the wrapper prints the largest value on a marker line, which :func:`split_marker` takes out of
the output again; the value counts only when it held (within 2%) for two more samples, so a run that ended while still
loading is not reported as its half-loaded size. A run too short for that (``--version``: milliseconds) gets the
marker value ``short``: null, with :data:`TOO_SHORT_NOTE` on the result. VmHWM never decreases, so the only thing a
0.25 s poll can miss is growth in the last quarter second of a run; llama.cpp allocates its weights, KV cache and
compute buffers while loading, long before that. The binary's exit status (or the signal that killed it) is passed on
unchanged.

What is measured under an emulator (``exec_wrapper = ["qemu-aarch64-static"]``): the wrapper runs outside qemu, so
``/proc/PID`` is the qemu-user process, which holds the guest's memory plus qemu's own (translated code cache, its
heap): an upper bound of what the binary would need on a real arm64 device. Likewise a wrapper that starts the binary
as its child instead of exec'ing it (benchmarks/gate_rates.py's throttle) is the process read. A device without
``/proc`` (macOS) gives no reading (null).
"""

from __future__ import annotations

import copy
import dataclasses

from mvlm_bench.device.transports.base import RSS_WRAPPER_NAME
from mvlm_core.errors import MvlmError

RSS_MARKER = "__MVLM_PEAK_RSS_KB__="
POLL_S = 0.25
FAST_POLL_S = 0.01  # the first FAST_POLLS samples after the exec: a short run still gets real readings
FAST_POLLS = 50
STEADY = 2  # a peak counts once it held (within 2%) for this many more samples: the binary was not still loading
TOO_SHORT = "short"  # the marker's value when the binary ran but exited before a post-exec sample
TOO_SHORT_NOTE = ("ended before its peak memory could be read (a run of a few ms, or one still loading when it "
                  "ended): peak_rss_mb is null")
# $1: a scratch file path prefix on the device; the rest: the command. The poller's output goes to /dev/null, so a
# `sleep` left over after it is stopped cannot hold the ssh/adb session open. A sample counts only once the background
# child has exec'd the binary: its /proc/PID/comm is no longer the wrapper shell's own (before the exec it is the
# forked shell, whose VmHWM is the shell's, not the binary's).
WRAPPER = (
    'f="$1.$$"; shift; : > "$f" 2>/dev/null || f=/dev/null; '
    '"$@" & p=$!; '
    "trap 'kill $p 2>/dev/null; trap - TERM; kill -TERM $$' TERM; "  # stopped (mvlm died: PDEATHSIG): the binary too
    "( h=0; b=0; i=0; j=0; c0=; read -r c0 < /proc/$$/comm 2>/dev/null; while [ -r /proc/$p/status ]; do v=; c=; "
    "read -r c < /proc/$p/comm 2>/dev/null; "
    'if [ -n "$c" ] && [ "$c" = "$c0" ]; then sleep 0.002 2>/dev/null || sleep 1; continue; fi; '
    "while read -r k n rest; do [ \"$k\" = VmHWM: ] && v=$n; done < /proc/$p/status 2>/dev/null; "
    '[ -z "$v" ] && break; '
    'if [ "$v" -gt "$h" ]; then h=$v; echo "$h" >> "$f"; fi; '
    'if [ $((v * 50)) -gt $((b * 51)) ]; then b=$v; j=0; else j=$((j + 1)); '
    f'[ "$j" = {STEADY} ] && echo s >> "$f"; fi; i=$((i + 1)); '
    f'if [ "$i" -le {FAST_POLLS} ]; then sleep {FAST_POLL_S} 2>/dev/null || sleep 1; '
    f"else sleep {POLL_S} 2>/dev/null || sleep 1; fi; done ) </dev/null >/dev/null 2>&1 & w=$!; "
    "wait $p; rc=$?; kill $w 2>/dev/null; wait $w 2>/dev/null; "
    "m=; b=0; ok=; if [ -r \"$f\" ]; then while read -r n; do case $n in s) ok=1;; *[!0-9]*|'') ;; *) "
    'm=$n; [ $((n * 50)) -gt $((b * 51)) ] && b=$n && ok=;; esac; done < "$f"; fi; '
    '[ "$f" = /dev/null ] || rm -f "$f"; '
    f'[ -z "$ok" ] && [ -r /proc/$$/status ] && m={TOO_SHORT}; '
    f"printf '\\n{RSS_MARKER}%s\\n' \"${{m:--}}\" >&2; "
    'if [ "$rc" -gt 128 ] && [ "$rc" -le 192 ]; then s=$((rc - 128)); trap - "$s" 2>/dev/null; kill -"$s" $$; fi; '
    "exit $rc"
)


# $1: a scratch path prefix on the device; the rest: the command, its output kept in a file there until it has ended.
# A pinger writes one empty line every PING_S seconds: when the session is gone (Ctrl-C, the link dropped) its write
# fails and it stops the command, as a run writing its own output into the session would have been stopped by the
# broken pipe. Every wake-up is a process (sleep) and a packet beside the measured binary, hence not every second.
PING_S = 2
QUIET = ('f="$1.$$"; shift; "$@" >"$f" 2>&1 </dev/null & p=$!; '
         f'( trap "" PIPE; while sleep {PING_S} >/dev/null 2>&1; do echo 2>/dev/null || {{ kill -TERM $p 2>/dev/null; '
         'exit 0; }; done ) </dev/null & w=$!; wait $p; rc=$?; kill $w 2>/dev/null; cat "$f" 2>/dev/null; rm -f "$f"; '
         'exit $rc')


def split_marker(output: str) -> tuple[str, float | None]:
    """(the output without the wrapper's marker line, peak RSS in MB (1e6 bytes) or None when unknown)."""
    idx = output.rfind("\n" + RSS_MARKER)
    if idx < 0:
        if output.startswith(RSS_MARKER):
            idx = -1
        else:
            return output, None
    rest = output[idx + 1 + len(RSS_MARKER):]
    value, _, after = rest.partition("\n")
    cleaned = output[:max(idx, 0)] + ("\n" if idx >= 0 and after else "") + after
    value = value.strip()
    mb = int(value) * 1024 / 1e6 if value.isdigit() and int(value) > 0 else None
    return cleaned, mb


def _unwrapped(transport):
    """The transport without its exec_wrapper (qemu): the RSS wrapper runs natively and starts qemu itself."""
    if not transport.profile.exec_wrapper:
        return transport
    t = copy.copy(transport)  # never closed: the original owns connections (ssh master) and closes them
    t.profile = dataclasses.replace(transport.profile, exec_wrapper=())
    return t


def measured_argv(transport, argv: list[str], scratch: str) -> list[str]:
    """The device command line that runs ``argv`` (the transport's exec_wrapper included) under the RSS wrapper;
    ``scratch``: a path prefix on the device for the poller's small file (the work dir's)."""
    return ["sh", "-c", WRAPPER, RSS_WRAPPER_NAME, scratch, *transport.wrapped(argv)]


def run_measured(transport, argv: list[str], timeout: float, env: dict[str, str] | None = None, on_output=None,
                 timer: str | None = None):
    """Run ``argv`` on the device like ``transport.run`` and measure its peak RSS: (RunResult, MB or None).

    ``timer``: the device path of ``mvlm-time`` (mvlm_core.exec_timer), pushed with the runtime: the kernel's
    ``ru_maxrss`` of the process and its wall time read on the device (``result.device_wall_s``), nothing running beside
    it. Without one, or when it cannot start its child there (``result.exec_failed``: the caller falls back), a shell
    poller samples /proc (``result.rss_source`` says which: ``wait4`` or ``poll``).

    Polling: None when the device has no /proc, or when the binary exited before the first sample after its exec (then
    the result's ``rss_note`` is :data:`TOO_SHORT_NOTE`; otherwise ``rss_note`` is None).

    The result's output has the markers taken out and its argv is the command itself (as ``run`` would say).
    ``on_output``: as ``transport.run``'s (the streamed output, for a live progress line)."""
    stream = {"on_output": on_output} if on_output is not None else {}
    if timer:
        timed = [timer, *transport.wrapped(argv)]
        if not transport.capabilities.same_host:
            # over a link the output waits in a file on the device until the process ends: relayed as it comes, every
            # line wakes sshd/adbd, the client and mvlm on the cores the binary is using (measured: +3-4% over ssh)
            scratch = transport.workdir.rstrip("/") + "/.mvlm-run-output"
            timed = ["sh", "-c", QUIET, "mvlm-quiet", scratch, *timed]
        r = _unwrapped(transport).run(timed, timeout=timeout, env=env, **stream)
        r.output, wall_s, mb, r.exec_failed = split_timer(r.output)
        r.argv, r.device_wall_s, r.rss_source, r.rss_note = transport.wrapped(argv), wall_s, "wait4", None
        return r, mb
    scratch = transport.workdir.rstrip("/") + "/.mvlm-peak-rss"
    r = _unwrapped(transport).run(measured_argv(transport, argv, scratch), timeout=timeout, env=env, **stream)
    short = f"\n{RSS_MARKER}{TOO_SHORT}\n" in r.output
    r.output, mb = split_marker(r.output)
    r.argv, r.device_wall_s, r.rss_source, r.exec_failed = transport.wrapped(argv), None, "poll", False
    # why the reading is None when the binary did run: for the caller's one-line note (TOO_SHORT_NOTE)
    r.rss_note = TOO_SHORT_NOTE if short and mb is None else None
    return r, mb


def split_timer(output: str) -> tuple[str, float | None, float | None, bool]:
    """mvlm-time's markers out of ``output``: (the output without them, wall seconds, peak RSS MB, exec failed)."""
    from mvlm_core.exec_timer import EXEC_FAILED_MARKER, WALL_MARKER

    kept, wall_s, mb, failed = [], None, None, False
    for line in output.split("\n"):
        if line.startswith(WALL_MARKER) and line[len(WALL_MARKER):].strip().isdigit():
            wall_s = int(line[len(WALL_MARKER):]) / 1e9
        elif line.startswith(RSS_MARKER) and line[len(RSS_MARKER):].strip().isdigit():
            kb = int(line[len(RSS_MARKER):])
            mb = kb * 1024 / 1e6 if kb > 0 else None
        elif line.startswith(EXEC_FAILED_MARKER):
            failed = True
        else:
            kept.append(line)
    return "\n".join(kept), wall_s, mb, failed


def timer_works(transport, timer: str, exe: str, env: dict[str, str] | None = None) -> bool:
    """Whether ``mvlm-time`` runs on the device and can start the benchmark's binary there (``exe --version``, once
    per session, before the warm-up): a helper whose exec fails (a device that cannot run it, or cannot start an
    emulated child from it) means sampling instead."""
    try:
        r, _ = run_measured(transport, [exe, "--version"], timeout=120, env=env, timer=timer)
    except MvlmError:
        return False
    return r.returncode == 0 and r.device_wall_s is not None and not r.exec_failed
