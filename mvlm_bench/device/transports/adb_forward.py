"""``python -m mvlm_bench.device.transports.adb_forward SERIAL LOCAL_PORT DEVICE_PORT``: an adb port forward that
lives as long as this process (what ``ssh -N -L`` is for the ssh transport).

``adb forward`` itself returns at once and leaves the forward in the adb server until someone removes it. This process
sets it up (``--no-rebind``: a local port already forwarded elsewhere is an error, not stolen), exits 1 with adb's
own message when that fails, and otherwise waits for SIGTERM / SIGINT / SIGHUP and removes the forward before it
exits, so a ``mvlm serve`` that stops leaves no forward behind.
"""

from __future__ import annotations

import signal
import subprocess
import sys


def _adb(serial: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["adb", "-s", serial, "forward", *args], capture_output=True, text=True, errors="replace",
                          timeout=60)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[1].isdigit() or not argv[2].isdigit():
        print("usage: python -m mvlm_bench.device.transports.adb_forward SERIAL LOCAL_PORT DEVICE_PORT", file=sys.stderr)
        return 2
    serial, local, remote = argv[0], f"tcp:{int(argv[1])}", f"tcp:{int(argv[2])}"
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # from here on a stop is waited for, never lost
    try:
        r = _adb(serial, "--no-rebind", local, remote)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"adb forward {local} {remote}: {e}", file=sys.stderr)
        return 1
    if r.returncode != 0:
        print((r.stderr or r.stdout).strip() or f"adb forward {local} {remote} failed", file=sys.stderr)
        return 1
    try:
        signal.sigwait(stops)
    finally:
        try:
            _adb(serial, "--remove", local)
        except (OSError, subprocess.TimeoutExpired):
            pass  # the device or its server is gone: so is the forward
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
