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


@pytest.mark.slow
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


def _help_texts() -> dict[str, str]:
    return {" ".join(a): mvlm(*a, "--help").stdout for a in [[]] + [[c] for c in COMMANDS] + SUBCOMMANDS}


@pytest.mark.slow
def test_help_never_labels_a_flag_as_taking_a_value():
    """typer labels options with their type; `--json <bool>` read as if it took a value (and `--json true` fails),
    and `-t <list[str]>` as Python. Flags carry no label; repeatable options show `<str>…`; the others keep theirs."""
    texts = _help_texts()
    labelled = [cmd or "mvlm" for cmd, text in texts.items() if "<bool>" in text]
    assert not labelled, f"<bool> labels in the help of: {labelled}"
    assert "--json" in texts["compare"] and "<path>" in texts["compare"]  # flags still listed; values still labelled
    pythonic = [cmd or "mvlm" for cmd, text in texts.items() if "<list[" in text]
    assert not pythonic, f"Python's <list[...]> type labels in the help of: {pythonic}"
    assert "<Path>…" in texts["bench"] and "<str>…" in texts["bench"]  # repeatable: the item type and an ellipsis


def test_version_names_the_package_the_pinned_llama_cpp_and_its_patches():
    from importlib.metadata import version
    from pathlib import Path

    from mvlm_core.runtime import LLAMA_CPP_COMMIT

    r = mvlm("--version")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"mvlm {version('mvlm')}"
    assert LLAMA_CPP_COMMIT in lines[1]
    patches = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "mvlm_core" / "patches").glob("*.patch"))
    assert patches and all(any(ln.strip().startswith(p + " ") for ln in lines[2:]) for p in patches)


@pytest.mark.slow
def test_tables_read_through_a_pipe_never_fold_a_number():
    """A CI log or `| cat` is not a terminal: rich took 80 columns (or $COLUMNS) and folded cells (0.437 as 0.43 over
    7). Each number `bench parse --json` gives must print whole on its file's row, at COLUMNS=80 through a pipe."""
    import json
    from pathlib import Path

    data = Path(__file__).resolve().parent / "data" / "llama-cpp-outputs"
    files = [str(p) for p in sorted(data.glob("0*.txt"))[:6]]
    env = {"COLUMNS": "80", "PATH": "/usr/bin:/bin"}
    table = subprocess.run([sys.executable, "-m", "mvlm", "bench", "parse", *files], capture_output=True, text=True,
                           timeout=120, env=env)
    js = subprocess.run([sys.executable, "-m", "mvlm", "bench", "parse", "--json", *files], capture_output=True,
                        text=True, timeout=120, env=env)
    assert table.returncode == 0 and js.returncode == 0, table.stderr + js.stderr
    rows = {Path(r["file"]).name: r for r in json.loads(js.stdout)}
    assert len(rows) == len(files)
    for name, rec in rows.items():
        line = next((ln for ln in table.stdout.splitlines() if name in ln), None)
        assert line is not None, f"{name} is not whole on one line:\n{table.stdout}"
        for key in ("load_ms", "total_ms"):
            if rec[key] is not None:
                assert f"{rec[key]:.2f}" in line, (key, line)
