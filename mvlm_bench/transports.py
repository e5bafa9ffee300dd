"""Transports: one small interface to run commands on a device and move files to and from it.

Three implementations sit behind ``Transport``:

- ``LocalTransport`` — this machine; ``profile.exec_wrapper`` (e.g. ``["qemu-aarch64-static"]``) prefixes every ``run``.
- ``SshTransport`` — the OpenSSH client binary. ``BatchMode=yes`` (never prompts), host-key checking stays on (the
  user's default, or ``StrictHostKeyChecking=yes`` against the profile's ``known_hosts``), one shared connection
  (``ControlMaster=auto``/``ControlPersist``) whose socket lives in a private 0700 temp dir. Files travel as a byte
  stream into a remote ``cat``, which gives exact progress and needs nothing on the device but a POSIX shell.
- ``AdbTransport`` — the ``adb`` client (``adb -s SERIAL shell|push|pull|get-state``).

Remote commands are composed for the device's POSIX ``sh``: every argument, path and environment value goes through
``shlex.quote`` (``~/`` becomes ``"$HOME"/``), so profile strings and file names cannot inject commands; locally
nothing uses ``shell=True``. A remote ``run`` is wrapped so that (1) its exit status comes back on a marker line —
the one way to tell "the command exited 255" from "ssh failed" — and (2) a watchdog on the device sends TERM (then
KILL) when the timeout passes, so a timed-out benchmark does not keep running on the phone. Output is stdout and
stderr merged in order (``2>&1`` on the device).

Public API (the benchmark runner builds on it; keep stable):

- ``make_transport(profile) -> Transport``.
- ``Transport.run(argv, timeout, env=None, cwd=None) -> RunResult``; a non-zero exit, a signal or a timeout is *not*
  an exception: ``RunResult.check(what)`` raises ``CommandFailed`` / ``CommandSignaled`` / ``CommandTimeout``
  (each keeps ``.result`` and the output tail as ``detail``). Reaching the device can fail with ``UnreachableError``,
  ``AuthError`` (``HostKeyError`` for a host-key mismatch) or ``ConnectionLostError``; all are ``TransportError``,
  an ``MvlmError`` with one clear line.
- ``push(local, remote, progress=None)`` (``progress(done_bytes, total_bytes)``; the remote parent dir must exist),
  ``pull(remote, local)`` (atomic locally), ``free_bytes(remote_dir)``, ``mkdir(remote)`` (with parents),
  ``read_text(remote)`` (None when absent), ``write_text(remote, text)`` (atomic: temp + mv), ``remove(remote)``,
  ``rename(src, dst)``, ``make_executable(remote)``, ``file_sizes(remotes)`` (None for absent), ``check()``,
  ``close()``; transports are context managers.
- ``probe() -> DeviceInfo`` (what the device is: ``uname -s``/``uname -m``, Android's ``ro.product.cpu.abi``), and
  ``sha256s(remotes, timeout) -> dict | None`` (the device's own sha256 of each file, None where absent; None overall
  when the device has no ``sha256sum``/``shasum``).
- ssh only: ``shell_argv(script)`` and ``forward_argv(local_port, remote_port)``, the ssh command lines of a process
  the caller starts and owns (``mvlm serve``: the device's server, and its ``ssh -N -L`` tunnel).

A remote command killed by signal N is reported the way the device's shell reports it, as status 128+N; a remote
status in 129..192 is therefore read as a signal (llama.cpp tools do not exit with such codes).
"""

from __future__ import annotations

import os
import posixpath
import re
import shlex
import shutil
import signal as signal_mod
import subprocess
import tempfile
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mvlm_bench.devices import DeviceProfile
from mvlm_core.errors import MvlmError

ProgressFn = Callable[[int, int], None]
OutputFn = Callable[[str], None]  # a run's output as it arrives (Transport.run's on_output)
STREAM_POLL_S = 0.25

CHUNK = 1 << 20
HELPER_TIMEOUT_S = 120.0
# How long past the requested timeout the local client may live before it is killed (the device-side watchdog
# normally ends the command first; this is the backstop when the link hangs).
CLIENT_GRACE_S = 15.0
_RC_MARKER = "__MVLM_RC__="


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
            raise CommandSignaled(f"{what} was killed by signal {_signal_name(self.signal)} (crash); output tail below", self)
        if self.returncode != 0:
            hint = " (command not found on the device?)" if self.returncode == 127 else ""
            raise CommandFailed(f"{what} exited with status {self.returncode}{hint}; output tail below", self)
        return self


def _signal_name(num: int) -> str:
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


_PROBE_SCRIPT = (
    "printf '%s|%s|%s\\n' \"$(uname -s 2>/dev/null)\" \"$(uname -m 2>/dev/null)\" "
    "\"$(getprop ro.product.cpu.abi 2>/dev/null)\""
)
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
# sha256 of each file on one line (read from stdin, so any file name is safe); "-" for an absent file.
_SHA_SCRIPT = (
    "if command -v sha256sum >/dev/null 2>&1; then h='sha256sum'; "
    "elif command -v shasum >/dev/null 2>&1; then h='shasum -a 256'; "
    "else echo no-sha256-tool; exit 0; fi; "
    'for f in {files}; do if [ -f "$f" ]; then $h < "$f" 2>/dev/null || echo error; else echo -; fi; done'
)


# --------------------------------------------------------------------------------------------------- interface


class Transport(ABC):
    """Run commands on one device and move files there. Remote paths are POSIX strings on the device."""

    def __init__(self, profile: DeviceProfile):
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

    def close(self) -> None:
        """Release connections; safe to call twice."""
        return None

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_transport(profile: DeviceProfile) -> Transport:
    """The transport a profile names."""
    if profile.transport == "local":
        return LocalTransport(profile)
    if profile.transport == "ssh":
        return SshTransport(profile)
    if profile.transport == "adb":
        return AdbTransport(profile)
    raise MvlmError(f"device {profile.name}: unknown transport {profile.transport!r}")


# --------------------------------------------------------------------------------------------------- helpers


def _run_client(
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
    same temp file every ``STREAM_POLL_S``; what is captured and returned is unchanged."""
    start = time.monotonic()
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(
                argv, stdin=stdin, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True,
                preexec_fn=die_with_parent,
            )
        except FileNotFoundError as e:
            return 127, f"mvlm: cannot execute {argv[0]}: {e.strerror}\n", time.monotonic() - start, False
        except OSError as e:  # permission denied, exec format error (an arm64 binary without qemu) ...
            return 126, f"mvlm: cannot execute {argv[0]}: {e.strerror}\n", time.monotonic() - start, False
        timed_out = False
        try:
            rc: int | None = proc.wait(timeout=timeout) if on_output is None else _wait_streaming(proc, timeout, out, on_output)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
            rc = None
        except BaseException:  # Ctrl-C, SystemExit(143) from SIGTERM ...: the child must not outlive this bench
            kill_group(proc)
            raise
        duration = time.monotonic() - start
        out.seek(0)
        text = out.read().decode("utf-8", errors="replace")
    return rc, text, duration, timed_out


def _wait_streaming(proc: subprocess.Popen, timeout: float | None, out, on_output: OutputFn) -> int:
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
            rc = proc.wait(timeout=step)
        except subprocess.TimeoutExpired:
            feed()
            if deadline is not None and time.monotonic() >= deadline:
                raise
            continue
        feed()
        return rc


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
        except KeyboardInterrupt:  # a second Ctrl-C while stopping: no more waiting
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
    watchdog = (
        f"( __mvlm_n=0; while [ $__mvlm_n -lt {secs} ]; do sleep 1; "
        "kill -0 $__mvlm_p 2>/dev/null || exit 0; __mvlm_n=$((__mvlm_n+1)); done; "
        f"{kill.format(sig='TERM')}; sleep 2; {kill.format(sig='KILL')} ) </dev/null >/dev/null 2>&1 & "
    )
    return prefix + launch + watchdog + "wait $__mvlm_p"


def _with_marker(script: str) -> str:
    """Run ``script`` in a subshell and print its exit status on a marker line (read back by ``_split_marker``)."""
    return f"( {script} ); printf '\\n{_RC_MARKER}%s\\n' \"$?\""


def _split_marker(text: str) -> tuple[int | None, str]:
    idx = text.rfind("\n" + _RC_MARKER)
    if idx < 0:
        return None, text
    rest = text[idx + 1 + len(_RC_MARKER) :]
    line, _, after = rest.partition("\n")
    try:
        rc = int(line.strip())
    except ValueError:
        return None, text
    return rc, text[:idx] + after


def _interpret_remote_status(rc: int | None, duration: float, timeout: float) -> tuple[bool, int | None]:
    """(timed_out, signal) from a device shell's status: 128+N means signal N."""
    if rc is None:
        return True, None
    if duration >= timeout and rc in (128 + signal_mod.SIGTERM, 128 + signal_mod.SIGKILL):
        return True, None
    if 128 < rc <= 128 + 64:
        return False, rc - 128
    return False, None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


# --------------------------------------------------------------------------------------------------- local


class LocalTransport(Transport):
    """This machine. The work dir is a local path; ``exec_wrapper`` (qemu) applies to ``run`` only."""

    def _p(self, remote: str) -> Path:
        return Path(os.path.expanduser(remote))

    def absolute(self, path: str) -> str:
        return os.path.abspath(os.path.expanduser(path))

    def run(self, argv: list[str], timeout: float, env: dict[str, str] | None = None, cwd: str | None = None,
            on_output: OutputFn | None = None) -> RunResult:
        full = self.wrapped(argv)
        merged = dict(os.environ)
        merged.update(self.profile.env)
        merged.update(env or {})
        rc, out, duration, timed_out = _run_client(full, timeout, env=merged, cwd=str(self._p(cwd)) if cwd else None,
                                                   on_output=on_output)
        sig = -rc if rc is not None and rc < 0 else None
        return RunResult(rc, out, duration, timed_out, sig, argv=full)

    def push(self, local: Path, remote: str, progress: ProgressFn | None = None) -> None:
        total = Path(local).stat().st_size
        done = 0
        with open(local, "rb") as src, open(self._p(remote), "wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
        shutil.copymode(local, self._p(remote))
        if progress and total == 0:
            progress(0, 0)

    def pull(self, remote: str, local: Path) -> None:
        local = Path(local)
        tmp = local.with_name(local.name + ".part")
        try:
            shutil.copyfile(self._p(remote), tmp)
        except FileNotFoundError:
            raise MvlmError(f"device {self.name}: {remote} does not exist") from None
        os.replace(tmp, local)

    def free_bytes(self, remote_dir: str) -> int:
        p = self._p(remote_dir)
        while not p.exists() and p != p.parent:
            p = p.parent
        return shutil.disk_usage(p).free

    def mkdir(self, remote: str) -> None:
        self._p(remote).mkdir(parents=True, exist_ok=True)

    def read_text(self, remote: str) -> str | None:
        try:
            return self._p(remote).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def write_text(self, remote: str, text: str) -> None:
        p = self._p(remote)
        fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def remove(self, remote: str) -> None:
        self._p(remote).unlink(missing_ok=True)

    def rename(self, src: str, dst: str) -> None:
        os.replace(self._p(src), self._p(dst))

    def make_executable(self, remote: str) -> None:
        os.chmod(self._p(remote), 0o755)

    def file_sizes(self, remotes: list[str]) -> dict[str, int | None]:
        return {r: (self._p(r).stat().st_size if self._p(r).is_file() else None) for r in remotes}

    def probe(self) -> DeviceInfo:
        import platform

        return DeviceInfo(platform.system(), normalise_machine(platform.machine()))

    def sha256s(self, remotes: list[str], timeout: float = HELPER_TIMEOUT_S) -> dict[str, str | None] | None:
        import hashlib

        out: dict[str, str | None] = {}
        for r in remotes:
            p = self._p(r)
            if not p.is_file():
                out[r] = None
                continue
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
            out[r] = h.hexdigest()
        return out

    def check(self) -> None:
        if self.profile.exec_wrapper and shutil.which(self.profile.exec_wrapper[0]) is None:
            hint = " (Debian: apt-get install qemu-user-static)" if "qemu" in self.profile.exec_wrapper[0] else ""
            raise UnreachableError(f"device {self.name}: exec wrapper {self.profile.exec_wrapper[0]!r} is not on PATH{hint}")


# --------------------------------------------------------------------------------------------------- shell-based


class _ShellTransport(Transport):
    """Shared part of ssh and adb: everything but the raw ``_shell``/``push``/``pull`` is a small sh script."""

    @abstractmethod
    def _shell(self, script: str, timeout: float, what: str) -> tuple[int | None, str, float]:
        """Run a sh script on the device; (exit status from the marker or None on local timeout, output, seconds).
        Raises ``TransportError`` when the link fails."""

    def absolute(self, path: str) -> str:
        if path != "~" and not path.startswith("~/"):
            return path
        # A marked line: a login shell's rc files may print their own noise (e.g. "pyenv: cannot rehash: ...") into the
        # same stream, and that must not be taken for the home directory.
        out = self._helper('printf "MVLM-HOME:%s\\n" "$HOME"', "finding the home directory")
        marked = [ln[len("MVLM-HOME:"):].strip() for ln in out.splitlines() if ln.startswith("MVLM-HOME:")]
        home = marked[-1] if marked else out.strip()
        if not home.startswith("/"):
            raise MvlmError(f"device {self.name}: $HOME is {home!r}; give the profile an absolute workdir")
        return home if path == "~" else home.rstrip("/") + "/" + path[2:]

    def _helper(self, script: str, what: str, timeout: float = HELPER_TIMEOUT_S) -> str:
        rc, out, _ = self._shell(script, timeout, what)
        if rc is None:
            raise ConnectionLostError(f"device {self.name}: {what} did not finish within {timeout:.0f} s")
        if rc != 0:
            raise MvlmError(f"device {self.name}: {what} failed (status {rc}): {_last_line(out)}")
        return out

    def run(self, argv: list[str], timeout: float, env: dict[str, str] | None = None, cwd: str | None = None,
            on_output: OutputFn | None = None) -> RunResult:
        full = self.wrapped(argv)
        merged = dict(self.profile.env)
        merged.update(env or {})
        script = remote_command(full, timeout, merged, cwd)
        stream = {"on_output": on_output} if on_output is not None else {}  # the ssh/adb client's output, as it comes
        rc, out, duration = self._shell(script, timeout + CLIENT_GRACE_S, f"running {Path(full[0]).name}", **stream)
        timed_out, sig = _interpret_remote_status(rc, duration, timeout)
        return RunResult(rc, out, duration, timed_out, sig, argv=full)

    def mkdir(self, remote: str) -> None:
        self._helper(f"mkdir -p {quote_remote(remote)}", f"mkdir {remote}")

    def remove(self, remote: str) -> None:
        self._helper(f"rm -f {quote_remote(remote)}", f"remove {remote}")

    def rename(self, src: str, dst: str) -> None:
        self._helper(f"mv -f {quote_remote(src)} {quote_remote(dst)}", f"rename {src}")

    def make_executable(self, remote: str) -> None:
        self._helper(f"chmod 755 {quote_remote(remote)}", f"chmod {remote}")

    def read_text(self, remote: str) -> str | None:
        q = quote_remote(remote)
        rc, out, _ = self._shell(f"if [ -f {q} ]; then cat {q}; else exit 3; fi", HELPER_TIMEOUT_S, f"read {remote}")
        if rc == 3:
            return None
        if rc != 0:
            raise MvlmError(f"device {self.name}: cannot read {remote}: {_last_line(out)}")
        return out

    def write_text(self, remote: str, text: str) -> None:
        tmp_remote = f"{remote}.tmp-{os.getpid()}"
        with tempfile.TemporaryDirectory(prefix="mvlm-") as d:
            local = Path(d) / (posixpath.basename(remote) or "text")  # an error names the file being written
            local.write_text(text, encoding="utf-8")
            self.push(local, tmp_remote)
        self.rename(tmp_remote, remote)

    def free_bytes(self, remote_dir: str) -> int:
        script = (
            f'd={quote_remote(remote_dir)}; while [ ! -d "$d" ] && [ "$d" != / ]; do d=$(dirname "$d"); done; '
            'df -Pk "$d" 2>/dev/null || df -k "$d"'
        )
        out = self._helper(script, f"free space of {remote_dir}")
        for line in reversed(out.strip().splitlines()):
            fields = line.split()
            for i, tok in enumerate(fields):
                if re.fullmatch(r"\d+%", tok) and i >= 1 and fields[i - 1].isdigit():
                    return int(fields[i - 1]) * 1024
        raise MvlmError(f"device {self.name}: cannot read free space from df output: {_last_line(out)}")

    def file_sizes(self, remotes: list[str]) -> dict[str, int | None]:
        if not remotes:
            return {}
        quoted = " ".join(quote_remote(r) for r in remotes)
        script = f'for f in {quoted}; do if [ -f "$f" ]; then stat -c %s "$f" 2>/dev/null || wc -c < "$f"; else echo -; fi; done'
        lines = [ln.strip() for ln in self._helper(script, "list files").strip().splitlines() if ln.strip()]
        if len(lines) != len(remotes):
            raise MvlmError(f"device {self.name}: unexpected file listing ({len(lines)} lines for {len(remotes)} files)")
        return {r: (None if s == "-" else int(s)) for r, s in zip(remotes, lines, strict=True)}

    def probe(self) -> DeviceInfo:
        out = self._helper(_PROBE_SCRIPT, "probing the device (uname -m)")
        line = next((ln for ln in reversed(out.strip().splitlines()) if ln.count("|") == 2), "")
        system, machine, abi = (x.strip() for x in (line.split("|") if line else ("", "", "")))
        return DeviceInfo(system, normalise_machine(machine), abi)

    def sha256s(self, remotes: list[str], timeout: float = HELPER_TIMEOUT_S) -> dict[str, str | None] | None:
        if not remotes:
            return {}
        quoted = " ".join(quote_remote(r) for r in remotes)
        out = self._helper(_SHA_SCRIPT.format(files=quoted), "checking file hashes (sha256sum)", timeout=timeout)
        lines = [ln.strip() for ln in out.strip().splitlines() if ln.strip()]
        if lines == ["no-sha256-tool"]:
            return None
        if len(lines) != len(remotes):
            raise MvlmError(f"device {self.name}: unexpected sha256sum output ({len(lines)} lines for {len(remotes)} files)")
        result: dict[str, str | None] = {}
        for r, line in zip(remotes, lines, strict=True):
            digest = line.split()[0].lower()
            result[r] = None if line == "-" else (digest if _SHA_RE.match(digest) else "unreadable")
        return result


# --------------------------------------------------------------------------------------------------- ssh

_SSH_HOSTKEY = (
    "Host key verification failed",
    "REMOTE HOST IDENTIFICATION HAS CHANGED",
    "No ED25519 host key",
    "host key for",
    "No matching host key",
)
_SSH_AUTH = ("Permission denied", "Too many authentication failures", "no mutual signature")
_SSH_UNREACHABLE = (
    "Connection refused",
    "Could not resolve hostname",
    "No route to host",
    "Network is unreachable",
    "Connection timed out",
    "Operation timed out",
    "Name or service not known",
    "Connection closed by UNKNOWN",
    "kex_exchange_identification",
)


class SshTransport(_ShellTransport):
    """The OpenSSH ``ssh`` client; one multiplexed connection per transport."""

    def __init__(self, profile: DeviceProfile):
        super().__init__(profile)
        if shutil.which("ssh") is None:
            raise MvlmError("the OpenSSH client `ssh` is not on PATH: install it (Debian: apt-get install openssh-client)")
        # profiles are checked when loaded; a DeviceProfile built in code gets the same allow-list here
        from mvlm_bench.devices import check_known_hosts_file, check_ssh_config_file, check_ssh_options

        where = str(profile.source) if profile.source else f"device {profile.name}"
        check_ssh_options(profile.ssh.options, where)
        if profile.ssh.known_hosts:
            check_known_hosts_file(profile.ssh.known_hosts, f"{where}: field 'ssh.known_hosts'")
        # The config file is checked again here, and ssh gets a private copy of exactly the bytes that were checked:
        # a file changed after the check cannot slip a ProxyCommand in.
        self._config_file = profile.ssh.config_file
        checked = check_ssh_config_file(profile.ssh.config_file, where) if profile.ssh.config_file else None
        self._private_dir: str | None = None
        if checked is not None:
            self._private_dir = _private_dir("mvlm-sshcfg-")
            self._config_file = os.path.join(self._private_dir, "ssh_config")
            fd = os.open(self._config_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(checked)
        self._control_dir: str | None = None
        if profile.ssh.control_master:
            self._control_dir = _private_dir("mvlm-ssh-")
        self._finalizer = weakref.finalize(self, _close_master, self._base_argv(), self._control_dir, self._private_dir)

    @property
    def destination(self) -> str:
        user, host, port = self.profile.ssh_user, self.profile.ssh_host, self.profile.ssh_port
        return f"{user + '@' if user else ''}{host}{':' + str(port) if port else ''}"

    def _base_argv(self) -> list[str]:
        o = self.profile.ssh
        argv = ["ssh"]
        if self._config_file:
            argv += ["-F", self._config_file]
        for opt in o.options:  # ssh takes the first value it sees: user options win over our defaults
            argv += ["-o", opt]
        argv += [
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={o.connect_timeout}",
            "-o",
            "ServerAliveInterval=10",
            "-o",
            "ServerAliveCountMax=3",
            "-o",
            "LogLevel=ERROR",
        ]
        if o.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={_ssh_path(o.known_hosts)}", "-o", "StrictHostKeyChecking=yes"]
        if o.identity_file:
            argv += ["-i", o.identity_file.replace("%", "%%"), "-o", "IdentitiesOnly=yes"]
        if self._control_dir:
            # mkdtemp under /tmp: a short path without spaces (unix socket paths are limited to ~100 bytes)
            control_path = self._control_dir.replace("%", "%%") + "/%C"
            argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={control_path}", "-o", "ControlPersist=60"]
        port = self.profile.ssh_port
        if port:
            argv += ["-p", str(port)]
        if self.profile.ssh_user:
            argv += ["-l", self.profile.ssh_user]
        argv += ["--", self.profile.ssh_host or ""]
        return argv

    def _classify(self, output: str, what: str) -> TransportError:
        dest = self.destination
        line = _last_line(output)
        if any(s in output for s in _SSH_HOSTKEY):
            where = self.profile.ssh.known_hosts or "~/.ssh/known_hosts"
            return HostKeyError(
                f"ssh {dest}: host key verification failed ({line}); the device's key is unknown or changed: "
                f"check it and update {where} (ssh-keygen -R HOST, then connect once with plain ssh)"
            )
        if any(s in output for s in _SSH_AUTH):
            return AuthError(
                f"ssh {dest}: authentication failed ({line}); install your public key on the device "
                "(ssh-copy-id) or set ssh.identity_file in the profile"
            )
        if any(s in output for s in _SSH_UNREACHABLE):
            return UnreachableError(
                f"ssh {dest}: cannot connect ({line}); is the device on, on this network, and running sshd on that port?"
            )
        said = f" ({line})" if line != "no message" else ""
        return ConnectionLostError(
            f"ssh {dest}: connection lost during {what}{said}; run again (an interrupted sync restarts cleanly)"
        )

    def _shell(self, script: str, timeout: float, what: str,
               on_output: OutputFn | None = None) -> tuple[int | None, str, float]:
        argv = self._base_argv() + ["sh -c " + shlex.quote(_with_marker(script))]
        rc, out, duration, timed_out = _run_client(argv, timeout, on_output=on_output)
        if timed_out:
            return None, out, duration
        status, text = _split_marker(out)
        if status is None:
            raise self._classify(out, what)
        return status, text, duration

    def push(self, local: Path, remote: str, progress: ProgressFn | None = None) -> None:
        local = Path(local)
        total = local.stat().st_size
        argv = self._base_argv() + ["sh -c " + shlex.quote(f"cat > {quote_remote(remote)}")]
        done = 0
        broken = False
        with tempfile.TemporaryFile() as out, open(local, "rb") as src:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            assert proc.stdin is not None
            try:
                while chunk := src.read(CHUNK):
                    proc.stdin.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
                proc.stdin.close()
            except (BrokenPipeError, ConnectionResetError, ValueError):
                broken = True
            try:
                rc = proc.wait(timeout=HELPER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                rc = None
            out.seek(0)
            text = out.read().decode("utf-8", errors="replace")
        if rc == 0 and not broken:
            if progress and total == 0:
                progress(0, 0)
            return
        if rc == 255 or rc is None or broken:
            arrived = self._size_after_failure(remote)
            sent = (f"{arrived} of {total} bytes reached the device" if arrived is not None
                    else f"at most {done} of {total} bytes sent")
            raise self._classify(text, f"push of {local.name} to {remote} ({sent})")
        raise MvlmError(f"ssh {self.destination}: writing {remote} failed (status {rc}): {_last_line(text)}")

    def _size_after_failure(self, remote: str) -> int | None:
        """After a dropped push: how much of ``remote`` the device really holds (one quick new connection), or None."""
        try:
            rc, out, _ = self._shell(
                f"if [ -f {quote_remote(remote)} ]; then wc -c < {quote_remote(remote)}; else echo 0; fi",
                self.profile.ssh.connect_timeout + 5.0, "size check",
            )
        except MvlmError:
            return None
        text = out.strip()
        return int(text) if rc == 0 and text.isdigit() else None

    def pull(self, remote: str, local: Path) -> None:
        local = Path(local)
        tmp = local.with_name(local.name + ".part")
        argv = self._base_argv() + ["sh -c " + shlex.quote(f"cat {quote_remote(remote)}")]
        with open(tmp, "wb") as dst, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=dst, stderr=err, start_new_session=True)
            rc = proc.wait()
            err.seek(0)
            text = err.read().decode("utf-8", errors="replace")
        if rc != 0:
            tmp.unlink(missing_ok=True)
            if rc == 255:
                raise self._classify(text, f"pull of {remote}")
            raise MvlmError(f"ssh {self.destination}: cannot read {remote}: {_last_line(text)}")
        os.replace(tmp, local)

    def shell_argv(self, script: str) -> list[str]:
        """The ssh command line that runs the sh ``script`` on the device, for a process the caller starts and owns
        (``mvlm serve``: a server that outlives one call); stdin, stdout and stderr are the caller's."""
        return self._base_argv() + ["sh -c " + shlex.quote(script)]

    def forward_argv(self, local_port: int, remote_port: int) -> list[str]:
        """``ssh -N -L 127.0.0.1:LOCAL:127.0.0.1:REMOTE`` over a connection of its own (not the shared one: the forward
        ends with this process), exiting at once when the forward cannot be set up. Host-key checking as for ``run``."""
        base = self._base_argv()
        return [base[0], "-o", "ControlMaster=no", "-o", "ControlPath=none", "-o", "ExitOnForwardFailure=yes", "-N",
                "-L", f"127.0.0.1:{int(local_port)}:127.0.0.1:{int(remote_port)}", *base[1:]]

    def check(self) -> None:
        rc, out, _ = self._shell("true", self.profile.ssh.connect_timeout + 20.0, "connection check")
        if rc is None:
            raise UnreachableError(f"ssh {self.destination}: no answer within {self.profile.ssh.connect_timeout + 20} s")
        if rc != 0:
            raise TransportError(f"ssh {self.destination}: the remote shell fails ({_last_line(out)})")

    def close(self) -> None:
        self._finalizer()


def _ssh_path(path: str) -> str:
    """A path as an ssh_config value: ``%`` escaped (tokens), double-quoted when it holds spaces."""
    path = path.replace("%", "%%")
    return f'"{path}"' if any(c.isspace() for c in path) else path


def _private_dir(prefix: str) -> str:
    """A 0700 temp dir under /tmp (short paths: unix socket paths are limited to ~100 bytes)."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp" if os.path.isdir("/tmp") else None)
    os.chmod(d, 0o700)
    return d


def _close_master(base_argv: list[str], control_dir: str | None, private_dir: str | None = None) -> None:
    if control_dir:
        if any(os.scandir(control_dir)):
            exit_argv = base_argv[:-2] + ["-O", "exit", "--", base_argv[-1]]
            _run_client(exit_argv, 10.0)
        shutil.rmtree(control_dir, ignore_errors=True)
    if private_dir:  # the checked copy of the profile's ssh config (after `ssh -O exit`, which reads it)
        shutil.rmtree(private_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------- adb

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


class AdbTransport(_ShellTransport):
    """The ``adb`` client; the device is ``profile.address`` (its serial)."""

    def __init__(self, profile: DeviceProfile):
        super().__init__(profile)
        self.serial = profile.address or ""

    def _adb(self, args: list[str], timeout: float | None,
             on_output: OutputFn | None = None) -> tuple[int | None, str, float, bool]:
        if shutil.which("adb") is None:
            raise MvlmError("the `adb` client is not on PATH: install Android platform-tools (Debian: apt-get install adb)")
        return _run_client(["adb", "-s", self.serial, *args], timeout, on_output=on_output)

    def _classify(self, output: str, what: str, during_transfer: bool) -> TransportError:
        line = _last_line(output)
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
        return ConnectionLostError(f"adb {self.serial}: {what} failed ({line})")

    def _shell(self, script: str, timeout: float, what: str,
               on_output: OutputFn | None = None) -> tuple[int | None, str, float]:
        rc, out, duration, timed_out = self._adb(["shell", "sh -c " + shlex.quote(_with_marker(script))], timeout,
                                                 on_output=on_output)
        if timed_out:
            return None, out, duration
        status, text = _split_marker(out)
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
            raise TransportError(f"adb {self.serial}: the device shell fails ({_last_line(out2)})")
