"""The ``local`` transport: this machine (with an optional ``exec_wrapper`` such as ``qemu-aarch64-static``)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from mvlm_bench.device.transports.base import (
    CHUNK,
    HELPER_TIMEOUT_S,
    THERMAL_ROOT,
    Capabilities,
    DeviceInfo,
    OutputFn,
    ProgressFn,
    RunResult,
    ServerLaunch,
    Transport,
    UnreachableError,
    normalise_machine,
    run_client,
)
from mvlm_core.errors import MvlmError


class LocalTransport(Transport):
    """This machine. The work dir is a local path; ``exec_wrapper`` (qemu) applies to ``run`` only."""

    kind = "local"
    default_workdir = "~/.cache/mvlm/device/local"
    # the process runs here: its wall time is the device's own, its ports are this machine's
    capabilities = Capabilities(port_forward=True, same_host=True, wall_clock=True)

    @classmethod
    def lease_key(cls, profile: Any) -> str:
        return f"local:{socket.gethostname()}"

    def read_celsius(self, root: str = THERMAL_ROOT) -> float | None:
        from mvlm_bench.device.thermal import parse_zone_values

        values = []
        for path in sorted(glob.glob(os.path.join(root, "thermal_zone*", "temp"))):
            try:
                with open(path, encoding="ascii", errors="replace") as f:
                    values.append(f.read())
            except OSError:  # EINVAL / EAGAIN from a sensor that is off
                continue
        return parse_zone_values(values)

    def server_launch(self, argv: list[str], env: dict[str, str]) -> ServerLaunch:
        return ServerLaunch(self.wrapped(argv), {**os.environ, **self.profile.env, **env}, via_shell=False)

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
        rc, out, duration, timed_out = run_client(full, timeout, env=merged, cwd=str(self._p(cwd)) if cwd else None,
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
        try:
            self._p(remote).mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # the path, or one of its parents, is a file
            raise MvlmError(f"cannot make the directory {remote} on this machine: it, or a directory above it, is a "
                            "file; set the profile's workdir to a directory") from None
        except OSError as e:
            raise MvlmError(f"cannot make the directory {remote} on this machine ({e.strerror or e}); set the profile's "
                            "workdir to a writable directory") from None

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
