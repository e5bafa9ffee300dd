#!/usr/bin/env python3
"""Run a command slowed down by a known fraction: it is stopped (SIGSTOP) for FRACTION of every period.

    python benchmarks/throttle.py 0.10 -- llama-completion -m model.gguf ...

A real slowdown of the measured process, as a device under thermal throttling or a busy neighbour would cause,
but with a known size: every PERIOD seconds (default 0.05) the child runs for (1 - FRACTION) of the period and is
stopped for FRACTION of it, so its wall-clock throughput drops by about FRACTION. Used as the device's exec wrapper
by benchmarks/gate_rates.py to measure the regression gate's detection rate. Output and exit status pass through.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") < 1:
        print("usage: throttle.py FRACTION [PERIOD_S] -- COMMAND ...", file=sys.stderr)
        return 2
    sep = argv.index("--")
    fraction = float(argv[0])
    period = float(argv[1]) if sep > 1 else 0.05
    cmd = argv[sep + 1:]
    if not 0 <= fraction < 1 or period <= 0 or not cmd:
        print("throttle.py: FRACTION must be in [0, 1), PERIOD > 0, and a command given", file=sys.stderr)
        return 2
    child = subprocess.Popen(cmd)

    def forward(signum, frame):
        try:
            child.send_signal(signal.SIGCONT)
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    run_s, stop_s = period * (1 - fraction), period * fraction
    while child.poll() is None:
        time.sleep(run_s)
        if fraction == 0 or child.poll() is not None:
            continue
        try:
            os.kill(child.pid, signal.SIGSTOP)
            time.sleep(stop_s)
        finally:
            try:
                os.kill(child.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
