"""The ``adb`` transport: the Android Debug Bridge client (``adb -s SERIAL shell|push|pull|get-state``)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from mvlm_bench.device.transports.base import (
    AuthError,
    Capabilities,
    ConnectionLostError,
    OutputFn,
    ProgressFn,
    TransportError,
    UnreachableError,
    last_line,
    run_client,
    split_marker,
    with_marker,
)
from mvlm_bench.device.transports.shell import ShellTransport
from mvlm_core.errors import MvlmError

# A serial ends up as an argument of adb: a leading "-" would turn it into an option.
_SERIAL_RE = re.compile(r"[A-Za-z0-9_.:][A-Za-z0-9_.:-]*")  # used with fullmatch: "$" would let a newline through
_ADB_GONE = (
    "not found",
    "no devices/emulators found",
    "device offline",
    "error: closed",
    "protocol fault",
    "failed to copy",
    "connection reset",
    "failed to read",
    "device still connecting",
)


def _device_refused(output: str) -> str | None:
    """adbd's own reason when it refused a write (``remote write failed: No space left on device``, ``remote couldn't
    create file: Read-only file system``), from adb's error line; None when the link failed instead."""
    for line in reversed(output.splitlines()):
        m = re.search(r"remote ((?:write failed|couldn't create file|open failed)[^\n]*)", line)
        if m:
            return m.group(1).strip()
    return None


class AdbTransport(ShellTransport):
    """The ``adb`` client; the device is ``profile.address`` (its serial)."""

    kind = "adb"
    adhoc_prefix = "adb:"
    default_workdir = "/data/local/tmp/mvlm"
    address_help = "the serial from `adb devices`"
    capabilities = Capabilities(port_forward=True)  # `adb forward` (serve, the dataset protocol's llama-server)

    @classmethod
    def check_address(cls, address, where: str) -> str | None:
        address = super().check_address(address, where)
        if not _SERIAL_RE.fullmatch(address or ""):
            raise MvlmError(f"{where}: field 'address' = {address!r} is not an adb serial (letters, digits, . : _ -)")
        return address

    @classmethod
    def check_workdir(cls, workdir: str, where: str) -> None:
        if not workdir.startswith("/"):
            raise MvlmError(f"{where}: field 'workdir' must be absolute on an adb device (e.g. {cls.default_workdir})")

    @classmethod
    def adhoc_fields(cls, spec: str) -> dict:
        serial = spec[len(cls.adhoc_prefix or ""):]
        if not serial or not _SERIAL_RE.fullmatch(serial):
            raise MvlmError(f"--device {spec}: bad adb serial {serial!r}; use adb:SERIAL with a serial from `adb devices`")
        return {"transport": "adb", "address": serial, "target": "android-arm64", "threads": 4,
                "description": "ad hoc adb device"}

    @classmethod
    def lease_key(cls, profile: Any) -> str:
        return f"adb:{profile.address or ''}"

    def __init__(self, profile: Any):
        super().__init__(profile)
        self.serial = profile.address or ""

    def _adb(self, args: list[str], timeout: float | None,
             on_output: OutputFn | None = None) -> tuple[int | None, str, float, bool]:
        if shutil.which("adb") is None:
            raise MvlmError("the `adb` client is not on PATH: install Android platform-tools (Debian: apt-get install adb)")
        return run_client(["adb", "-s", self.serial, *args], timeout, on_output=on_output)

    def _classify(self, output: str, what: str, during_transfer: bool) -> TransportError:
        line = last_line(output)
        if "unauthorized" in output:
            return AuthError(
                f"adb {self.serial}: device unauthorized; unlock the phone and accept the "
                "'Allow USB debugging' prompt, then retry"
            )
        if during_transfer:
            return ConnectionLostError(
                f"adb {self.serial}: device lost during {what} ({line}); reconnect it and run "
                "again (an interrupted sync restarts cleanly)"
            )
        if any(s in output for s in _ADB_GONE):
            return UnreachableError(
                f"adb {self.serial}: device not available ({line}); plug it in, enable USB debugging and check `adb devices`"
            )
        return ConnectionLostError(f"adb {self.serial}: the connection ended ({what}) before the device sent the exit "
                                   f"status (last output: {line}); check the cable and `adb devices`, then run again")

    def _shell(self, script: str, timeout: float, what: str,
               on_output: OutputFn | None = None) -> tuple[int | None, str, float]:
        rc, out, duration, timed_out = self._adb(["shell", "sh -c " + shlex.quote(with_marker(script))], timeout,
                                                 on_output=on_output)
        if timed_out:
            return None, out, duration
        status, text = split_marker(out)
        if status is None:
            raise self._classify(out, what, during_transfer=False)
        return status, text, duration

    def push(self, local: Path, remote: str, progress: ProgressFn | None = None) -> None:
        local = Path(local)
        total = local.stat().st_size
        if progress:
            progress(0, total)
        # adb moves ~10-40 MB/s over USB; allow 1 MB/s plus slack before calling the link hung.
        rc, out, _, timed_out = self._adb(["push", str(local), remote], 300.0 + total / 1e6)
        if timed_out or rc != 0:
            refused = _device_refused(out)
            if refused and not timed_out:  # the phone is there and said no: its own reason, not "device lost"
                full = "No space left on device" in refused
                hint = ("free space on the phone (old models in the workdir) or point the profile's workdir elsewhere"
                        if full else "point the profile's workdir at a directory the shell user may write "
                        "(/data/local/tmp/...)")
                raise MvlmError(f"adb {self.serial}: writing {remote} failed on the device: {refused}; {hint}",
                                exit_code=28 if full else 2)
            raise self._classify(out, f"push of {local.name} to {remote} ({total} bytes)", during_transfer=True)
        if progress:
            progress(total, total)

    def pull(self, remote: str, local: Path) -> None:
        local = Path(local)
        tmp = local.with_name(local.name + ".part")
        rc, out, _, timed_out = self._adb(["pull", remote, str(tmp)], 3600.0)
        if timed_out or rc != 0:
            tmp.unlink(missing_ok=True)
            if "No such file" in out or "does not exist" in out:
                raise MvlmError(f"adb {self.serial}: {remote} does not exist on the device")
            raise self._classify(out, f"pull of {remote}", during_transfer=True)
        os.replace(tmp, local)

    def probe(self):
        info = super().probe()
        if not info.android_abi:  # every adb device is an Android one: without its ABI no build can be chosen
            raise MvlmError(f"adb {self.serial}: the device does not say its ABI (`getprop ro.product.cpu.abi` printed "
                            "nothing), so mvlm cannot tell which build runs there; nothing was pushed")
        return info

    def shell_argv(self, script: str) -> list[str]:
        """``adb -s SERIAL shell`` running the sh ``script``, for a process the caller starts and owns (a server): with
        the shell protocol (v2) the device's exit status comes back, and stdin reaches the script (its end stops the
        server)."""
        return ["adb", "-s", self.serial, "shell", "sh -c " + shlex.quote(script)]

    def forward_argv(self, local_port: int, remote_port: int) -> list[str]:
        """An ``adb forward tcp:LOCAL tcp:REMOTE`` held by a process of its own, removed when that process stops."""
        return [sys.executable, "-m", "mvlm_bench.device.transports.adb_forward", self.serial, str(int(local_port)),
                str(int(remote_port))]

    def check(self) -> None:
        rc, out, _, timed_out = self._adb(["get-state"], 30.0)
        state = out.strip().splitlines()[-1].strip() if out.strip() else ""
        if timed_out:
            raise UnreachableError(
                f"adb {self.serial}: `adb get-state` did not answer within 30 s; try `adb kill-server` and replug the device"
            )
        if rc != 0 or state != "device":
            raise self._classify(out or state, "connection check", during_transfer=False)
        rc2, out2, _ = self._shell("true", 30.0, "connection check")
        if rc2 != 0:
            raise TransportError(f"adb {self.serial}: the device shell fails ({last_line(out2)})")
