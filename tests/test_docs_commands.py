"""Every `mvlm` command in docs/ (and README.md) as a reader copies it.

- Each command in a code block parses with the real app (options, values, sub-commands); each synopsis and each
  inline mention names only commands and options that exist.
- A block whose commands need a phone, a board or a GPU says so on its first line (``# needs a phone ...``), and a
  block that says so has such a command: the mark is read from the commands, not trusted.
- Every other command runs here, as written, with bash, in the order its block gives, from a workspace laid out as the
  docs assume: the checkpoints they name (the tiny checkpoints of each family, under the releases' names), the model
  files they name, a history with entries, two llama.cpp logs. Exit 0, or 4 from a regression gate that judged.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from docs_commands import NEEDS, blocks, inline, needs, parse, unknown_words

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BLOCKS = blocks()


def _runs_here(cmd) -> bool:
    return not cmd.synopsis and not needs(cmd.argv)


RUNNABLE = [b for b in BLOCKS if any(_runs_here(c) for c in b.commands)]


def test_the_docs_have_commands_to_check():
    n = sum(len(b.commands) for b in BLOCKS)
    assert n >= 60 and len(RUNNABLE) >= 15, (n, len(RUNNABLE))


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_commands_parse(block):
    import typer

    for c in block.commands:
        if c.synopsis:
            assert not unknown_words(c.argv), f"{c.where}: {c.text}: {unknown_words(c.argv)}"
            continue
        try:
            parse(c.argv)
        except (typer.Exit, SystemExit):
            pass
        except Exception as e:  # the usage error mvlm would print
            pytest.fail(f"{c.where}: {c.text}\n  -> {type(e).__name__}: {e}")


def test_inline_mentions_name_real_commands_and_options():
    bad = [f"{c.where}: `{c.text}`: {', '.join(unknown_words(c.argv))}" for c in inline() if unknown_words(c.argv)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_a_block_says_what_hardware_it_needs(block):
    derived = set().union(*(needs(c.argv) for c in block.commands))
    assert block.mark == derived, (
        f"{block.where}: its commands need {sorted(derived) or 'nothing beyond this machine'}; the block's first line "
        f"says {sorted(block.mark) or 'nothing'} (write '# needs a phone / a board / a GPU ...', words {NEEDS})")
    if block.mark:  # and it says whether some of its lines run here all the same
        assert ("run here" in block.mark_text) == any(_runs_here(c) for c in block.commands), block.mark_text


def test_needs_are_read_from_the_command():
    assert needs(["bench", "--device", "sd888", "-m", "M.gguf"]) == {"phone"}
    assert needs(["bench", "--device", "adb:R58M12ABCDE"]) == {"phone"}
    assert needs(["bench", "--device", "orin"]) == {"board"}
    assert needs(["bench", "--device", "ssh://me@box"]) == {"board"}
    assert needs(["bench", "--device", "ssh://me@127.0.0.1:2222"]) == set()
    assert needs(["bench", "--device", "local"]) == needs(["bench", "--device", "qemu-arm64"]) == set()
    assert needs(["runtime", "build", "--target", "cuda"]) == {"gpu"}
    assert needs(["verify", "CKPT", "--runtime", "linux-arm64"]) == set()
    assert needs(["report", "--paper", "mobilevlm", "--device", "orin"]) == {"board"}  # orin's stored entries
    assert needs(["report", "--paper", "mobilevlm", "--device", "local"]) == set()
    assert needs(["devices", "orin", "sd888"]) == {"board", "phone"}


# ------------------------------------------------------------------------------------------------------------------
# Running them: the workspace the docs assume.
# ------------------------------------------------------------------------------------------------------------------
RELEASES = {  # where the docs put a checkpoint -> (family maker, the release's _name_or_path)
    "home/hf/MobileVLM_V2-1.7B": ("v2", "mtgv/MobileVLM_V2-1.7B"),
    "path/to/MobileVLM_V2-1.7B": ("v2", "mtgv/MobileVLM_V2-1.7B"),
    "path/to/MobileVLM-1.7B": ("v1", "mtgv/MobileVLM-1.7B"),
    "path/to/imp-v1-3b": ("imp", "MILVLG/imp-v1-3b"),
    "CKPT": ("v2", "mtgv/MobileVLM_V2-1.7B"),
}
LM_NAMES = ["M.gguf", "M-Q4_K_S.gguf", "X-Q4_K_S.gguf", "new-Q4_K_S.gguf", "old-Q4_K_S.gguf"]


def _env(ws: Path) -> dict:
    from mvlm_core.runtime import cache_root

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MVLM_", "COLUMNS", "PYTEST"))}
    return env | {"HOME": str(ws / "home"), "MVLM_CACHE": str(cache_root()), "HF_HUB_OFFLINE": "1",
                  "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def sh(ws: Path, text: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """The command as a reader's shell runs it: bash, the venv's mvlm first on PATH, in the workspace."""
    return subprocess.run(["bash", "-c", text], cwd=ws, env=_env(ws), capture_output=True, text=True,
                          errors="replace", timeout=timeout)


def _checkpoint(dest: Path, kind: str, name: str) -> None:
    if kind == "imp":
        from mvlm_convert.families.imp import make_tiny_imp

        make_tiny_imp(dest)
    else:
        from mvlm_convert.families.mobilevlm import make_tiny_checkpoint

        make_tiny_checkpoint(dest, variant=kind, seed=0)
    cfg = dest / "config.json"
    cfg.write_text(json.dumps(json.loads(cfg.read_text()) | {"_name_or_path": name}, indent=2))


def _ok(r: subprocess.CompletedProcess, what: str) -> None:
    assert r.returncode == 0, f"{what}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, host_runtime) -> Path:
    ws = tmp_path_factory.mktemp("docs-ws")
    (ws / "home").mkdir()
    for where, (kind, name) in RELEASES.items():
        _checkpoint(ws / where, kind, name)
    _ok(sh(ws, "mvlm convert CKPT --outdir models --outtype f16"), "convert")
    _ok(sh(ws, "mvlm quantize models/MobileVLM_V2-1.7B-F16.gguf --type q4_k_s --no-quality"), "quantize")
    for name in LM_NAMES:
        shutil.copy(ws / "models/MobileVLM_V2-1.7B-Q4_K_S.gguf", ws / name)
    for name in ("lm.gguf", "model.gguf"):
        shutil.copy(ws / "models/MobileVLM_V2-1.7B-F16.gguf", ws / name)
    shutil.copy(ws / "models/mmproj-MobileVLM_V2-1.7B-F16.gguf", ws / "mmproj.gguf")
    logs = ROOT / "tests/data/llama-cpp-outputs"
    shutil.copy(logs / "05_mobilevlm_android-sd888_llava-cli_no-total-tokens.txt", ws / "run1.log")
    shutil.copy(logs / "08_mobilevlm_jetson-orin_cuda_llava-cli.txt", ws / "run2.log")
    quick = "mvlm bench --device local --protocol lm -m M.gguf -n 8 --repeat 2 -t 1,2"
    for i in range(8):  # 16 entries in ./mvlm-history.sqlite: the ids the docs name (id:12, id:15) exist; main's
        _ok(sh(ws, f"{quick} --save --label {'pr-42' if i in (3, 7) else 'main'}"), "history seed")  # then a PR's
    for name in ("base", "cand"):
        _ok(sh(ws, f"{quick} --json-file {name}.json"), "bench json")
    return ws


def _serve(ws: Path, text: str) -> None:
    """`mvlm serve ...` runs until Ctrl-C: started as written, asked for its models, then stopped with SIGINT."""
    proc = subprocess.Popen(["bash", "-c", f"exec {text}"], cwd=ws, env=_env(ws), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    try:
        url = None
        deadline = time.monotonic() + 180
        lines = []
        while time.monotonic() < deadline and url is None:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "OpenAI base URL:" in line:
                url = line.split("OpenAI base URL:")[1].strip()
        assert url, "".join(lines)
        with urllib.request.urlopen(f"{url}/models", timeout=30) as r:
            models = json.load(r)
        assert models["data"], models
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.where for b in RUNNABLE])
def test_runs_as_written(block, workspace, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws, symlinks=True)
    for c in block.commands:
        if not _runs_here(c):
            continue
        if c.argv[:1] == ["serve"]:
            _serve(ws, c.text)
            continue
        r = sh(ws, c.text)
        judged = "--fail-on-regression" in c.argv and r.returncode == 4 and "regression" in r.stderr
        assert r.returncode == 0 or judged, (
            f"{c.where}: {c.text}\nexit {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
        assert "Traceback" not in r.stderr, f"{c.where}: {c.text}\n{r.stderr[-4000:]}"
