"""docs/python.md's recipe, run as it stands, in an environment that holds only what `mvlm runtime env` exports.

Also `mvlm runtime env` itself: export lines whose values survive the shell (quoted), and one line + exit 2 when the
runtime is not built.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_chat_clients import Q, convert_tiny

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def recipe() -> str:
    """The ```python block of docs/python.md (there is exactly one)."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "python.md").read_text(), re.S)
    assert len(blocks) == 1, blocks
    return blocks[0]


def bare_env(**extra: str) -> dict[str, str]:
    """PATH (this venv first), HOME and the cache location only: nothing from the test process's llama_cpp setup."""
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": os.environ["HOME"]}
    for var in ("MVLM_CACHE", "XDG_CACHE_HOME"):
        if var in os.environ:
            env[var] = os.environ[var]
    return {**env, **extra}


def in_shell(script: str, *args: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    """bash -c SCRIPT with ARGS as $0, $1, ..."""
    return subprocess.run(["bash", "-c", script, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def fake_runtime(root: Path) -> Path:
    """A runtime install dir as `mvlm runtime build` leaves it (manifest + the two libraries), found via latest-host."""
    inst = root / "install"
    (inst / "lib").mkdir(parents=True)
    (inst / "manifest.json").write_text(json.dumps({"target": "host"}))
    for name in ("libllama.so", "libmtmd.so"):
        (inst / "lib" / name).write_bytes(b"")
    return inst


def test_env_values_are_shell_quoted(tmp_path):
    cache = tmp_path / "cache"
    inst = fake_runtime(tmp_path / "it's a \"runtime\" $HOME")
    (cache / "runtime").mkdir(parents=True)
    (cache / "runtime" / "latest-host.json").write_text(json.dumps({"root": str(inst)}))
    env = bare_env(MVLM_CACHE=str(cache))
    r = in_shell('out=$(mvlm runtime env) || exit 9; printf "%s\\n" "$out" >&2; eval "$out"; '
                 'printf "%s\\n%s" "$LLAMA_CPP_LIB_PATH" "$MTMD_CPP_LIB"', env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n") == [str(inst / "lib")] * 2
    assert [ln.split("=")[0] for ln in r.stderr.splitlines()] == ["export LLAMA_CPP_LIB_PATH", "export MTMD_CPP_LIB"]


def test_env_without_a_build_is_one_line_exit_2(tmp_path):
    r = subprocess.run([str(VENV_BIN / "mvlm"), "runtime", "env"], capture_output=True, text=True, timeout=60,
                       env=bare_env(MVLM_CACHE=str(tmp_path / "empty")))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: no host runtime is built yet") and "mvlm runtime build" in r.stderr


@pytest.mark.slow
def test_bindings_load_only_after_eval(tmp_path, host_runtime):
    probe = "import llama_cpp, llama_cpp.mtmd_cpp; print(llama_cpp.llama_cpp._base_path)"
    # without the eval: this venv's llama-cpp-python has no libraries of its own
    r = in_shell('exec "$0" -c "$1"', sys.executable, probe, env=bare_env())
    assert r.returncode != 0 and "Shared library with base name 'llama' not found" in r.stderr, r.stderr[-2000:]
    # with it: the runtime's libraries, also from a path that needs quoting (a copy of the real lib/)
    spaced = tmp_path / "my runtime's dir" / "install"
    shutil.copytree(host_runtime / "lib", spaced / "lib", symlinks=True)
    shutil.copy(host_runtime / "manifest.json", spaced / "manifest.json")
    (tmp_path / "cache" / "runtime").mkdir(parents=True)
    (tmp_path / "cache" / "runtime" / "latest-host.json").write_text(json.dumps({"root": str(spaced)}))
    for env, lib in ((bare_env(), host_runtime / "lib"), (bare_env(MVLM_CACHE=str(tmp_path / "cache")), spaced / "lib")):
        r = in_shell('eval "$(mvlm runtime env)" && exec "$0" -c "$1"', sys.executable, probe, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip() == str(lib)


@pytest.mark.slow
def test_python_md_recipe_runs_with_only_runtime_env(tmp_path, host_runtime):
    import numpy as np
    from PIL import Image

    model = convert_tiny("mobilevlm-v2", tmp_path)
    img = tmp_path / "a picture.png"
    Image.fromarray((np.arange(336 * 336 * 3) % 251).astype(np.uint8).reshape(336, 336, 3)).save(img)
    script = tmp_path / "chat.py"
    script.write_text(recipe())
    r = in_shell('eval "$(mvlm runtime env)" && exec "$0" "$@"', sys.executable, str(script), str(model.lm),
                 str(model.mmproj), str(img), env=bare_env())
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"^prompt tokens: (\d+)$", r.stderr, re.M)
    assert m, r.stderr[-2000:]
    assert int(m.group(1)) == model.expected([Q])
    assert r.stdout.strip() != ""  # it answered (random tiny weights: some text)
