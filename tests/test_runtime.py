"""The runtime builder: CMake invocations per target, the patch set, the cache, and the real host build."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mvlm_core import runtime as rt
from mvlm_core.errors import MvlmError

SRC = rt.Source(Path("/nonexistent"), "test-source", "abc1234", "test source")


def _arg(args: list[str], name: str) -> str | None:
    vals = [a.split("=", 1)[1] for a in args if a.startswith(f"-D{name}=")]
    return vals[-1] if vals else None


def test_host_args_shared_native_and_rpath():
    args, note = rt.cmake_args(rt.BuildOptions("host"), SRC)
    assert _arg(args, "BUILD_SHARED_LIBS") == "ON"  # the Python bindings load these libraries
    assert _arg(args, "GGML_NATIVE") == "ON"
    assert _arg(args, "CMAKE_INSTALL_RPATH") == "$ORIGIN/../lib"
    assert _arg(args, "LLAMA_BUILD_COMMIT") == "abc1234"
    assert _arg(args, "LLAMA_USE_PREBUILT_UI") == "OFF"  # would download at build time
    assert "host" in note


def test_android_with_ndk_uses_its_toolchain_file(tmp_path):
    ndk = tmp_path / "ndk"
    (ndk / "build" / "cmake").mkdir(parents=True)
    (ndk / "build" / "cmake" / "android.toolchain.cmake").write_text("")
    args, note = rt.cmake_args(rt.BuildOptions("android-arm64", ndk=ndk), SRC)
    assert _arg(args, "CMAKE_TOOLCHAIN_FILE") == f"{ndk}/build/cmake/android.toolchain.cmake"
    assert _arg(args, "ANDROID_ABI") == "arm64-v8a"
    assert _arg(args, "ANDROID_PLATFORM") == "android-28"
    assert _arg(args, "BUILD_SHARED_LIBS") == "OFF"  # static: no LD_LIBRARY_PATH games on the phone
    assert _arg(args, "GGML_OPENMP") == "OFF"
    assert _arg(args, "GGML_NATIVE") == "OFF"
    assert "NDK" in note


def test_android_bad_ndk_dir_is_one_clear_line(tmp_path):
    with pytest.raises(MvlmError, match="not an Android NDK"):
        rt.cmake_args(rt.BuildOptions("android-arm64", ndk=tmp_path), SRC)


def test_android_without_ndk_or_cross_gcc_says_how(monkeypatch):
    for v in ("ANDROID_NDK_HOME", "ANDROID_NDK_ROOT", "ANDROID_NDK"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(rt.shutil, "which", lambda name: None)
    with pytest.raises(MvlmError) as e:
        rt.cmake_args(rt.BuildOptions("android-arm64"), SRC)
    msg = str(e.value)
    assert "--ndk" in msg and "gcc-aarch64-linux-gnu" in msg and "\n" not in msg


def test_android_without_ndk_falls_back_to_debian_cross_gcc(monkeypatch):
    for v in ("ANDROID_NDK_HOME", "ANDROID_NDK_ROOT", "ANDROID_NDK"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(rt.shutil, "which", lambda name: f"/usr/bin/{name}")
    args, note = rt.cmake_args(rt.BuildOptions("android-arm64"), SRC)
    assert _arg(args, "CMAKE_C_COMPILER") == "/usr/bin/aarch64-linux-gnu-gcc"
    assert _arg(args, "CMAKE_EXE_LINKER_FLAGS") == "-static"
    assert "Debian cross toolchain" in note


def test_orin_is_cuda_sm87():
    args, note = rt.cmake_args(rt.BuildOptions("orin"), SRC)
    assert _arg(args, "GGML_CUDA") == "ON"
    assert _arg(args, "CMAKE_CUDA_ARCHITECTURES") == "87"
    assert "native" in note


def test_orin_refuses_local_build_without_toolchain_on_x86(monkeypatch, tmp_path):
    monkeypatch.setenv("MVLM_CACHE", str(tmp_path))
    monkeypatch.setattr(rt.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(rt, "pinned_source", lambda log=None: SRC)
    with pytest.raises(MvlmError, match="--device orin"):
        rt.build(rt.BuildOptions("orin"))


def test_unknown_target():
    with pytest.raises(MvlmError, match="unknown target"):
        rt.cmake_args(rt.BuildOptions("riscv"), SRC)


def test_key_changes_with_every_input():
    p = rt.project_patches()
    opts = rt.BuildOptions("host")
    args, _ = rt.cmake_args(opts, SRC)
    k = rt.build_key(SRC, p, opts, args)
    other_src = rt.Source(SRC.path, "other", SRC.commit, "")
    assert rt.build_key(other_src, p, opts, args) != k
    assert rt.build_key(SRC, [], opts, args) != k
    assert rt.build_key(SRC, p, opts, [*args, "-DX=1"]) != k
    assert rt.build_key(SRC, p, opts, args) == k


# --- patches: applied, already present, or a clear error -------------------------------------------------------
LLAVA_SNIPPET = """    ggml_tensor * inp = build_inp();

    // concat class_embeddings and patch_embeddings
    if (model.class_embedding) {
        inp = ggml_concat(ctx0, {a}, {b}, 1);
    }

    ggml_tensor * positions = ggml_new_tensor_1d(ctx0, GGML_TYPE_I32, n_pos);
"""


def _tree(tmp_path: Path, a: str, b: str) -> Path:
    d = tmp_path / "src"
    f = d / "tools" / "mtmd" / "models" / "llava.cpp"
    f.parent.mkdir(parents=True)
    body = LLAVA_SNIPPET.replace("{a}", a).replace("{b}", b)
    f.write_text("#include \"models.h\"\n" * 30 + body + "// end\n" * 5)
    return d


def _cls_patch() -> list[rt.Patch]:
    return [p for p in rt.project_patches() if p.name == "0001-clip-cls-first"]


def test_cls_patch_applies_to_the_defective_source(tmp_path):
    d = _tree(tmp_path, "inp", "model.class_embedding")
    status = rt.apply_patches(d, _cls_patch())
    assert [s["status"] for s in status] == ["applied"]
    assert "ggml_concat(ctx0, model.class_embedding, inp, 1)" in (d / "tools/mtmd/models/llava.cpp").read_text()


def test_cls_patch_already_in_source_is_skipped(tmp_path):
    d = _tree(tmp_path, "model.class_embedding", "inp")
    before = (d / "tools/mtmd/models/llava.cpp").read_text()
    status = rt.apply_patches(d, _cls_patch())
    assert [s["status"] for s in status] == ["already in source"]
    assert (d / "tools/mtmd/models/llava.cpp").read_text() == before


def test_patch_that_does_not_apply_names_itself(tmp_path):
    d = _tree(tmp_path, "something_else", "entirely")
    with pytest.raises(MvlmError, match="0001-clip-cls-first does not apply"):
        rt.apply_patches(d, _cls_patch())


def test_every_patch_has_a_header_explaining_it():
    """Each patch says what it changes and why, and where upstream stands (docs/runtime.md lists them too)."""
    names = [p.name for p in rt.project_patches()]
    assert names[0] == "0001-clip-cls-first" and names == sorted(names)
    docs = (Path(__file__).resolve().parents[1] / "docs" / "runtime.md").read_text()
    for p in rt.project_patches():
        head = p.path.read_text().split("\n--- ", 1)[0]
        assert head.startswith(f"mvlm patch {p.name[:4]}"), p.name
        assert "Upstream:" in head and len(head.splitlines()) >= 3, p.name
        assert p.name in docs, f"{p.name} is not described in docs/runtime.md"


def test_find_without_a_build_tells_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MVLM_CACHE", str(tmp_path))
    with pytest.raises(MvlmError, match="mvlm runtime build --target host"):
        rt.find("host")


def test_user_source_must_be_llama_cpp(tmp_path):
    with pytest.raises(MvlmError, match="not a llama.cpp source tree"):
        rt.user_source(tmp_path)


# --- the real build (slow: the first time compiles llama.cpp) ------------------------------------------------------
@pytest.mark.slow
def test_host_runtime_is_built_patched_and_runs(host_runtime):
    man = json.loads((host_runtime / "manifest.json").read_text())
    assert man["target"] == "host" and man["commit"] == rt.LLAMA_CPP_COMMIT
    assert [p["name"] for p in man["patches"]] == [p.name for p in rt.project_patches()]
    assert all(p["status"] == "applied" for p in man["patches"])  # the pinned source has the defect, lacks the rest
    for b in rt.BINARIES:
        assert (host_runtime / "bin" / b).is_file()
    assert (host_runtime / "lib" / "libllama.so").exists() and (host_runtime / "lib" / "libmtmd.so").exists()
    r = subprocess.run([host_runtime / "bin" / "llama-mtmd-cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--mmproj" in r.stdout + r.stderr
    # the patched line is what was compiled
    src = host_runtime.parent / "src" / "tools" / "mtmd" / "models" / "llava.cpp"
    assert "ggml_concat(ctx0, model.class_embedding, inp, 1)" in src.read_text()


@pytest.mark.slow
def test_second_build_is_cached_and_fast(host_runtime):
    env = {**os.environ}
    mvlm = [sys.executable, "-m", "mvlm"]
    t0 = time.monotonic()
    r = subprocess.run([*mvlm, "runtime", "build", "--target", "host"], capture_output=True, text=True, env=env, timeout=120)
    dt = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert "cached" in r.stderr
    assert dt < 2.0, f"cached build took {dt:.2f} s"
    p = subprocess.run([*mvlm, "runtime", "path", "--target", "host"], capture_output=True, text=True, timeout=60)
    assert Path(p.stdout.strip()) == host_runtime


@pytest.mark.slow
def test_bindings_load_the_patched_libraries(host_runtime):
    # a fresh interpreter: use_runtime() then import llama_cpp must map our libllama.so
    code = (
        "from mvlm_core.runtime import use_runtime; use_runtime('host'); import llama_cpp, llama_cpp.mtmd_cpp;"
        "print(open('/proc/self/maps').read())"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert str(host_runtime / "lib" / "libllama.so") in r.stdout
    assert str(host_runtime / "lib" / "libmtmd.so") in r.stdout


def test_host_build_turns_amx_off_where_the_cpu_advertises_it(monkeypatch):
    args, note = rt.cmake_args(rt.BuildOptions("host"), SRC)
    advertised = "amx_tile" in Path("/proc/cpuinfo").read_text() and platform.machine() == "x86_64"
    assert (_arg(args, "GGML_AMX_INT8") == "OFF") == advertised
    assert ("-mno-amx-int8" in (_arg(args, "CMAKE_CXX_FLAGS") or "")) == advertised
    assert ("AMX off" in note) == advertised
    monkeypatch.setattr(rt, "host_isa_args", lambda: list(rt.AMX_OFF))
    assert rt.build_key(SRC, [], rt.BuildOptions("host"), rt.cmake_args(rt.BuildOptions("host"), SRC)[0]) != \
        rt.build_key(SRC, [], rt.BuildOptions("host"), [a for a in args if a not in rt.AMX_OFF])
