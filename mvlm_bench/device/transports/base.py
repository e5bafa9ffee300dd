"""The transport interface: what every device kind (local, ssh, adb, ...) offers the bench, and what it can do.

A transport runs commands on one device and moves files there (:class:`Transport`). Each kind is one module in this
package that defines one subclass with its ``kind`` name; :mod:`mvlm_bench.device.transports` finds them, so a new kind
(say a TCP agent) is one new module and its tests. A kind declares, as class attributes:

- ``kind`` (the profile's ``transport = "..."``), ``adhoc_prefix`` (``--device ssh://...``, ``adb:SERIAL``; None when
  it has no ad hoc form), ``default_workdir``, ``options_table`` (the profile table only this kind takes: ``[ssh]``);
- ``capabilities`` (:class:`Capabilities`): what the rest of mvlm may ask of it. No module outside ``device/`` asks
  which kind a transport is; it asks what it can do (``transport.capabilities.port_forward``, ``.wall_clock``, ...);
- the profile checks of its own fields (``check_address``, ``check_workdir``, ``adhoc_fields``, ``parse_options``)
  and its lease key (``lease_key``: what identifies the device for :mod:`mvlm_bench.device.lease`).

Remote commands are composed for the device's POSIX ``sh``: every argument, path and environment value goes through
``shlex.quote`` (``~/`` becomes ``"$HOME"/``), so profile strings and file names cannot inject commands; locally
nothing uses ``shell=True``. A remote ``run`` is wrapped so that (1) its exit status comes back on a marker line —
the one way to tell "the command exited 255" from "ssh failed" — and (2) a watchdog on the device sends TERM (then
KILL) when the timeout passes, so a timed-out benchmark does not keep running on the phone. Output is stdout and
stderr merged in order (``2>&1`` on the device).

Public API (the session layer builds on it; keep stable):

- ``make_transport(profile) -> Transport`` (in the package).
- ``Transport.run(argv, timeout, env=None, cwd=None, on_output=None) -> RunResult``; a non-zero exit, a signal or a
  timeout is *not* an exception: ``RunResult.check(what)`` raises ``CommandFailed`` / ``CommandSignaled`` /
  ``CommandTimeout`` (each keeps ``.result`` and the output tail as ``detail``). Reaching the device can fail with
  ``UnreachableError``, ``AuthError`` (``HostKeyError`` for a host-key mismatch) or ``ConnectionLostError``; all are
  ``TransportError``, an ``MvlmError`` with one clear line.
- ``push(local, remote, progress=None)`` (``progress(done_bytes, total_bytes)``; the remote parent dir must exist),
  ``pull(remote, local)`` (atomic locally), ``free_bytes(remote_dir)``, ``mkdir(remote)`` (with parents),
  ``read_text(remote)`` (None when absent), ``write_text(remote, text)`` (atomic: temp + mv), ``remove(remote)``,
  ``rename(src, dst)``, ``make_executable(remote)``, ``file_sizes(remotes)`` (None for absent), ``check()``,
  ``close()``; transports are context managers.
- ``probe() -> DeviceInfo`` (``uname -s``/``uname -m``, Android's ``ro.product.cpu.abi``), ``sha256s(remotes,
  timeout)`` (the device's own sha256 of each file; None overall when it cannot hash), ``read_celsius(root)`` (the
  hottest thermal zone, None without one).
- with ``capabilities.port_forward``: ``shell_argv(script)`` and ``forward_argv(local_port, remote_port)``, the
  command lines of a process the caller starts and owns (a llama-server on the device, and its tunnel).

A remote command killed by signal N is reported the way the device's shell reports it, as status 128+N; a remote
status in 129..192 is therefore read as a signal (llama.cpp tools do not exit with such codes).
"""

from __future__ import annotations

import os
import re
import shlex
import signal as signal_mod
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mvlm_bench.device.transports.waiting import OutputFn, wait_quietly, wait_streaming
from mvlm_core.errors import MvlmError
from mvlm_core.stops import Stopped, starting

ProgressFn = Callable[[int, int], None]

CHUNK = 1 << 20
HELPER_TIMEOUT_S = 120.0
WATCHDOG_STEP_S = 2  # how often the device-side watchdog of a run looks whether it ended (remote_script)
# How long past the requested timeout the local client may live before it is killed (the device-side watchdog
# normally ends the command first; this is the backstop when the link hangs).
CLIENT_GRACE_S = 15.0
RC_MARKER = "__MVLM_RC__="
THERMAL_ROOT = "/sys/class/thermal"


@dataclass(frozen=True)
class Capabilities:
    """What a transport can do, declared by its kind; the rest of mvlm asks these, never the kind's name."""

    push: bool = True  # files can be copied to the device
    exec: bool = True  # commands run there
    port_forward: bool = False  # a TCP port on the device can be reached from here (llama-server: serve, dataset)
    same_host: bool = False  # the device is this machine: its ports are this machine's (no tunnel needed)
    thermal: bool = True  # thermal zones can be read (the records' temperatures, --max-temp)
    peak_rss: bool = True  # a process's peak resident memory can be read (/proc/PID/status VmHWM)
    arch_probe: bool = True  # the device says what it is (uname, getprop): the runtime target is checked or chosen
    wall_clock: bool = False  # a process's wall time measured here is the device's own (no link in between): Total

    def as_dict(self) -> dict[str, bool]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# --------------------------------------------------------------------------------------------------- errors


class TransportError(MvlmError):
    """The device could not be reached or the link failed (not the command's fault)."""

    exit_code = 3


class UnreachableError(TransportError):
    """No route / connection refused / unknown host / adb device not attached."""


class AuthError(TransportError):
    """The device refused us: ssh key not accepted, phone has not authorized this computer."""


class HostKeyError(AuthError):
    """The ssh host key is unknown or changed: host-key checking did its job."""


class ConnectionLostError(TransportError):
    """The link dropped in the middle of an operation."""


class CommandError(MvlmError):
    """A command on the device did not succeed; ``.result`` holds its output and timing."""

    exit_code = 4

    def __init__(self, message: str, result: RunResult):
        super().__init__(message, detail=result.tail())
        self.result = result


class CommandFailed(CommandError):
    """Non-zero exit status."""


class CommandSignaled(CommandError):
    """Killed by a signal (a crash: SIGSEGV, SIGABRT, SIGILL ...; or killed from outside)."""


class CommandTimeout(CommandError):
    """Ran past its timeout and was killed."""


# --------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ServerLaunch:
    """A long-running process to start on a device (:meth:`Transport.server_launch`): the local command line and its
    environment (None: this process's). ``via_shell``: it runs under a remote shell script that prints the server's
    pid on a marker line (``SERVER_PID_MARKER``) and stops the server when its stdin closes."""

    argv: list[str]
    env: dict[str, str] | None
    via_shell: bool


SERVER_PID_MARKER = "__MVLM_SERVER_PID__="


@dataclass
class RunResult:
    """What a command did: exit status (None if it never reported one), merged output, wall time, how it ended."""

    returncode: int | None
    output: str
    duration_s: float
    timed_out: bool = False
    signal: int | None = None
    argv: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and self.signal is None

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of output: what a crash report shows."""
        return "\n".join(self.output.rstrip("\n").splitlines()[-lines:])

    def check(self, what: str | None = None) -> RunResult:
        """Return self when the command succeeded; otherwise raise the typed ``CommandError``."""
        what = what or (Path(self.argv[0]).name if self.argv else "command")
        if self.timed_out:
            raise CommandTimeout(
                f"{what} timed out after {self.duration_s:.1f} s and was killed; raise the timeout or use a smaller "
                "model/fewer tokens",
                self,
            )
        if self.signal is not None:
            raise CommandSignaled(f"{what} was killed by signal {signal_name(self.signal)} (crash); output tail below", self)
        if self.returncode != 0:
            hint = " (command not found on the device?)" if self.returncode == 127 else ""
            raise CommandFailed(f"{what} exited with status {self.returncode}{hint}; output tail below", self)
        return self


def signal_name(num: int) -> str:
    try:
        return f"{signal_mod.Signals(num).name} ({num})"
    except ValueError:
        return str(num)


@dataclass(frozen=True)
class DeviceInfo:
    """What a device is: ``uname -s`` / ``uname -m`` and, on Android, ``getprop ro.product.cpu.abi``."""

    system: str  # Linux, Darwin ...
    machine: str  # x86_64, aarch64 ... (normalised: arm64 -> aarch64, amd64 -> x86_64)
    android_abi: str = ""  # arm64-v8a on a 64-bit ARM phone; empty elsewhere

    @property
    def android(self) -> bool:
        return bool(self.android_abi)

    def describe(self) -> str:
        if self.android:
            return f"an Android {self.android_abi} device"
        return f"{self.machine or 'unknown-arch'} {self.system or 'unknown-OS'}"


def normalise_machine(machine: str) -> str:
    m = machine.strip()
    return {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}.get(m.lower(), m)


# --------------------------------------------------------------------------------------------------- interface


class Transport(ABC):
    """Run commands on one device and move files there. Remote paths are POSIX strings on the device.

    A subclass is one kind of device link: it sets the class attributes below (module docstring)."""

    kind: ClassVar[str] = ""
    adhoc_prefix: ClassVar[str | None] = None
    default_workdir: ClassVar[str] = "~/mvlm"
    options_table: ClassVar[str | None] = None
    capabilities: ClassVar[Capabilities] = Capabilities()
    # what a profile's `address` is, for messages ("the serial from `adb devices`"); "" when the kind takes none
    address_help: ClassVar[str] = ""

    # --- the profile fields of this kind (mvlm_bench.device.profiles calls these) ----------------------------------
    @classmethod
    def check_address(cls, address: Any, where: str) -> str | None:
        """The profile's ``address`` checked (one line naming ``where`` otherwise); None when the kind takes none."""
        if cls.address_help and not address:
            raise MvlmError(f"{where}: missing required field 'address' for transport {cls.kind!r} ({cls.address_help})")
        if not cls.address_help and address not in (None, "", "none"):
            raise MvlmError(f"{where}: field 'address' must be absent for transport {cls.kind!r}")
        return address or None

    @classmethod
    def check_workdir(cls, workdir: str, where: str) -> None:
        """Absolute, or under the login home (``~/...``); kinds without a home (adb) refuse ``~``."""
        if not (workdir.startswith("/") or workdir == "~" or workdir.startswith("~/")):
            raise MvlmError(f"{where}: field 'workdir' must be absolute or start with '~/'")

    @classmethod
    def parse_options(cls, table: dict[str, Any], where: str, base_dir: Path | None) -> Any:
        """The kind's own profile table (``options_table``) checked; None when the kind has none."""
        return None

    @classmethod
    def adhoc_fields(cls, spec: str) -> dict[str, Any]:
        """The profile table of ``--device SPEC`` (``SPEC`` starts with ``adhoc_prefix``); its target is a
        placeholder until the device is probed."""
        raise MvlmError(f"--device {spec}: transport {cls.kind!r} has no ad hoc form")

    @classmethod
    def lease_key(cls, profile: Any) -> str:
        """What identifies a profile's device for its lease (two profiles of one device share it)."""
        return f"{cls.kind}:{profile.address or profile.name}"

    def __init__(self, profile: Any):
        self.profile = profile
        self._workdir: str | None = None

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def workdir(self) -> str:
        """The profile's work dir as an absolute device path (``~`` resolved): what command lines should use."""
        if self._workdir is None:
            self._workdir = self.absolute(self.profile.workdir)
        return self._workdir

    def absolute(self, path: str) -> str:
        """A device path with a leading ``~`` resolved to the device's home directory."""
        return path

    def wrapped(self, argv: list[str]) -> list[str]:
        """``exec_wrapper + argv``; an argv that already starts with the wrapper is left alone (never qemu twice)."""
        w = list(self.profile.exec_wrapper)
        if w and list(argv[: len(w)]) == w:
            return list(argv)
        return w + list(argv)

    @abstractmethod
    def run(self, argv: list[str], timeout: float, env: dict[str, str] | None = None, cwd: str | None = None,
            on_output: OutputFn | None = None) -> RunResult:
        """Run ``exec_wrapper + argv`` on the device (no shell), ``env`` on top of the profile's env. ``on_output``
        hears the merged output piece by piece while it runs (local, ssh and adb alike); the result holds all of it."""

    @abstractmethod
    def push(self, local: Path, remote: str, progress: ProgressFn | None = None) -> None:
        """Copy a local file to ``remote`` (overwritten; not atomic — ``sync`` pushes to a temp name)."""

    @abstractmethod
    def pull(self, remote: str, local: Path) -> None:
        """Copy ``remote`` to ``local`` (written to a temp name, renamed when complete)."""

    @abstractmethod
    def free_bytes(self, remote_dir: str) -> int:
        """Bytes available to us on the filesystem holding ``remote_dir`` (or its nearest existing parent)."""

    @abstractmethod
    def mkdir(self, remote: str) -> None:
        """Create ``remote`` and its parents (no error if it exists)."""

    @abstractmethod
    def read_text(self, remote: str) -> str | None:
        """The file's text, or None if it does not exist."""

    @abstractmethod
    def write_text(self, remote: str, text: str) -> None:
        """Write atomically: a temp file next to ``remote``, then rename over it."""

    @abstractmethod
    def remove(self, remote: str) -> None:
        """Delete a file; no error if absent."""

    @abstractmethod
    def rename(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst`` on the device, replacing ``dst``."""

    @abstractmethod
    def make_executable(self, remote: str) -> None:
        """chmod 755."""

    @abstractmethod
    def file_sizes(self, remotes: list[str]) -> dict[str, int | None]:
        """Size of each regular file, None where absent; one round trip."""

    @abstractmethod
    def check(self) -> None:
        """Raise a ``TransportError`` (one clear line) unless the device is reachable and usable."""

    def probe(self) -> DeviceInfo:
        """What the device is (OS, CPU architecture, Android ABI)."""
        raise NotImplementedError

    def sha256s(self, remotes: list[str], timeout: float = HELPER_TIMEOUT_S) -> dict[str, str | None] | None:
        """The device's own sha256 of each file (None where absent); None when the device cannot hash files."""
        return None

    def read_celsius(self, root: str = THERMAL_ROOT) -> float | None:
        """The device's temperature now: the hottest of its thermal zones (degrees Celsius), None without one. Never
        raises for a missing sensor; a lost link raises the transport's own error."""
        return None

    def shell_argv(self, script: str) -> list[str]:
        """The local command line that runs the sh ``script`` on the device, for a process the caller starts and owns
        (a server that outlives one call); only with ``capabilities.port_forward``."""
        raise MvlmError(f"device {self.name}: transport {self.kind!r} cannot start a process that stays up")

    def server_launch(self, argv: list[str], env: dict[str, str]) -> ServerLaunch:
        """How to start ``argv`` (a server: llama-server) on the device as a process the caller owns; only with
        ``capabilities.port_forward``."""
        raise MvlmError(f"device {self.name}: transport {self.kind!r} cannot start a server (no port forwarding)")

    def forward_argv(self, local_port: int, remote_port: int) -> list[str]:
        """The local command line that forwards 127.0.0.1:``local_port`` here to the device's ``remote_port``."""
        raise MvlmError(f"device {self.name}: transport {self.kind!r} forwards no ports")

    def close(self) -> None:
        """Release connections; safe to call twice."""
        return None

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------- helpers


def run_client(
    argv: list[str],
    timeout: float | None,
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    stdin: int | None = subprocess.DEVNULL,
    on_output: OutputFn | None = None,
) -> tuple[int | None, str, float, bool]:
    """Run a local process, merged output captured in a temp file (never a pipe: a backgrounded ssh master may
    inherit it and keep it open). On timeout, and on any exception while waiting (Ctrl-C, the SystemExit of SIGTERM),
    the whole process group gets TERM, then KILL, and is reaped; the child also gets TERM if mvlm dies
    (:func:`die_with_parent`).

    ``on_output``: called with each new piece of the output (decoded text) while the process runs, read back from the
    same temp file every ``waiting.STREAM_POLL_S``; what is captured and returned is unchanged."""
    start = time.monotonic()
    with tempfile.TemporaryFile() as out:
        proc: subprocess.Popen | None = None
        timed_out = False
        try:
            with starting():  # a stop signal during the start is raised once `proc` is ours to stop
                proc = subprocess.Popen(
                    argv, stdin=stdin, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True,
                    preexec_fn=die_with_parent,
                )
            rc: int | None = wait_quietly(proc, timeout) if on_output is None else wait_streaming(proc, timeout, out, on_output)
        except FileNotFoundError as e:
            if proc is not None:
                kill_group(proc)
                raise
            return 127, f"mvlm: cannot execute {argv[0]}: {e.strerror}\n", time.monotonic() - start, False
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
            rc = None
        except OSError as e:  # permission denied, exec format error (an arm64 binary without qemu) ...
            if proc is not None:
                kill_group(proc)
                raise
            return 126, f"mvlm: cannot execute {argv[0]}: {e.strerror}\n", time.monotonic() - start, False
        except BaseException:  # Ctrl-C, a stop signal ...: the child must not outlive this bench
            if proc is not None:
                kill_group(proc)
            raise
        duration = time.monotonic() - start
        out.seek(0)
        text = out.read().decode("utf-8", errors="replace")
    return rc, text, duration, timed_out


def die_with_parent() -> None:
    """A ``preexec_fn``: on Linux the child gets SIGTERM when mvlm itself dies, even by SIGKILL (PR_SET_PDEATHSIG);
    elsewhere nothing. Only the child itself: the kernel clears the setting in its own forks."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal_mod.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def kill_group(proc: subprocess.Popen, grace: float = 2.0) -> None:
    """SIGTERM to the process's group, ``grace`` seconds, then SIGKILL; always reaped (no zombie, no orphan)."""
    for sig, wait_s in ((signal_mod.SIGTERM, grace), (signal_mod.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            proc.send_signal(sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
        except (KeyboardInterrupt, Stopped):  # a second Ctrl-C while stopping: no more waiting
            continue


def quote_remote(path: str) -> str:
    """Quote a device path for sh; a leading ``~`` / ``~/`` becomes ``"$HOME"`` so the home dir still expands."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        rest = path[2:]
        return '"$HOME"/' + shlex.quote(rest) if rest else '"$HOME"/'
    return shlex.quote(path)


def remote_command(argv: list[str], timeout: float, env: dict[str, str], cwd: str | None) -> str:
    """The sh script that runs ``argv`` on a device with merged output and a device-side watchdog."""
    if not argv:
        raise ValueError("empty argv")
    for key in env:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise MvlmError(f"bad environment variable name {key!r}: letters, digits and '_' only")
    assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    cmd = " ".join(shlex.quote(a) for a in argv)
    secs = max(1, int(timeout + 0.999))
    prefix = f"cd {quote_remote(cwd)} || exit 125; " if cwd else ""
    # With setsid (util-linux, toybox, busybox) the command leads its own process group, so the watchdog can kill
    # the children too (an orphan holding the output would keep the ssh/adb session open).
    launch = (
        "__mvlm_s=; command -v setsid >/dev/null 2>&1 && __mvlm_s=setsid; "
        f"{assigns + ' ' if assigns else ''}$__mvlm_s {cmd} </dev/null 2>&1 & __mvlm_p=$!; "
    )
    kill = "kill -{sig} -$__mvlm_p 2>/dev/null || kill -{sig} $__mvlm_p 2>/dev/null"
    # the watchdog looks every WATCHDOG_STEP_S seconds (each look is a process beside a measured run)
    step = WATCHDOG_STEP_S
    watchdog = (
        f"( __mvlm_n=0; while [ $__mvlm_n -lt {secs} ]; do sleep {step}; "
        f"kill -0 $__mvlm_p 2>/dev/null || exit 0; __mvlm_n=$((__mvlm_n+{step})); done; "
        f"{kill.format(sig='TERM')}; sleep 2; {kill.format(sig='KILL')} ) </dev/null >/dev/null 2>&1 & "
    )
    return prefix + launch + watchdog + "wait $__mvlm_p"


def with_marker(script: str) -> str:
    """Run ``script`` in a subshell and print its exit status on a marker line (read back by ``split_marker``)."""
    return f"( {script} ); printf '\\n{RC_MARKER}%s\\n' \"$?\""


def split_marker(text: str) -> tuple[int | None, str]:
    idx = text.rfind("\n" + RC_MARKER)
    if idx < 0:
        return None, text
    rest = text[idx + 1 + len(RC_MARKER) :]
    line, _, after = rest.partition("\n")
    try:
        rc = int(line.strip())
    except ValueError:
        return None, text
    return rc, text[:idx] + after


def interpret_remote_status(rc: int | None, duration: float, timeout: float) -> tuple[bool, int | None]:
    """(timed_out, signal) from a device shell's status: 128+N means signal N."""
    if rc is None:
        return True, None
    if duration >= timeout and rc in (128 + signal_mod.SIGTERM, 128 + signal_mod.SIGKILL):
        return True, None
    if 128 < rc <= 128 + 64:
        return False, rc - 128
    return False, None


RSS_WRAPPER_NAME = "mvlm-rss"  # $0 of the peak-RSS wrapper (device/resources.py): sh -c WRAPPER mvlm-rss SCRATCH ARGV


def program_name(argv: list[str]) -> str:
    """The program a device command line runs, past mvlm's peak-RSS wrapper and an emulator (qemu-*) in front."""
    args = list(argv)
    if len(args) > 5 and args[:2] == ["sh", "-c"] and args[3] == RSS_WRAPPER_NAME:
        args = args[5:]
    while len(args) > 1 and Path(args[0]).name.startswith("qemu-"):
        args = args[1:]
    return Path(args[0]).name if args else "a command"


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


