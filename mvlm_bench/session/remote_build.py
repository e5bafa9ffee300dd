"""Build the runtime natively on a device (the Jetson Orin's CUDA build), over the device's transport.

The patched source is prepared here exactly as for a local build (same cache key), packed, pushed with the
content-addressed sync (a second attempt pushes nothing), configured and built on the device with the target's CMake
arguments, and the binaries are pulled back into the local cache. From then on the device's runtime is an ordinary
cached runtime: ``mvlm bench --device orin`` pushes it like any other (its hashes match what is already there).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import tarfile
import time
from pathlib import Path

from mvlm_core import runtime as rtmod
from mvlm_core.atomic import open_fresh, private_dir, temporary_for
from mvlm_core.errors import MvlmError

REMOTE_BUILD_TIMEOUT_S = 3 * 3600


def remote_script(src_tar: str, builddir: str, args: list[str], jobs: int | None) -> str:
    """The POSIX sh script run on the device (every path and argument quoted)."""
    q = shlex.quote
    src = f"{builddir}/src"
    parts = [
        "set -e",
        f"cd {q(builddir)}",
        f"rm -rf {q(src)} && mkdir -p {q(src)}",
        f"tar -xzf {q(src_tar)} -C {q(src)}",
        "cmake -S " + q(src) + " -B " + q(f"{builddir}/build") + " " + " ".join(q(a) for a in args),
        "cmake --build " + q(f"{builddir}/build") + " -j " + (str(int(jobs)) if jobs else '"$(nproc)"')
        + " --target " + " ".join(q(b) for b in rtmod.BINARIES),
    ]
    return "\n".join(parts)


def build_on_device(device: str, target: str, llama_cpp: Path | None = None, jobs: int | None = None,
                    console=None) -> tuple[Path, dict]:
    from mvlm_bench.device.profiles import load_profile
    from mvlm_bench.device.sync import sync
    from mvlm_bench.device.transports import make_transport

    def log(msg: str) -> None:
        if console is not None:
            console.print(f"[dim]{msg}[/]")

    profile = load_profile(device)
    if profile.probe_target:
        # an ad hoc device (ssh://...) names no target: the one asked for must fit what the device is
        from mvlm_bench.device.targets import targets_for

        with make_transport(profile) as t:
            t.check()
            info = t.probe()
        fits, _ = targets_for(info)
        if target not in fits:
            raise MvlmError(f"device {profile.name} is {info.describe()}: a {target} runtime does not run there"
                            + (f"; targets that do: {', '.join(fits)}" if fits else ""))
        profile = dataclasses.replace(profile, target=target)
    if profile.target != target:
        raise MvlmError(f"device {profile.name} runs target {profile.target!r}, not {target!r}: "
                        f"use --target {profile.target} or another device")
    source = rtmod.user_source(llama_cpp) if llama_cpp else rtmod.pinned_source(log)
    patches = rtmod.project_patches()
    opts = rtmod.BuildOptions(target=target, jobs=jobs)
    args, note = rtmod.cmake_args(opts, source)
    key = rtmod.build_key(source, patches, opts, args)
    bdir = rtmod.cache_root() / "runtime" / f"{target}-{key[:16]}"
    inst = bdir / "install"
    if (inst / "manifest.json").is_file():
        return inst, json.loads((inst / "manifest.json").read_text())
    t0 = time.monotonic()
    applied = rtmod.prepare_source(bdir, source, patches, log)
    tarball = bdir / "src.tar.gz"
    if not tarball.is_file():
        tmp = temporary_for(tarball)
        with tarfile.open(tmp, "w:gz", compresslevel=3) as tf:
            tf.add(bdir / "src", arcname=".")
        tmp.replace(tarball)
    transport = make_transport(profile)
    try:
        transport.check()
        rel = f"build-{key[:16]}"
        log(f"pushing the patched source to {profile.name}")
        sync(transport, transport.workdir, {f"{rel}/src.tar.gz": tarball})
        remote = f"{transport.workdir.rstrip('/')}/{rel}"
        log(f"building on {profile.name} ({note}); this takes a while on the device")
        r = transport.run(["sh", "-c", remote_script(f"{remote}/src.tar.gz", remote, args, jobs)],
                          timeout=REMOTE_BUILD_TIMEOUT_S)
        with open_fresh(bdir / "build.log", "w") as f:
            f.write(r.output)
        if not r.ok:
            raise MvlmError(f"the build on {profile.name} failed (log: {bdir / 'build.log'})", detail=r.tail(25))
        tmpdir = private_dir(inst)
        tmpdir.chmod(0o755)
        (tmpdir / "bin").mkdir()
        for b in rtmod.BINARIES:
            transport.pull(f"{remote}/build/bin/{b}", tmpdir / "bin" / b)
            (tmpdir / "bin" / b).chmod(0o755)
    finally:
        transport.close()
    manifest = {
        "target": target, "key": key, "source": source.ident, "source_description": source.description,
        "commit": source.commit, "patches": applied, "cmake_args": args, "toolchain": note,
        "binaries": list(rtmod.BINARIES), "libraries": [], "built_on": profile.name,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "build_seconds": round(time.monotonic() - t0, 1),
    }
    (tmpdir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    tmpdir.rename(inst)
    rtmod.write_latest(target, rtmod.Runtime(inst, manifest))
    return inst, manifest
