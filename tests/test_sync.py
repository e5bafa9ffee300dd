"""Content-addressed sync over the local transport (ssh and adb syncs are in test_transports.py).

Hashes in the assertions come from hashlib in the test, not from the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import mvlm_bench.device.sync as syncmod
from mvlm_bench.device.profiles import profile_from_dict
from mvlm_bench.device.sync import MANIFEST_NAME, DeviceFullError, sha256_file, sync
from mvlm_bench.device.transports.base import ConnectionLostError
from mvlm_bench.device.transports.local import LocalTransport
from mvlm_core.errors import MvlmError


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _transport(wd: Path, cls=LocalTransport):
    return cls(profile_from_dict({"transport": "local", "target": "host", "workdir": str(wd)}, where="test", default_name="t"))


@pytest.fixture
def artifacts(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "llama-completion").write_bytes(b"\x7fELF" + os.urandom(70_000))
    (src / "libggml.so").write_bytes(os.urandom(30_000))
    (src / "m.gguf").write_bytes(os.urandom(1_500_000))
    return {
        "bin/llama-completion": src / "llama-completion",
        "lib/libggml.so": src / "libggml.so",
        "models/m.gguf": src / "m.gguf",
    }


def _manifest(wd: Path) -> dict:
    return json.loads((wd / MANIFEST_NAME).read_text())["files"]


def test_second_sync_pushes_nothing_and_changed_file_is_repushed(tmp_path, artifacts):
    wd = tmp_path / "device" / "work"
    t = _transport(wd)
    cache = tmp_path / "hashes.json"
    total = sum(p.stat().st_size for p in artifacts.values())
    res = sync(t, str(wd), artifacts, hash_cache=cache)
    assert res.pushed_bytes == total and sorted(res.pushed_files) == sorted(artifacts) and res.skipped_files == []
    for rel, p in artifacts.items():
        assert _sha(wd / rel) == _sha(p)
    assert os.access(wd / "bin/llama-completion", os.X_OK) and not os.access(wd / "models/m.gguf", os.X_OK)
    assert _manifest(wd) == {rel: {"sha256": _sha(p), "size": p.stat().st_size} for rel, p in artifacts.items()}
    assert res.remote_path("models/m.gguf") == str(wd / "models/m.gguf")

    res = sync(t, str(wd), artifacts, hash_cache=cache)
    assert res.pushed_bytes == 0 and res.pushed_files == [] and sorted(res.skipped_files) == sorted(artifacts)
    assert "pushed 0 bytes" in res.summary()

    artifacts["models/m.gguf"].write_bytes(os.urandom(1_500_000))  # same size, new content
    res = sync(t, str(wd), artifacts, hash_cache=cache)
    assert res.pushed_files == ["models/m.gguf"] and res.pushed_bytes == 1_500_000
    assert _sha(wd / "models/m.gguf") == _sha(artifacts["models/m.gguf"])
    assert _manifest(wd)["models/m.gguf"]["sha256"] == _sha(artifacts["models/m.gguf"])


def test_file_deleted_on_device_is_pushed_again(tmp_path, artifacts):
    wd = tmp_path / "w"
    t = _transport(wd)
    sync(t, str(wd), artifacts, hash_cache=tmp_path / "h.json")
    (wd / "lib/libggml.so").unlink()
    res = sync(t, str(wd), artifacts, hash_cache=tmp_path / "h.json")
    assert res.pushed_files == ["lib/libggml.so"]
    assert _sha(wd / "lib/libggml.so") == _sha(artifacts["lib/libggml.so"])


def test_other_files_in_the_manifest_are_kept(tmp_path, artifacts):
    wd = tmp_path / "w"
    t = _transport(wd)
    sync(t, str(wd), {"models/m.gguf": artifacts["models/m.gguf"]}, hash_cache=tmp_path / "h.json")
    sync(t, str(wd), {"lib/libggml.so": artifacts["lib/libggml.so"]}, hash_cache=tmp_path / "h.json")
    assert set(_manifest(wd)) == {"models/m.gguf", "lib/libggml.so"}


def test_corrupt_manifest_means_push_everything(tmp_path, artifacts):
    wd = tmp_path / "w"
    t = _transport(wd)
    sync(t, str(wd), artifacts, hash_cache=tmp_path / "h.json")
    (wd / MANIFEST_NAME).write_text("{not json")
    res = sync(t, str(wd), artifacts, hash_cache=tmp_path / "h.json")
    assert sorted(res.pushed_files) == sorted(artifacts)
    assert set(_manifest(wd)) == set(artifacts)


class _SmallDevice(LocalTransport):
    """A device with 2 MiB free (simulated: free_bytes is the only thing faked)."""

    def free_bytes(self, remote_dir: str) -> int:
        return 2 << 20


def test_full_device_is_reported_before_pushing(tmp_path, artifacts):
    wd = tmp_path / "w"
    t = _transport(wd, _SmallDevice)
    with pytest.raises(DeviceFullError, match=r"too full: 3 files need 2\.5 MiB .* only 2\.0 MiB free") as e:
        sync(t, str(wd), artifacts, hash_cache=tmp_path / "h.json")
    assert "nothing was pushed" in str(e.value)
    assert not (wd / MANIFEST_NAME).exists()
    assert [p for p in wd.rglob("*") if p.is_file()] == []


def test_space_check_counts_replaced_files(tmp_path, artifacts):
    # The device already holds an old 1.5 MB model; replacing it needs room for the new copy beside the old one.
    wd = tmp_path / "w"
    sync(_transport(wd), str(wd), artifacts, hash_cache=tmp_path / "h.json")
    artifacts["models/m.gguf"].write_bytes(os.urandom(1_500_000))
    with pytest.raises(DeviceFullError):
        sync(_transport(wd, _SmallDevice), str(wd), artifacts, hash_cache=tmp_path / "h.json")
    artifacts["models/m.gguf"].write_bytes(os.urandom(1000))  # a small replacement fits
    res = sync(_transport(wd, _SmallDevice), str(wd), artifacts, hash_cache=tmp_path / "h.json")
    assert res.pushed_files == ["models/m.gguf"]


class _FlakyDevice(LocalTransport):
    """Writes half of the file named ``fail_on``, then the 'link' drops."""

    fail_on = "m.gguf"

    def push(self, local, remote, progress=None):
        if Path(local).name == self.fail_on:
            data = Path(local).read_bytes()
            Path(remote).write_bytes(data[: len(data) // 2])
            raise ConnectionLostError("link dropped (simulated)")
        super().push(local, remote, progress)


def test_interrupted_push_restarts_cleanly(tmp_path, artifacts):
    wd = tmp_path / "w"
    cache = tmp_path / "h.json"
    old = tmp_path / "old.gguf"
    old.write_bytes(b"old model")
    sync(_transport(wd), str(wd), {"models/m.gguf": old}, hash_cache=cache)
    with pytest.raises(ConnectionLostError):
        sync(_transport(wd, _FlakyDevice), str(wd), artifacts, hash_cache=cache)
    # the final name still holds the complete old file, the manifest still describes it; the half file is a .part
    assert (wd / "models/m.gguf").read_bytes() == b"old model"
    assert _manifest(wd)["models/m.gguf"] == {"sha256": _sha(old), "size": len(b"old model")}
    assert (wd / "models/m.gguf.part").stat().st_size == 750_000
    res = sync(_transport(wd), str(wd), artifacts, hash_cache=cache)
    assert "models/m.gguf" in res.pushed_files
    assert _sha(wd / "models/m.gguf") == _sha(artifacts["models/m.gguf"])
    assert not (wd / "models/m.gguf.part").exists()
    assert _manifest(wd) == {rel: {"sha256": _sha(p), "size": p.stat().st_size} for rel, p in artifacts.items()}


def test_hash_cache_avoids_rehashing(tmp_path, artifacts, monkeypatch):
    calls = []
    real = syncmod._hash
    monkeypatch.setattr(syncmod, "_hash", lambda p: calls.append(Path(p).name) or real(p))
    wd = tmp_path / "w"
    cache = tmp_path / "h.json"
    sync(_transport(wd), str(wd), artifacts, hash_cache=cache)
    assert sorted(calls) == sorted(p.name for p in artifacts.values())
    calls.clear()
    sync(_transport(wd), str(wd), artifacts, hash_cache=cache)
    assert calls == []
    m = artifacts["models/m.gguf"]
    os.utime(m, ns=(m.stat().st_atime_ns, m.stat().st_mtime_ns + 10**9))  # touched: must be hashed again
    assert sha256_file(m, hash_cache=cache) == _sha(m)
    assert calls == ["m.gguf"]


def test_progress_covers_all_pushed_bytes(tmp_path, artifacts):
    wd = tmp_path / "w"
    seen = []
    sync(_transport(wd), str(wd), artifacts, progress=lambda d, n: seen.append((d, n)), hash_cache=tmp_path / "h")
    total = sum(p.stat().st_size for p in artifacts.values())
    assert seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


@pytest.mark.parametrize("rel", ["/abs/x", "../x", "a/../../x", "", "a//b", "./a", MANIFEST_NAME])
def test_bad_relative_paths_are_rejected(tmp_path, rel):
    f = tmp_path / "f"
    f.write_bytes(b"x")
    with pytest.raises(MvlmError, match="bad device-relative path"):
        sync(_transport(tmp_path / "w"), str(tmp_path / "w"), {rel: f}, hash_cache=tmp_path / "h")


def test_missing_local_file(tmp_path):
    with pytest.raises(MvlmError, match="does not exist"):
        sync(_transport(tmp_path / "w"), str(tmp_path / "w"), {"models/x.gguf": tmp_path / "nope"})
