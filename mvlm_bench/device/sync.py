"""Content-addressed artifact sync: push runtime binaries, GGUFs and images to a device work dir, only what changed.

The device keeps a manifest, ``<workdir>/.mvlm-manifest.json``: ``{"version": 1, "files": {rel: {"sha256", "size"}}}``.
A file is skipped when the manifest has its sha256 and size, the device file still exists with that size (someone
may have wiped the dir but not the manifest) and -- checked on every sync, by the device itself (``sha256sum``, in
coreutils, busybox and Android's toybox; ``shasum -a 256`` on macOS) -- its content still has that sha256 (a copy
corrupted or edited in place at the same size is pushed again, and ``SyncResult.repaired`` says so). A device without
either tool falls back to the size check, and ``SyncResult.notes`` says that too. Everything else is pushed. So a
second sync with nothing changed pushes 0 bytes, and says so.

Each push goes to ``<rel>.part`` and is renamed onto ``<rel>`` on the device; the manifest entry is written only after
the rename. An interrupted push therefore leaves at worst a ``.part`` (removed and redone by the next sync) and never a
half file under the final name, nor a manifest entry that lies. Free space is checked *before* anything is pushed
(peak usage: files are replaced one at a time, each old copy freed only after its new copy is complete). Files under
``bin/`` are made executable.

Hashing multi-GB GGUFs each run would cost more than the push it avoids, so local sha256s are cached in
``<cache>/file-hashes.json`` (``$MVLM_CACHE`` or ``~/.cache/mvlm``) keyed by (absolute path, size, mtime_ns).

Public API (the benchmark runner builds on it; keep stable):

- ``sync(transport, workdir, files, progress=None, *, hash_cache=None, verify=True) -> SyncResult``: ``files`` maps
  device-relative path (``bin/llama-completion``, ``models/x.gguf``) to a local file; ``progress(done_bytes,
  total_bytes)`` covers all bytes this sync pushes; ``verify=False`` skips the device-side sha256 check.
- ``SyncResult(pushed_bytes, pushed_files, skipped_files, manifest, workdir)``; ``repaired`` (files whose device copy
  no longer matched its sha256 and was pushed again), ``notes`` (what the caller should tell the user);
  ``remote_path(rel)``, ``summary()``.
- ``sha256_file(path, hash_cache=None) -> str``: the cached hash, for report records.
- ``DeviceFullError`` (an ``MvlmError``): the device cannot hold what must be pushed.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mvlm_bench.device.transports.base import Transport
from mvlm_core.errors import MvlmError

MANIFEST_NAME = ".mvlm-manifest.json"
PART_SUFFIX = ".part"
# Room left on the device beyond the files themselves (manifest rewrites, the tools' own small outputs).
RESERVE_BYTES = 1 << 20
_HASH_CACHE_MAX = 2000


class DeviceFullError(MvlmError):
    """Not enough free space on the device for the files that must be pushed."""

    exit_code = 28


@dataclass
class SyncResult:
    pushed_bytes: int
    pushed_files: list[str]
    skipped_files: list[str]
    manifest: dict[str, dict[str, Any]]  # rel -> {"sha256": ..., "size": ...} for every file the device holds
    workdir: str = ""  # the work dir as given to sync
    remote_paths: dict[str, str] = field(default_factory=dict)  # rel -> device path, for the files of this sync
    repaired: list[str] = field(default_factory=list)  # device copies whose sha256 no longer matched: pushed again
    notes: list[str] = field(default_factory=list)  # one line each, for the user (repairs, a missing sha256sum)

    def remote_path(self, rel: str) -> str:
        return posixpath.join(self.workdir, rel)

    def summary(self) -> str:
        if not self.pushed_files:
            return f"pushed 0 bytes: all {len(self.skipped_files)} files already on the device"
        return (
            f"pushed {_human(self.pushed_bytes)} ({len(self.pushed_files)} files), "
            f"{len(self.skipped_files)} already on the device"
        )


# --------------------------------------------------------------------------------------------------- hashing


def default_hash_cache() -> Path:
    from mvlm_core.runtime import cache_root

    return cache_root() / "file-hashes.json"


class _HashCache:
    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, list] = {}
        self.dirty = False
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("version") == 1 and isinstance(data.get("entries"), dict):
                self.entries = data["entries"]
        except (OSError, ValueError):
            pass  # no cache or a damaged one: hash again

    def sha256(self, path: Path) -> tuple[str, int]:
        p = Path(path).resolve()
        st = p.stat()
        key = str(p)
        hit = self.entries.get(key)
        if isinstance(hit, list) and len(hit) == 3 and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2], st.st_size
        digest = _hash(p)
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        self.dirty = True
        return digest, st.st_size

    def save(self) -> None:
        if not self.dirty:
            return
        if len(self.entries) > _HASH_CACHE_MAX:
            self.entries = {k: v for k, v in self.entries.items() if os.path.exists(k)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": 1, "entries": self.entries}, f)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a cache that cannot be written only costs time
        self.dirty = False


def _hash(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path, hash_cache: Path | None = None) -> str:
    """sha256 of a local file, served from the (path, size, mtime) cache when it is current."""
    cache = _HashCache(hash_cache or default_hash_cache())
    digest, _ = cache.sha256(Path(path))
    cache.save()
    return digest


# --------------------------------------------------------------------------------------------------- sync


def _check_rel(rel: str) -> None:
    bad = (
        not rel
        or rel.startswith("/")
        or "\0" in rel
        or "\n" in rel
        or posixpath.normpath(rel) != rel
        or rel.split("/")[0] in (".", "..")
        or rel == MANIFEST_NAME
    )
    if bad:
        raise MvlmError(f"bad device-relative path {rel!r}: use a plain relative path such as models/x.gguf")


def read_manifest(transport: Transport, workdir: str) -> dict[str, dict[str, Any]]:
    """The device's manifest (rel -> {sha256, size}); empty when absent or unreadable (everything is pushed again)."""
    text = transport.read_text(posixpath.join(workdir, MANIFEST_NAME))
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        return {}
    return {
        k: v
        for k, v in files.items()
        if isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("size"), int)
    }


def _write_manifest(transport: Transport, workdir: str, manifest: dict[str, dict[str, Any]]) -> None:
    text = json.dumps({"version": 1, "files": dict(sorted(manifest.items()))}, indent=1) + "\n"
    transport.write_text(posixpath.join(workdir, MANIFEST_NAME), text)


def sync(
    transport: Transport,
    workdir: str,
    files: dict[str, Path],
    progress: Callable[[int, int], None] | None = None,
    *,
    hash_cache: Path | None = None,
    verify: bool = True,
) -> SyncResult:
    """Make ``workdir/rel`` hold the content of each ``files[rel]`` on the device, pushing only what differs."""
    for rel in files:
        _check_rel(rel)
    for rel, local in files.items():
        if not Path(local).is_file():
            raise MvlmError(f"{local} does not exist (needed on the device as {rel})")
    cache = _HashCache(hash_cache or default_hash_cache())
    try:
        local_info = {rel: cache.sha256(Path(p)) for rel, p in files.items()}
    finally:
        cache.save()
    transport.mkdir(workdir)
    manifest = read_manifest(transport, workdir)
    remote = {rel: posixpath.join(workdir, rel) for rel in files}
    sizes = transport.file_sizes([remote[rel] for rel in files])
    skipped = [rel for rel, (digest, size) in local_info.items()
               if (e := manifest.get(rel)) and e["sha256"] == digest and e["size"] == size and sizes[remote[rel]] == size]
    to_push = [rel for rel in local_info if rel not in skipped]
    repaired, notes = _verify_copies(transport, skipped, local_info, remote, manifest) if verify and skipped else ([], [])
    to_push += repaired
    if to_push:
        for rel in to_push:  # leftovers of an interrupted push take space and are never resumed blindly
            transport.remove(remote[rel] + PART_SUFFIX)
        _check_space(transport, workdir, to_push, local_info, sizes, remote)
    pushed_bytes = _push(transport, workdir, files, to_push, local_info, remote, manifest, progress)
    if progress and not to_push:
        progress(0, 0)
    return SyncResult(pushed_bytes, to_push, skipped, manifest, workdir, remote, repaired, notes)


def _verify_copies(transport: Transport, skipped: list[str], local_info, remote, manifest) -> tuple[list[str], list[str]]:
    """The manifest says what was pushed, not what is there now: the device hashes its copies (once per sync). The
    ones that do not match are taken out of ``skipped`` and their manifest entries dropped: (repaired, notes)."""
    verify_bytes = sum(local_info[rel][1] for rel in skipped)
    device_sha = transport.sha256s([remote[rel] for rel in skipped], timeout=120.0 + verify_bytes / 20e6)
    if device_sha is None:
        return [], [f"device {transport.name} has no sha256sum/shasum: its copies were checked by size only"]
    repaired = [rel for rel in skipped if device_sha.get(remote[rel]) != local_info[rel][0]]
    for rel in repaired:
        skipped.remove(rel)
        manifest.pop(rel, None)  # the entry described a copy that is no longer there
    notes = [f"device copy of {', '.join(repaired)} did not match its sha256 (changed or corrupted on the device): "
             "pushing it again"] if repaired else []
    return repaired, notes


def _push(transport: Transport, workdir: str, files: dict[str, Path], to_push: list[str], local_info, remote,
          manifest, progress) -> int:
    """Push each file to a ``.part`` name, then rename it into place and record it in the manifest: bytes pushed."""
    total = sum(local_info[rel][1] for rel in to_push)
    pushed_bytes = 0
    made_dirs: set[str] = {workdir}
    for rel in to_push:
        digest, size = local_info[rel]
        parent = posixpath.dirname(remote[rel])
        if parent not in made_dirs:
            transport.mkdir(parent)
            made_dirs.add(parent)
        part = remote[rel] + PART_SUFFIX
        base = pushed_bytes

        def file_progress(done: int, _total: int, base: int = base) -> None:
            if progress:
                progress(base + done, total)

        transport.push(Path(files[rel]), part, progress=file_progress)
        if rel.startswith("bin/"):
            transport.make_executable(part)
        transport.rename(part, remote[rel])
        manifest[rel] = {"sha256": digest, "size": size}
        _write_manifest(transport, workdir, manifest)
        pushed_bytes += size
    return pushed_bytes


def _check_space(
    transport: Transport,
    workdir: str,
    to_push: list[str],
    local_info: dict[str, tuple[str, int]],
    sizes: dict[str, int | None],
    remote: dict[str, str],
) -> None:
    # Files are replaced one at a time: while file i is pushed, its old copy still exists.
    running = peak = 0
    for rel in to_push:
        new = local_info[rel][1]
        old = sizes.get(remote[rel]) or 0
        peak = max(peak, running + new)
        running += new - old
    need = peak + RESERVE_BYTES
    free = transport.free_bytes(workdir)
    if free < need:
        raise DeviceFullError(
            f"device {transport.name} is too full: {len(to_push)} files need {_human(need)} in {workdir}, "
            f"only {_human(free)} free; delete old models there or point the profile's workdir at a bigger "
            "filesystem (nothing was pushed)"
        )


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
