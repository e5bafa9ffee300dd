"""`mvlm convert OWNER/NAME[@REV]`: a checkpoint by its Hugging Face Hub id, through huggingface_hub's own cache.

No test makes a network call: every one runs with ``HF_HUB_OFFLINE=1`` against a cache laid out as huggingface_hub
lays it out (``models--OWNER--NAME/{blobs,snapshots/<commit>,refs/main}``, snapshot files symlinked to blobs named
by their hash), filled here with a tiny MobileVLM V2 checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mvlm_convert.families.mobilevlm import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_hub_cache(cache: Path, repo_id: str, checkpoint: Path, commit: str = COMMIT, ref: str = "main") -> None:
    """``checkpoint``'s files in ``cache`` as huggingface_hub stores a downloaded snapshot."""
    owner, name = repo_id.split("/")
    root = cache / f"models--{owner}--{name}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = root / "snapshots" / commit / f.relative_to(checkpoint)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)


def mvlm(*args, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "mvlm", *map(str, args)], capture_output=True, text=True, timeout=600,
                          cwd=cwd, env=env)


@pytest.mark.slow
def test_convert_by_hub_id_from_the_cache_gives_the_files_the_directory_gives(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", variant="v2", seed=5)
    cache = tmp_path / "hub"
    fill_hub_cache(cache, "mtgv/MobileVLM_V2-tiny", ckpt)
    by_id, by_dir = tmp_path / "by-id", tmp_path / "by-dir"
    by_id.mkdir()
    r = mvlm("convert", "mtgv/MobileVLM_V2-tiny", "--outtype", "f32", cwd=by_id, cache=cache)
    assert r.returncode == 0, r.stderr
    made = sorted(p.name for p in by_id.iterdir())
    # named after the repository (the cache's directory is named by the commit), written where the user is
    assert made == ["MobileVLM_V2-tiny-F32.gguf", "mmproj-MobileVLM_V2-tiny-F32.gguf"], made
    r = mvlm("convert", ckpt, "--outtype", "f32", "--name", "MobileVLM_V2-tiny", "-o", by_dir, cwd=tmp_path,
             cache=cache)
    assert r.returncode == 0, r.stderr
    for name in made:
        assert (by_id / name).read_bytes() == (by_dir / name).read_bytes(), name
    # a revision by commit, and nothing was written into the cache
    again = tmp_path / "again"
    r = mvlm("convert", f"mtgv/MobileVLM_V2-tiny@{COMMIT}", "--outtype", "f32", "-o", again, cwd=tmp_path, cache=cache)
    assert r.returncode == 0, r.stderr
    assert not [p for p in cache.rglob("*.gguf")]


@pytest.mark.slow
@pytest.mark.parametrize("ref,says", [
    ("mtgv/Not-In-Cache", "hf download mtgv/Not-In-Cache"),
    ("mtgv/MobileVLM_V2-tiny@v9", "hf download mtgv/MobileVLM_V2-tiny --revision v9"),
])
def test_a_hub_id_missing_from_the_cache_offline_is_one_line_naming_the_download(tmp_path, ref, says):
    cache = tmp_path / "hub"
    cache.mkdir()
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("{}")
    fill_hub_cache(cache, "mtgv/MobileVLM_V2-tiny", tmp_path / "ck")
    r = mvlm("convert", ref, cwd=tmp_path, cache=cache)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert says in lines[0] and "HF_HUB_OFFLINE" in lines[0] and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "hub"]  # nothing written


def test_a_path_is_a_path_even_when_it_looks_like_a_hub_id(tmp_path):
    """`owner/name` that exists here is the directory (a typo'd one is refused as a path, never downloaded)."""
    from mvlm_convert.hub import hub_reference

    (tmp_path / "owner" / "name").mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert hub_reference("owner/name") is None
        assert hub_reference("owner/other") == ("owner/other", None)
        assert hub_reference("owner/other@main") == ("owner/other", "main")
        assert hub_reference("./owner/other") is None and hub_reference("a/b/c") is None
        assert hub_reference("../x") is None and hub_reference("owner/na..me") is None
    finally:
        os.chdir(cwd)
