"""The runtime builder: CMake invocations per target, the patch set, the cache, and the real host build."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mvlm_bench.device.targets import targets_for
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


def test_orin_args_need_no_local_cuda_toolkit(cuda_doubles):
    """The orin key is computed here for a build on the Jetson (remote_build): it must not ask this machine's nvcc."""
    opts = rt.BuildOptions("orin")
    args, _ = rt.cmake_args(opts, SRC)
    assert (_arg(args, "GGML_CUDA"), _arg(args, "CMAKE_CUDA_ARCHITECTURES")) == ("ON", "87")
    assert _arg(args, "CMAKE_CUDA_COMPILER") is None
    assert rt.build_key(SRC, [], opts, args)  # no nvcc on PATH, and none asked for


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


def test_host_key_is_unchanged_by_the_cuda_target():
    """Adding the cuda target must not move the host key: every cached host build would be rebuilt."""
    opts, patches = rt.BuildOptions("host"), rt.project_patches()
    args, _ = rt.cmake_args(opts, SRC)
    before = {"recipe": rt.RECIPE_VERSION, "source": SRC.ident, "patches": [(p.name, p.sha256) for p in patches],
              "target": "host", "cmake_args": args, "cpu": rt._host_cpu_id()}
    assert rt.build_key(SRC, patches, opts, args) == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()


# --- target cuda: CMake arguments, GPU detection, build key --------------------------------------------------------
# No CUDA toolkit or GPU where these tests run, so nvcc and nvidia-smi are TEST DOUBLES: small shell scripts in
# tmp_path, alone on PATH, printing what the real tools print (the narrowest seam: the builder only runs
# `nvcc --version` and `nvidia-smi --query-gpu=compute_cap --format=csv,noheader`). The build itself is checked on a
# GPU machine by scripts/gpu-check.sh.
NVCC_VERSION_OUTPUT = {
    "12.4": "nvcc: NVIDIA (R) Cuda compiler driver\nCopyright (c) 2005-2024 NVIDIA Corporation\n"
            "Built on Thu_Mar_28_02:18:24_PDT_2024\nCuda compilation tools, release 12.4, V12.4.131\n"
            "Build cuda_12.4.r12.4/compiler.34097967_0\n",
    "12.6": "nvcc: NVIDIA (R) Cuda compiler driver\nCopyright (c) 2005-2024 NVIDIA Corporation\n"
            "Built on Tue_Oct_29_23:50:19_PDT_2024\nCuda compilation tools, release 12.6, V12.6.85\n"
            "Build cuda_12.6.r12.6/compiler.35059454_0\n",
    "broken": "bash: nvcc: this is not a CUDA compiler\n",
}
NO_DRIVER = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the latest "
             "NVIDIA driver is installed and running.")


class CudaTestDoubles:
    """Writes the test-double ``nvcc`` / ``nvidia-smi`` scripts into one directory (the only one on PATH)."""

    def __init__(self, d: Path):
        self.dir = d

    def _script(self, name: str, body: str) -> Path:
        p = self.dir / name
        p.write_text("#!/bin/sh\n# TEST DOUBLE written by tests/test_runtime.py (no CUDA toolkit or GPU here)\n" + body)
        p.chmod(0o755)
        return p

    def nvcc(self, release: str = "12.4") -> Path:
        out = NVCC_VERSION_OUTPUT[release].replace("'", "")
        return self._script("nvcc", f"""if [ "$*" = "--version" ]; then printf '%s' '{out}'; exit 0; fi
echo "nvcc fatal   : No input files specified; use option --help for more information" >&2; exit 1
""")

    def nvidia_smi(self, *caps: str, fail: bool = False) -> Path:
        lines = "".join(f"{c}\\n" for c in caps)
        answer = f'echo "{NO_DRIVER}"; exit 9' if fail else f"printf '{lines}'; exit 0"
        return self._script("nvidia-smi", f"""if [ "$*" = "--query-gpu=compute_cap --format=csv,noheader" ]; then {answer}; fi
echo "test double: unexpected arguments: $*" >&2; exit 2
""")


@pytest.fixture
def cuda_doubles(tmp_path, monkeypatch) -> CudaTestDoubles:
    d = tmp_path / "test-doubles"
    d.mkdir()
    for v in ("CUDACXX", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("PATH", str(d))
    monkeypatch.setattr(rt, "CUDA_DEFAULT_NVCC", ())  # a real toolkit in /usr/local/cuda must not be found
    return CudaTestDoubles(d)


def test_cuda_args_are_host_shared_libraries_plus_cuda_for_the_named_arch(cuda_doubles):
    nvcc = cuda_doubles.nvcc("12.4")
    args, note = rt.cmake_args(rt.BuildOptions("cuda", cuda_arch="90"), SRC)
    assert _arg(args, "GGML_CUDA") == "ON"
    assert _arg(args, "CMAKE_CUDA_ARCHITECTURES") == "90"  # that GPU only, not llama.cpp's list of ~8
    assert _arg(args, "CMAKE_CUDA_COMPILER") == str(nvcc.resolve())  # the nvcc whose release is in the key
    assert _arg(args, "BUILD_SHARED_LIBS") == "ON"  # the Python bindings (verify --runtime cuda) load them
    assert _arg(args, "CMAKE_INSTALL_RPATH") == "$ORIGIN/../lib"
    host_args, _ = rt.cmake_args(rt.BuildOptions("host"), SRC)
    assert args[:len(host_args)] == host_args  # the host recipe, plus CUDA
    assert "CUDA 12.4" in note and "sm_90" in note


@pytest.mark.parametrize(("given", "cmake"), [("90", "90"), ("9.0", "90"), ("8.9", "89"), ("sm_86", "86"),
                                              ("80;90", "80;90"), ("8.0, 9.0", "80;90"), ("90a", "90a"),
                                              ("12.0", "120"), ("86-real", "86-real"), ("90,90", "90")])
def test_cuda_arch_forms(given, cmake):
    assert rt.normalize_cuda_arch(given) == cmake


@pytest.mark.parametrize("bad", ["hopper", "9", "1000", "", " ; ", "90;sm90x"])
def test_bad_cuda_arch_is_one_line(bad):
    with pytest.raises(MvlmError) as e:
        rt.normalize_cuda_arch(bad)
    assert "--cuda-arch" in str(e.value) and "90" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(("caps", "cmake"), [(("8.9",), "89"), (("9.0", "9.0"), "90"), (("8.0", "9.0"), "80;90")])
def test_cuda_arch_is_detected_with_nvidia_smi(cuda_doubles, caps, cmake):
    cuda_doubles.nvcc()
    cuda_doubles.nvidia_smi(*caps)
    args, note = rt.cmake_args(rt.BuildOptions("cuda"), SRC)
    assert _arg(args, "CMAKE_CUDA_ARCHITECTURES") == cmake


def test_cuda_without_arch_or_gpu_says_pass_cuda_arch(cuda_doubles):
    cuda_doubles.nvcc()
    with pytest.raises(MvlmError) as e:  # no nvidia-smi at all
        rt.cmake_args(rt.BuildOptions("cuda"), SRC)
    assert "pass --cuda-arch" in str(e.value) and "\n" not in str(e.value)
    cuda_doubles.nvidia_smi(fail=True)  # a driver that does not answer
    with pytest.raises(MvlmError) as e:
        rt.cmake_args(rt.BuildOptions("cuda"), SRC)
    msg = str(e.value)
    assert "couldn't communicate with the NVIDIA driver" in msg and "pass --cuda-arch" in msg and "\n" not in msg


def test_cuda_without_nvcc_says_a_cuda_toolkit_is_needed(cuda_doubles):
    cuda_doubles.nvidia_smi("9.0")
    with pytest.raises(MvlmError) as e:
        rt.cmake_args(rt.BuildOptions("cuda"), SRC)
    msg = str(e.value)
    assert "needs a CUDA toolkit" in msg and "nvcc was not found" in msg and "install" in msg and "\n" not in msg


def test_cuda_nvcc_that_is_no_cuda_compiler_is_refused(cuda_doubles):
    (cuda_doubles.dir / "nvcc").write_text(f"#!/bin/sh\n# TEST DOUBLE\necho '{NVCC_VERSION_OUTPUT['broken'].strip()}'\n")
    (cuda_doubles.dir / "nvcc").chmod(0o755)
    with pytest.raises(MvlmError, match="printed no CUDA release line"):
        rt.cmake_args(rt.BuildOptions("cuda", cuda_arch="90"), SRC)


def test_cuda_key_changes_with_the_toolkit_and_the_architecture(cuda_doubles):
    def key(arch: str | None = None) -> str:
        opts = rt.BuildOptions("cuda", cuda_arch=arch)
        args, _ = rt.cmake_args(opts, SRC)
        return rt.build_key(SRC, [], opts, args)

    cuda_doubles.nvcc("12.4")
    cuda_doubles.nvidia_smi("9.0")
    k = key("90")
    assert key("90") == k and key() == k  # detected 9.0 == named 90: the same build
    assert key("89") != k  # another card
    assert key("80;90") != k
    cuda_doubles.nvcc("12.6")  # another toolkit at the same path
    assert key("90") != k
    cuda_doubles.nvcc("12.4")
    assert key("90") == k


def test_cuda_arch_is_refused_for_other_targets():
    for t in ("host", "orin", "linux-arm64"):
        with pytest.raises(MvlmError, match="--cuda-arch is for --target cuda"):
            rt.cmake_args(rt.BuildOptions(t, cuda_arch="90"), SRC)


@pytest.mark.slow
def test_cuda_build_refusals_are_one_line_before_anything_is_fetched(tmp_path):
    """`mvlm runtime build --target cuda`: without a GPU to detect, with --cuda-arch on another target, with --device:
    one line, exit 2, and nothing written to the cache (no sdist download, no source copy)."""
    d = tmp_path / "test-doubles"
    d.mkdir()
    CudaTestDoubles(d).nvcc()
    cache = tmp_path / "cache"
    env = {**os.environ, "PATH": str(d), "CUDACXX": str(d / "nvcc"), "MVLM_CACHE": str(cache)}
    for argv, says in [
        (["--target", "cuda"], "nvidia-smi is not on PATH to detect the GPU: pass --cuda-arch"),
        (["--target", "cuda", "--cuda-arch", "hopper"], "'hopper' is not a CUDA architecture"),
        (["--target", "host", "--cuda-arch", "90"], "--cuda-arch is for --target cuda"),
        (["--target", "cuda", "--device", "orin"], "built on the machine that has the GPU"),
    ]:
        r = subprocess.run([sys.executable, "-m", "mvlm", "runtime", "build", *argv], capture_output=True, text=True,
                           env=env, timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], (argv, r.stderr)
        assert "Traceback" not in r.stderr
    assert not cache.exists() or not any(cache.rglob("*"))


def test_cuda_is_a_target_wherever_targets_are_listed(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mvlm.cli import app
    from mvlm_bench.device.profiles import KNOWN_TARGETS
    from mvlm_bench.device.transports.base import DeviceInfo, normalise_machine
    from mvlm_core.backends import BACKENDS, get_backend

    assert "cuda" in rt.TARGETS and "cuda" in KNOWN_TARGETS and "cuda" in BACKENDS
    assert "cuda (" in CliRunner().invoke(app, ["runtime", "build", "--help"], env={"COLUMNS": "300"}).output
    assert "cuda" in targets_for(DeviceInfo("Linux", normalise_machine(platform.machine())))[0]
    repo = Path(__file__).resolve().parents[1]
    for doc in ("README.md", "docs/index.md"):
        assert "host\\|cuda\\|linux-arm64" in (repo / doc).read_text(), doc
    runtime_md = (repo / "docs" / "runtime.md").read_text()
    assert "| `cuda` |" in runtime_md and "--cuda-arch" in runtime_md
    monkeypatch.setenv("MVLM_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi: find() falls back to latest-cuda.json, absent here
    with pytest.raises(MvlmError, match=r"no cuda runtime is built yet: run `mvlm runtime build --target cuda`"):
        get_backend("cuda")


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
