"""The `mvlm` command line as a user meets it: every command listed with a purpose, every --help works, start-up is light."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = ["convert", "verify", "quantize", "runtime", "bench", "devices", "compare", "history", "report"]
SUBCOMMANDS = [["runtime", "build"], ["runtime", "path"], ["runtime", "info"], ["runtime", "check"], ["runtime", "env"],
               ["bench", "parse"]]


def mvlm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mvlm", *args], capture_output=True, text=True, timeout=120,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def test_top_level_help_lists_every_command_with_a_purpose():
    r = mvlm("--help")
    assert r.returncode == 0, r.stderr
    for cmd in COMMANDS:
        line = next((ln for ln in r.stdout.splitlines() if ln.strip("│ ").startswith(cmd + " ")), None)
        assert line is not None, f"{cmd} missing from mvlm --help"
        assert len(line.strip("│ ")[len(cmd):].strip()) > 15, f"{cmd} has no one-line purpose: {line!r}"


@pytest.mark.parametrize("argv", [[c] for c in COMMANDS] + SUBCOMMANDS, ids=lambda a: " ".join(a))
def test_every_command_explains_itself(argv):
    r = mvlm(*argv, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout and "--help" in r.stdout


def test_unknown_command_is_a_usage_error():
    r = mvlm("convertt")
    assert r.returncode == 2 and "No such command" in r.stderr and "Did you mean 'convert'" in r.stderr
    assert "Traceback" not in r.stderr


def test_startup_does_not_import_heavy_libraries():
    """`mvlm --help` and a cached `mvlm runtime build` must stay fast: torch/transformers/llama_cpp load lazily."""
    heavy = "('torch', 'transformers', 'llama_cpp', 'matplotlib')"
    code = f"import sys, mvlm.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
