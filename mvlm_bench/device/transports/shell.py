"""What the ssh and adb transports share: everything but the raw shell, push and pull is a small sh script."""

from __future__ import annotations

import os
import posixpath
import re
import shlex
import tempfile
from abc import abstractmethod
from pathlib import Path

from mvlm_bench.device.transports.base import (
    CLIENT_GRACE_S,
    HELPER_TIMEOUT_S,
    SERVER_PID_MARKER,
    THERMAL_ROOT,
    ConnectionLostError,
    DeviceInfo,
    OutputFn,
    RunResult,
    ServerLaunch,
    Transport,
    interpret_remote_status,
    last_line,
    normalise_machine,
    program_name,
    quote_remote,
    remote_command,
)
from mvlm_core.errors import MvlmError

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



SERVER_GRACE_S = 10.0  # a server's SIGTERM -> SIGKILL on the device


def server_script(workdir: str, argv: list[str], env: dict[str, str], grace: float = SERVER_GRACE_S) -> str:
    """The sh script that runs a server (llama-server) on the device: it prints the server's pid on a marker line,
    streams its log, and kills it (TERM, then KILL) as soon as its own stdin ends, i.e. when the session ends for any
    reason."""
    q = shlex.quote
    for key in env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise MvlmError(f"bad environment variable name {key!r}: letters, digits and '_' only")
    assigns = " ".join(f"{k}={q(v)}" for k, v in env.items())
    g = max(1, int(grace))
    return "\n".join([
        f"cd {q(workdir)} || exit 125",
        "exec 3<&0",  # the session's stdin: an asynchronous list would get /dev/null
        "__s=; command -v setsid >/dev/null 2>&1 && __s=setsid",
        f"{assigns + ' ' if assigns else ''}$__s {' '.join(q(a) for a in argv)} </dev/null 3<&- 2>&1 & __p=$!",
        f"echo {SERVER_PID_MARKER}$__p",
        f"( cat <&3 >/dev/null 2>&1; kill -TERM $__p 2>/dev/null; __n=0; while kill -0 $__p 2>/dev/null && "
        f"[ $__n -lt {g} ]; do sleep 1; __n=$((__n+1)); done; kill -KILL $__p 2>/dev/null ) >/dev/null 2>&1 &",
        "__w=$!",
        "exec 3<&-",
        "wait $__p; __rc=$?",
        "kill $__w 2>/dev/null",
        "exit $__rc",
    ])


class ShellTransport(Transport):
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
            raise MvlmError(f"device {self.name}: {what} failed (status {rc}): {last_line(out)}")
        return out

    def run(self, argv: list[str], timeout: float, env: dict[str, str] | None = None, cwd: str | None = None,
            on_output: OutputFn | None = None) -> RunResult:
        full = self.wrapped(argv)
        merged = dict(self.profile.env)
        merged.update(env or {})
        script = remote_command(full, timeout, merged, cwd)
        stream = {"on_output": on_output} if on_output is not None else {}  # the ssh/adb client's output, as it comes
        rc, out, duration = self._shell(script, timeout + CLIENT_GRACE_S, f"running {program_name(full)}", **stream)
        timed_out, sig = interpret_remote_status(rc, duration, timeout)
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
            raise MvlmError(f"device {self.name}: cannot read {remote}: {last_line(out)}")
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
        raise MvlmError(f"device {self.name}: cannot read free space from df output: {last_line(out)}")

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

    def read_celsius(self, root: str = THERMAL_ROOT) -> float | None:
        """One sh loop over the device's thermal zones (mvlm_bench.device.thermal reads the values)."""
        from mvlm_bench.device.thermal import ZONES_SCRIPT, parse_zone_values

        try:
            out = self._helper(ZONES_SCRIPT.format(root=quote_remote(root.rstrip("/"))), "reading the temperature",
                               timeout=30.0)
        except MvlmError as e:
            if getattr(e, "exit_code", None) == 3:  # the link itself: the caller's problem
                raise
            return None
        return parse_zone_values([ln[2:] for ln in out.splitlines() if ln.startswith("T:")])

    def server_launch(self, argv: list[str], env: dict[str, str]) -> ServerLaunch:
        script = server_script(self.workdir, self.wrapped(argv), {**self.profile.env, **env})
        return ServerLaunch(self.shell_argv(script), None, via_shell=True)
