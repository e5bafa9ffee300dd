"""Pinned, patched llama.cpp runtimes: fetch the source, apply the project's patches, build with CMake, cache.

One llama.cpp source serves both the binaries (llama-completion, llama-mtmd-cli, llama-bench, llama-quantize,
llama-perplexity, llama-server) and the Python bindings: by default the llama.cpp vendored in the sdist of the pinned
llama-cpp-python, so the ctypes signatures of the installed bindings match the libraries we build
(``use_runtime`` points the bindings at them through ``LLAMA_CPP_LIB_PATH`` / ``MTMD_CPP_LIB``).

Cache layout (root: ``$MVLM_CACHE`` or ``$XDG_CACHE_HOME/mvlm`` or ``~/.cache/mvlm``)::

    sdist/llama_cpp_python-<ver>.tar.gz        the registry's sdist, sha256-checked
    src/llama-cpp-python-<ver>/                its vendor/llama.cpp, extracted once (stamp: .mvlm-source.json)
    runtime/<target>-<key16>/                  one build: key = sha256(source id, patches, target, options;
                                               cuda: + nvcc's release line, the architectures are an option)
        src/      patched copy of the source      build/   CMake build dir      build.log
        install/  bin/ + lib/ + manifest.json     (renamed into place only when the build is complete)
    runtime/latest-<target>.json               the last build of a target (for ``mvlm runtime path``)

A second ``build`` with nothing changed finds ``install/manifest.json`` and returns at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mvlm_core import cpu_variants
from mvlm_core.atomic import open_fresh, private_dir, read_small, temporary_for
from mvlm_core.cache import cache_root
from mvlm_core.errors import MvlmError

# --- the pin -----------------------------------------------------------------------------------------------------
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e570"  # upstream ggml-org/llama.cpp commit vendored by that sdist (its CHANGELOG says so)
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

TARGETS = ("host", "cuda", "linux-arm64", "android-arm64", "orin")
# the builds `mvlm verify --runtime` can test (mvlm_core.backends.BACKENDS; named here so that the CLI need not import
# the backends, and numpy with them, to start); host-bin: the host build's mvlm-dump instead of its libraries
VERIFY_RUNTIMES = ("host", "host-bin", "linux-arm64", "android-arm64", "cuda")
# mvlm-dump comes from patch 0002: raw token ids / logits / image embeddings, so `mvlm verify` runs on any build
# llama-server: how most people deploy a GGUF (`mvlm serve`); its web UI is left out (no download at build time)
BINARIES = ("llama-completion", "llama-mtmd-cli", "llama-bench", "llama-quantize", "llama-perplexity", "llama-server",
            "mvlm-dump")
# Bump when the build recipe changes in a way that changes the output (it is part of every cache key).
RECIPE_VERSION = 1

PATCH_DIR = Path(__file__).parent / "patches"
# included at the end of KleidiAI's project(): works around GCC 12's internal compiler error on KleidiAI's C files
KLEIDIAI_GCC_FIX = Path(__file__).parent / "cmake" / "kleidiai-gcc.cmake"
# Parts of the source tree the build never reads; not copied into the per-build patched source.
_SKIP_DIRS = {".git", "models", "docs", "media", "benches", ".devops", "examples", "gguf-py", "pocs"}




# --- sources ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Source:
    """A llama.cpp source tree and a string that identifies its content (part of the cache key)."""

    path: Path
    ident: str
    commit: str  # upstream commit, short, or "unknown"
    description: str


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """An exclusive lock, so two processes (make + pytest) never build or extract the same thing at once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open_fresh(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def pinned_source(log: Callable[[str], None] = lambda s: None) -> Source:
    """The llama.cpp vendored in the pinned llama-cpp-python sdist, fetched with pip once and extracted once."""
    root = cache_root()
    src = root / "src" / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"
    stamp = src / ".mvlm-source.json"
    ident = f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sha256:{SDIST_SHA256}"
    desc = f"llama.cpp {LLAMA_CPP_COMMIT} (vendored by llama-cpp-python {LLAMA_CPP_PYTHON_VERSION})"
    if stamp.is_file():
        return Source(src, ident, LLAMA_CPP_COMMIT, desc)
    with locked(root / "src" / ".lock"):
        if stamp.is_file():
            return Source(src, ident, LLAMA_CPP_COMMIT, desc)
        tarball = _fetch_sdist(log)
        log(f"extracting vendor/llama.cpp from {tarball.name}")
        tmp = private_dir(src)
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        with tarfile.open(tarball) as tf:
            members = []
            for m in tf.getmembers():
                if not m.name.startswith(prefix) or not (m.isfile() or m.isdir() or m.issym()):
                    continue
                rel = m.name[len(prefix):]
                if not rel or rel.split("/", 1)[0] in _SKIP_DIRS:
                    continue
                m.name = rel
                members.append(m)
            tf.extractall(tmp, members=members, filter="data")
        if not (tmp / "CMakeLists.txt").is_file():
            raise MvlmError(f"{tarball} has no vendor/llama.cpp: is it the llama-cpp-python sdist? delete it and retry")
        (tmp / ".mvlm-source.json").write_text(json.dumps({"ident": ident, "commit": LLAMA_CPP_COMMIT}))
        tmp.chmod(0o755)
        shutil.rmtree(src, ignore_errors=True)
        tmp.rename(src)
    return Source(src, ident, LLAMA_CPP_COMMIT, desc)


def _fetch_sdist(log: Callable[[str], None]) -> Path:
    d = cache_root() / "sdist"
    tarball = d / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if tarball.is_file() and sha256_file(tarball) == SDIST_SHA256:
        return tarball
    d.mkdir(parents=True, exist_ok=True)
    tmpdir = private_dir(d / "download")
    log(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist from the package registry")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "-q", "-d", str(tmpdir), f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    got = tmpdir / tarball.name
    if r.returncode != 0 or not got.is_file():
        shutil.rmtree(tmpdir, ignore_errors=True)
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise MvlmError(
            f"could not download the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist with pip "
            f"({' / '.join(tail) or 'no output'}): check network/pip config, or pass --llama-cpp DIR"
        )
    digest = sha256_file(got)
    if digest != SDIST_SHA256:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise MvlmError(f"downloaded sdist has sha256 {digest}, expected {SDIST_SHA256}: refusing to build from it")
    got.replace(tarball)
    shutil.rmtree(tmpdir, ignore_errors=True)
    return tarball


def user_source(path: Path) -> Source:
    """A user's llama.cpp checkout. Identified by git HEAD + a hash of uncommitted changes, else by file content."""
    path = path.expanduser().resolve()
    if not (path / "CMakeLists.txt").is_file() or not (path / "tools" / "mtmd").is_dir():
        raise MvlmError(f"{path} is not a llama.cpp source tree (no CMakeLists.txt or tools/mtmd): pass a checkout")
    git = shutil.which("git")
    if git and (path / ".git").exists():
        def g(*args: str) -> str:
            return subprocess.run([git, "-C", str(path), *args], capture_output=True, text=True, check=True).stdout

        try:
            head = g("rev-parse", "HEAD").strip()
            dirty = hashlib.sha256((g("diff", "HEAD") + g("status", "--porcelain")).encode()).hexdigest()[:16]
            return Source(path, f"git:{head} dirty:{dirty}", head[:7], f"llama.cpp checkout {path} @ {head[:9]}")
        except subprocess.CalledProcessError:
            pass
    h = hashlib.sha256()
    for sub in ("CMakeLists.txt", "cmake", "ggml", "src", "include", "common", "tools", "vendor"):
        p = path / sub
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else []
        for f in files:
            h.update(str(f.relative_to(path)).encode() + b"\0" + f.read_bytes() + b"\0")
    return Source(path, f"tree:{h.hexdigest()}", "unknown", f"llama.cpp tree {path}")


# --- patches ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Patch:
    name: str
    path: Path
    sha256: str
    summary: str  # first line of the patch header


def project_patches() -> list[Patch]:
    out = []
    for p in sorted(PATCH_DIR.glob("*.patch")):
        text = p.read_text()
        out.append(Patch(p.stem, p, hashlib.sha256(text.encode()).hexdigest(), text.splitlines()[0] if text else ""))
    return out


def apply_patches(srcdir: Path, patches: list[Patch]) -> list[dict]:
    """Apply each patch to ``srcdir``; one already in the source is detected (reverse applies) and skipped."""
    patch_bin = shutil.which("patch")
    if not patch_bin:
        raise MvlmError("the 'patch' program is missing: install it (apt-get install patch) and retry")
    done = []
    for p in patches:
        base = [patch_bin, "-p1", "-d", str(srcdir), "-i", str(p.path), "--batch", "--silent"]
        fwd = subprocess.run([*base, "--dry-run", "--forward"], capture_output=True, text=True)
        if fwd.returncode == 0:
            r = subprocess.run([*base, "--forward"], capture_output=True, text=True)
            if r.returncode != 0:
                raise MvlmError(f"patch {p.name} failed to apply: {(r.stdout + r.stderr).strip()[:300]}")
            done.append({"name": p.name, "sha256": p.sha256, "status": "applied"})
            continue
        rev = subprocess.run([*base, "--dry-run", "--reverse", "--force"], capture_output=True, text=True)
        if rev.returncode == 0:
            done.append({"name": p.name, "sha256": p.sha256, "status": "already in source"})
            continue
        raise MvlmError(
            f"patch {p.name} does not apply to this llama.cpp source ({(fwd.stdout + fwd.stderr).strip()[:200]}): "
            "the code it fixes has changed; check whether upstream fixed it and update mvlm_core/patches"
        )
    return done


# --- build recipes ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BuildOptions:
    target: str = "host"
    ndk: Path | None = None
    toolchain: Path | None = None  # a CMake toolchain file (cross builds, e.g. orin with a CUDA cross toolchain)
    jobs: int | None = None
    cuda_arch: str | None = None  # target cuda: CMAKE_CUDA_ARCHITECTURES ("90", "8.9", "80;90"); None: nvidia-smi's
    extra_cmake_args: tuple[str, ...] = ()
    cpu_variant: str | None = None  # mvlm_core.cpu_variants: arm64 armv8.0|dotprod|i8mm, host generic|native
    kleidiai_src: Path | None = None  # a +kleidiai variant: KleidiAI's source tree (else CMake downloads it)


def _host_cpu_id() -> str:
    """-march=native makes host builds machine-specific; the cache key carries the CPU's flags."""
    try:
        txt = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^flags\s*:(.*)$", txt, re.M) or re.search(r"^Features\s*:(.*)$", txt, re.M)
        flags = " ".join(sorted(m.group(1).split())) if m else ""
    except OSError:
        flags = ""
    return f"{platform.machine()}:{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


# AMX (Intel's tile instructions): where /proc/cpuinfo lists them, -march=native compiles ggml's AMX kernels, and on
# virtual machines that advertise AMX without fully supporting it every quantized matmul dies with SIGILL in
# tinygemm_kernel_amx (`tilezero`; seen on a Firecracker VM, q8_0/q4_1 on 1 thread: SIGILL, on 2: SIGSEGV; a small
# probe that configures tiles and yields passed there, so no probe can be trusted). mvlm builds the host runtime for
# converting, verifying and benchmarking edge models, where AMX buys nothing: host builds turn it off wherever the CPU
# advertises it (the arguments go into the build key; BuildOptions.extra_cmake_args can override them).
AMX_OFF = ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
           "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
           "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"]


def host_isa_args() -> list[str]:
    """Extra CMake arguments for a native host build on this machine (AMX off where the CPU advertises it)."""
    try:
        has_amx = "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        has_amx = False
    return list(AMX_OFF) if has_amx and platform.machine() in ("x86_64", "AMD64") else []


# --- CUDA (target "cuda": this machine's NVIDIA GPU) ---------------------------------------------------------------
# Where nvcc is looked for after $CUDACXX, PATH, $CUDA_HOME/bin and $CUDA_PATH/bin (CMake looks there too).
CUDA_DEFAULT_NVCC: tuple[Path, ...] = (Path("/usr/local/cuda/bin/nvcc"),)
CUDA_ARCH_EXAMPLES = "e.g. --cuda-arch 90 for an H100/H200, 89 for an L4 or RTX 40xx, 86 for an RTX 30xx, 80 for an A100"
_CUDA_ARCH_RE = re.compile(r"^\d{2,3}[af]?(-real|-virtual)?$")


@dataclasses.dataclass(frozen=True)
class CudaToolchain:
    """The nvcc a cuda build compiles with, its release line, and the GPU architectures it compiles for."""

    nvcc: Path
    release: str  # nvcc --version: "Cuda compilation tools, release 12.4, V12.4.131"
    architectures: str  # CMAKE_CUDA_ARCHITECTURES: "90", "80;90"

    @property
    def version(self) -> str:
        m = re.search(r"release (\d+(?:\.\d+)*)", self.release)
        return m.group(1) if m else self.release


def find_nvcc() -> Path:
    """The CUDA compiler: $CUDACXX, PATH, $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin (symlinks resolved)."""
    cands = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    cands += [str(Path(os.environ[v]) / "bin" / "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    cands += [str(p) for p in CUDA_DEFAULT_NVCC]
    for c in cands:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c).resolve()
    raise MvlmError(
        "the cuda target needs a CUDA toolkit, and nvcc was not found (PATH, $CUDACXX, $CUDA_HOME/bin, "
        "/usr/local/cuda/bin): install one (NVIDIA's cuda-toolkit packages, or apt-get install nvidia-cuda-toolkit) "
        "and put its bin/ on PATH"
    )


def cuda_release(nvcc: Path) -> str:
    """nvcc --version's release line ("Cuda compilation tools, release 12.4, V12.4.131"): part of the build key."""
    try:
        r = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60, errors="replace")
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MvlmError(f"{nvcc} --version failed ({type(e).__name__}: {e}): check the CUDA toolkit install") from None
    m = re.search(r"^.*\brelease \d+\.\d+.*$", r.stdout, re.M)
    if r.returncode != 0 or not m:
        said = " / ".join((r.stderr or r.stdout).strip().splitlines()[-2:]) or "no output"
        raise MvlmError(f"{nvcc} --version printed no CUDA release line (exit {r.returncode}: {said}): "
                        "is it a CUDA toolkit's nvcc? set CUDACXX to the toolkit's bin/nvcc")
    return m.group(0).strip()


def normalize_cuda_arch(spec: str, what: str = "--cuda-arch") -> str:
    """"90", "9.0", "sm_90", "8.9,9.0", "80;90-real" -> CMake's list ("90", "89;90", "80;90-real"); MvlmError if bad."""
    out: list[str] = []
    for part in re.split(r"[;,\s]+", spec.strip()):
        if not part:
            continue
        m = re.fullmatch(r"(\d{1,2})\.(\d)", part)  # a compute capability as nvidia-smi prints it: 8.9 -> 89
        arch = f"{m.group(1)}{m.group(2)}" if m else re.sub(r"^(sm|compute)_", "", part)
        if not _CUDA_ARCH_RE.match(arch):
            raise MvlmError(f"{what} {spec!r}: {part!r} is not a CUDA architecture; {CUDA_ARCH_EXAMPLES}")
        if arch not in out:
            out.append(arch)
    if not out:
        raise MvlmError(f"{what} is empty; {CUDA_ARCH_EXAMPLES}")
    return ";".join(out)


def detect_cuda_arch() -> str:
    """The architectures of this machine's GPUs, from ``nvidia-smi --query-gpu=compute_cap`` (8.9 -> 89)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        raise MvlmError(f"no --cuda-arch given and nvidia-smi is not on PATH to detect the GPU: pass --cuda-arch "
                        f"({CUDA_ARCH_EXAMPLES})")
    try:
        r = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True,
                           timeout=60, errors="replace")
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MvlmError(f"no --cuda-arch given and nvidia-smi failed ({type(e).__name__}): pass --cuda-arch "
                        f"({CUDA_ARCH_EXAMPLES})") from None
    caps = [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]
    if r.returncode != 0 or not caps:
        said = " / ".join((r.stderr + r.stdout).strip().splitlines()[:2]) or "no GPU listed"
        raise MvlmError(f"no --cuda-arch given and nvidia-smi found no GPU to detect it from ({said}): pass "
                        f"--cuda-arch ({CUDA_ARCH_EXAMPLES})")
    return normalize_cuda_arch(",".join(caps), what="nvidia-smi --query-gpu=compute_cap gave")


def cuda_toolchain(opts: BuildOptions) -> CudaToolchain:
    """nvcc, its release and the architectures for a cuda build; one clear MvlmError when any is missing."""
    nvcc = find_nvcc()
    release = cuda_release(nvcc)
    arch = normalize_cuda_arch(opts.cuda_arch) if opts.cuda_arch else detect_cuda_arch()
    return CudaToolchain(nvcc, release, arch)


def check_options(opts: BuildOptions) -> CudaToolchain | None:
    """What is refused before any source is fetched or copied: an unknown target, --cuda-arch on another target, and
    for cuda a missing nvcc or no GPU to detect the architecture from. Returns the cuda toolchain (cuda only)."""
    if opts.target not in TARGETS:
        raise MvlmError(f"unknown target {opts.target!r}: choose one of {', '.join(TARGETS)}")
    if opts.cuda_arch and opts.target != "cuda":
        raise MvlmError(f"--cuda-arch is for --target cuda (the {opts.target} target does not take it; orin is always "
                        "sm_87)")
    if opts.cpu_variant:
        cpu_variants.get(opts.target, opts.cpu_variant)  # one line naming the choices when it is not one
    if opts.kleidiai_src is not None:
        if not (opts.cpu_variant and cpu_variants.kleidiai_of(opts.cpu_variant)):
            raise MvlmError("--kleidiai-src is for the KleidiAI variants (--cpu-variant dotprod+kleidiai or "
                            "i8mm+kleidiai)")
        kleidiai_version(opts.kleidiai_src)  # not a KleidiAI tree: one line
    return cuda_toolchain(opts) if opts.target == "cuda" else None


def resolve_ndk(ndk: Path | None) -> Path | None:
    for cand in (ndk, os.environ.get("ANDROID_NDK_HOME"), os.environ.get("ANDROID_NDK_ROOT"), os.environ.get("ANDROID_NDK")):
        if cand:
            p = Path(cand).expanduser()
            if not (p / "build" / "cmake" / "android.toolchain.cmake").is_file():
                raise MvlmError(f"{p} is not an Android NDK (no build/cmake/android.toolchain.cmake): pass --ndk NDK_DIR")
            return p
    return None


def cmake_args(opts: BuildOptions, source: Source) -> tuple[list[str], str]:
    """The CMake configure arguments for a target, and a one-line note on the toolchain used.

    Pure function of its inputs (plus which cross compilers are installed), unit-tested for every target.
    """
    common = [
        "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_OPENSSL=OFF",
        f"-DLLAMA_BUILD_COMMIT={source.commit}",
    ]
    static = ["-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF", "-DGGML_OPENMP=OFF"]
    t = opts.target
    cuda = check_options(opts)
    variant = cpu_variants.get(t, opts.cpu_variant) if opts.cpu_variant else None
    if t in ("host", "cuda"):
        generic = variant is not None and variant.name == "generic"
        isa = list(variant.cmake) if generic else ["-DGGML_NATIVE=ON", *host_isa_args()]
        args = [*common, "-DBUILD_SHARED_LIBS=ON", *isa[:1],
                "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN/../lib", *isa[1:]]
        note = (f"host compiler ({platform.machine()}, generic x86-64: no AVX)" if generic else
                f"host compiler ({platform.machine()}, -march=native" + (", AMX off)" if AMX_OFF[0] in args else ")"))
        if cuda is not None:
            # shared libraries like host (the Python bindings load them); the GPU code for the named architectures
            # only, compiled by the nvcc whose release line is in the build key
            args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda.architectures}",
                     f"-DCMAKE_CUDA_COMPILER={cuda.nvcc}"]
            note = f"CUDA {cuda.version} ({cuda.nvcc}) for sm_{cuda.architectures.replace(';', ', sm_')}; {note}"
    elif t == "linux-arm64" or (t == "android-arm64" and resolve_ndk(opts.ndk) is None):
        if opts.toolchain:
            args = [*common, *static, f"-DCMAKE_TOOLCHAIN_FILE={opts.toolchain}"]
            note = f"toolchain file {opts.toolchain}"
        else:
            gcc, gxx = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("aarch64-linux-gnu-g++")
            if not (gcc and gxx):
                how = ("pass --ndk DIR (or set ANDROID_NDK_HOME) for the Android NDK, or " if t == "android-arm64" else "")
                raise MvlmError(
                    f"no toolchain for {t}: {how}install Debian's cross compilers "
                    "(apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)"
                )
            args = [*common, *static,
                    "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
                    f"-DCMAKE_C_COMPILER={gcc}", f"-DCMAKE_CXX_COMPILER={gxx}",
                    "-DCMAKE_EXE_LINKER_FLAGS=-static", "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16"]
            note = ("Debian cross toolchain aarch64-linux-gnu (static; runs on Android and Jetson Linux)"
                    if t == "android-arm64" else "Debian cross toolchain aarch64-linux-gnu (static)")
    elif t == "android-arm64":
        ndk = resolve_ndk(opts.ndk)
        args = [*common, *static,
                f"-DCMAKE_TOOLCHAIN_FILE={ndk}/build/cmake/android.toolchain.cmake",
                "-DANDROID_ABI=arm64-v8a", "-DANDROID_PLATFORM=android-28",
                "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16"]
        note = f"Android NDK {ndk}"
    elif t == "orin":
        args = [*common, "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF", "-DGGML_CUDA=ON",
                "-DCMAKE_CUDA_ARCHITECTURES=87", "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16"]
        if opts.toolchain:
            args.append(f"-DCMAKE_TOOLCHAIN_FILE={opts.toolchain}")
            note = f"CUDA cross build with toolchain file {opts.toolchain}"
        else:
            note = "native CUDA build (run on the Jetson itself)"
    else:
        raise MvlmError(f"unknown target {t!r}: choose one of {', '.join(TARGETS)}")
    if variant is not None and t in cpu_variants.ARM64_TARGETS and variant.name != "dotprod":
        args, note = _arm64_variant(args, note, variant, opts, source)
    return [*args, *opts.extra_cmake_args], note


def _arm64_variant(args: list[str], note: str, variant: cpu_variants.Variant, opts: BuildOptions,
                   source: Source) -> tuple[list[str], str]:
    """An arm64 recipe's arguments made for ``variant`` (its -march; KleidiAI's switch, source and GCC fix)."""
    args = [a for a in args if not a.startswith("-DGGML_CPU_ARM_ARCH=")] + list(variant.cmake)
    note += f"; CPU variant {variant.name} ({variant.cmake[0].split('=', 1)[1]})"
    if cpu_variants.kleidiai_of(variant.name):
        args.append(f"-DCMAKE_PROJECT_KleidiAI_INCLUDE={KLEIDIAI_GCC_FIX}")
        if opts.kleidiai_src is not None:
            src_dir = Path(opts.kleidiai_src).expanduser().resolve()
            have, want = kleidiai_version(src_dir), pinned_kleidiai(source)
            if want and have != want:
                raise MvlmError(f"{src_dir} is KleidiAI {have}; this llama.cpp source is made for {want}: give "
                                f"KleidiAI v{want}'s source")
            args.append(f"-DFETCHCONTENT_SOURCE_DIR_KLEIDIAI={src_dir}")
            note += f", KleidiAI {have} from {src_dir}"
        else:  # said explicitly: a tree given to an earlier configure of this build dir stays in CMake's cache
            args.append("-DFETCHCONTENT_SOURCE_DIR_KLEIDIAI=")
            note += ", KleidiAI downloaded by CMake from GitHub"
    return args, note


def variant_of(manifest: dict) -> str | None:
    """The CPU variant a build was made for (mvlm_core.cpu_variants), from its manifest; None: a target without
    variants (cuda, orin) or a build whose CMake arguments are none of mvlm's."""
    if manifest.get("cpu_variant"):
        return str(manifest["cpu_variant"])
    args = manifest.get("cmake_args") or []
    target = manifest.get("target", "")
    for v in sorted(cpu_variants.variants_for(target), key=lambda v: -len(v.cmake)):  # the most specific first
        if all(c in args for c in v.cmake):
            return v.name
    return None


def kleidiai_version(src: Path) -> str:
    """The version a KleidiAI source tree declares (its CMakeLists.txt); one line when ``src`` is not one."""
    root = Path(src).expanduser()
    if not root.is_dir():
        raise MvlmError(f"--kleidiai-src {src}: " + ("no such directory" if not root.exists() else
                                                     "not a directory") + ": give KleidiAI's source tree")
    cm = root / "CMakeLists.txt"
    try:
        text = read_small(cm, 1 << 20, "KleidiAI's CMakeLists.txt").decode("utf-8", "replace") if cm.is_file() else ""
    except (OSError, MvlmError):
        text = ""
    m = re.search(r"project\(\s*KleidiAI\b[^)]*?VERSION\s+([0-9.]+)", text, re.S | re.I)
    if not m:
        raise MvlmError(f"{src} is not a KleidiAI source tree (no project(KleidiAI VERSION ...) in CMakeLists.txt): "
                        "give the directory of KleidiAI's release source (the pinned llama.cpp uses v1.24.0)")
    return m.group(1)


def pinned_kleidiai(source: Source) -> str | None:
    """The KleidiAI version a llama.cpp source downloads (ggml-cpu's KLEIDIAI_COMMIT_TAG), None if it names none."""
    try:
        text = (source.path / "ggml" / "src" / "ggml-cpu" / "CMakeLists.txt").read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r'KLEIDIAI_COMMIT_TAG\s+"v?([0-9.]+)"', text)
    return m.group(1) if m else None


def build_key(source: Source, patches: list[Patch], opts: BuildOptions, args: list[str]) -> str:
    ident = {
        "recipe": RECIPE_VERSION,
        "source": source.ident,
        "patches": [(p.name, p.sha256) for p in patches],
        "target": opts.target,
        "cmake_args": args,
        "cpu": _host_cpu_id() if opts.target in ("host", "cuda") else "",
    }
    if opts.target == "cuda":  # a different toolkit builds anew (the architectures are in the CMake arguments)
        ident["cuda"] = _cuda_manifest(args)["release"]
    # KleidiAI's source: the version the llama.cpp source pins, downloaded or given as a tree (checked to be that
    # version), the same build either way: `find` computes its key without knowing where the tree was
    ident["cmake_args"] = [a for a in args if not a.startswith(("-DFETCHCONTENT_SOURCE_DIR_KLEIDIAI=",
                                                                 "-DCMAKE_PROJECT_KleidiAI_INCLUDE="))]
    if len(ident["cmake_args"]) != len(args) and KLEIDIAI_GCC_FIX.is_file():  # mvlm's file: its content, not its path
        ident["kleidiai_include"] = sha256_file(KLEIDIAI_GCC_FIX)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _arg_value(args: list[str], name: str) -> str | None:
    vals = [a.split("=", 1)[1] for a in args if a.startswith(f"-D{name}=")]
    return vals[-1] if vals else None


def _cuda_manifest(args: list[str]) -> dict:
    """The nvcc a cuda build's CMake arguments name, its release line (asked now) and the architectures."""
    nvcc = Path(_arg_value(args, "CMAKE_CUDA_COMPILER") or find_nvcc())
    return {"nvcc": str(nvcc), "release": cuda_release(nvcc), "architectures": _arg_value(args, "CMAKE_CUDA_ARCHITECTURES")}


# --- building -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Runtime:
    """A finished build: ``root`` has bin/, lib/ (host) and manifest.json."""

    root: Path
    manifest: dict
    cached: bool = False

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def lib(self) -> Path:
        return self.root / "lib"

    def exe(self, name: str) -> Path:
        return self.bin / name


ProgressFn = Callable[[int, int, str], None]  # (done, total, line)


def prepare_source(bdir: Path, source: Source, patches: list[Patch], log: Callable[[str], None] = lambda s: None) -> list:
    """``bdir/src``: a copy of the source with the patches applied (once per build dir); returns the patch statuses."""
    srcdir = bdir / "src"
    if not (bdir / "src.ok").is_file():
        shutil.rmtree(srcdir, ignore_errors=True)
        bdir.mkdir(parents=True, exist_ok=True)
        log(f"copying {source.description} and applying {len(patches)} patch(es)")
        root = str(source.path)

        def top_level_skips(d: str, names: list[str]) -> set[str]:
            return {n for n in names if n in _SKIP_DIRS or n == ".mvlm-source.json"} if d == root else set()

        shutil.copytree(source.path, srcdir, symlinks=True, ignore=top_level_skips)
        applied = apply_patches(srcdir, patches)
        (bdir / "src.ok").write_text(json.dumps(applied))
    return json.loads((bdir / "src.ok").read_text())


def recipe_target(opts: BuildOptions) -> str:
    """The build a target gets: android-arm64 without an NDK is the linux-arm64 build (same static aarch64 binaries
    from the Debian cross toolchain, same CMake arguments), so it is built once and cached once for both."""
    if opts.target == "android-arm64" and resolve_ndk(opts.ndk) is None:
        return "linux-arm64"
    return opts.target


def build(
    opts: BuildOptions,
    llama_cpp: Path | None = None,
    progress: ProgressFn | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> Runtime:
    """Build (or find cached) the runtime for ``opts.target``. Raises MvlmError with the log tail on failure."""
    check_options(opts)  # e.g. no nvcc, or no GPU to detect: one clear line before any download or copy
    source = user_source(llama_cpp) if llama_cpp else pinned_source(log)
    patches = project_patches()
    args, note = cmake_args(opts, source)
    recipe = dataclasses.replace(opts, target=recipe_target(opts))
    key = build_key(source, patches, recipe, args)
    bdir = cache_root() / "runtime" / f"{recipe.target}-{key[:16]}"
    inst = bdir / "install"
    if (inst / "manifest.json").is_file():
        rt = Runtime(inst, json.loads((inst / "manifest.json").read_text()), cached=True)
        write_latest(opts.target, rt)
        return rt
    if opts.target == "orin" and not opts.toolchain and platform.machine() != "aarch64":
        raise MvlmError(
            "the orin target is built natively on the Jetson (CUDA): run `mvlm runtime build --target orin --device orin` "
            "or pass --toolchain FILE for a CUDA cross toolchain"
        )
    with locked(bdir.with_name(bdir.name + ".lock")):
        if (inst / "manifest.json").is_file():
            return Runtime(inst, json.loads((inst / "manifest.json").read_text()), cached=True)
        t0 = time.monotonic()
        srcdir, builddir, logpath = bdir / "src", bdir / "build", bdir / "build.log"
        applied = prepare_source(bdir, source, patches, log)
        log(f"toolchain: {note}")
        jobs = opts.jobs or os.cpu_count() or 2
        with open_fresh(logpath, "w") as logf:
            _run_logged(["cmake", "-S", str(srcdir), "-B", str(builddir), *args], logf, logpath, "configure")
            _run_logged(["cmake", "--build", str(builddir), "-j", str(jobs), "--target", *BINARIES],
                        logf, logpath, "build", progress)
        tmp = private_dir(inst)
        tmp.chmod(0o755)
        (tmp / "bin").mkdir()
        outdir = builddir / "bin"
        for b in BINARIES:
            shutil.copy2(outdir / b, tmp / "bin" / b)
        libs = sorted(p for p in outdir.glob("*.so*") if p.is_file() or p.is_symlink())
        if libs:
            (tmp / "lib").mkdir()
            for so in libs:
                shutil.copy2(so, tmp / "lib" / so.name, follow_symlinks=False)
        manifest = {
            "target": recipe.target,
            "key": key,
            "source": source.ident,
            "source_description": source.description,
            "commit": source.commit,
            "patches": applied,
            "cmake_args": args,
            "toolchain": note,
            **({"cuda": _cuda_manifest(args)} if opts.target == "cuda" else {}),
            "cpu_variant": variant_of({"target": recipe.target, "cmake_args": args}),
            **({"kleidiai_src": _arg_value(args, "FETCHCONTENT_SOURCE_DIR_KLEIDIAI") or "downloaded"}
               if "-DGGML_CPU_KLEIDIAI=ON" in args else {}),
            "binaries": list(BINARIES),
            "libraries": [p.name for p in libs],
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - t0, 1),
            "host": platform.node(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        tmp.rename(inst)
        rt = Runtime(inst, manifest)
        write_latest(opts.target, rt)
        return rt


def _run_logged(cmd: list[str], logf, logpath: Path, what: str, progress: ProgressFn | None = None) -> None:
    logf.write("$ " + " ".join(cmd) + "\n")
    logf.flush()
    # ccache (used by ggml when installed): hash paths relative to the build dir, so builds whose keys differ only
    # in a patch recompile just the files that patch touched
    env = {**os.environ, "CCACHE_BASEDIR": str(logpath.parent), "CCACHE_NOHASHDIR": "true"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                            errors="replace")
    assert proc.stdout is not None
    pat = re.compile(r"^\[(\d+)/(\d+)\]")
    for line in proc.stdout:
        logf.write(line)
        logf.flush()
        m = pat.match(line)
        if m and progress:
            progress(int(m.group(1)), int(m.group(2)), line.strip())
    rc = proc.wait()
    logf.flush()
    if rc != 0:
        tail = "\n".join(logpath.read_text(errors="replace").splitlines()[-25:])
        raise MvlmError(f"llama.cpp {what} failed (exit {rc}); full log: {logpath}", detail=tail)


def write_latest(target: str, rt: Runtime) -> None:
    p = cache_root() / "runtime" / f"latest-{target}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_for(p)
    tmp.write_text(json.dumps({"root": str(rt.root), "key": rt.manifest.get("key")}))
    tmp.replace(p)


def find(target: str = "host", llama_cpp: Path | None = None, cpu_variant: str | None = None) -> Runtime:
    """The runtime for ``target`` (of ``cpu_variant``: None, the target's default build) built from the default (or
    given) source, without building. MvlmError if none."""
    if target not in TARGETS:
        raise MvlmError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    hint = f"run `mvlm runtime build --target {target}" + (f" --cpu-variant {cpu_variant}" if cpu_variant else "") + \
        (f" --llama-cpp {llama_cpp}`" if llama_cpp else "`")
    try:
        if llama_cpp:
            source = user_source(llama_cpp)
        else:
            stamp = cache_root() / "src" / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}" / ".mvlm-source.json"
            source = pinned_source() if stamp.is_file() else None
        if source is not None:
            opts = BuildOptions(target=target, cpu_variant=cpu_variant)
            args, _ = cmake_args(opts, source)
            recipe = dataclasses.replace(opts, target=recipe_target(opts))
            key = build_key(source, project_patches(), recipe, args)
            inst = cache_root() / "runtime" / f"{recipe.target}-{key[:16]}" / "install"
            if (inst / "manifest.json").is_file():
                return Runtime(inst, json.loads((inst / "manifest.json").read_text()), cached=True)
    except MvlmError:
        pass
    latest = cache_root() / "runtime" / f"latest-{target}.json"
    if not llama_cpp and latest.is_file():
        root = Path(json.loads(latest.read_text())["root"])
        if (root / "manifest.json").is_file():
            rt = Runtime(root, json.loads((root / "manifest.json").read_text()), cached=True)
            arch = cpu_variants.arch_of_target(target)
            want = cpu_variant or (cpu_variants.DEFAULT[arch] if arch else None)
            if want is None or variant_of(rt.manifest) in (want, None if cpu_variant is None else want):
                return rt
    what = f"{target} runtime" + (f" of CPU variant {cpu_variant}" if cpu_variant else "")
    raise MvlmError(f"no {what} is built yet: {hint}")


def find_build(target: str, commit: str, patches: list[str] | tuple[str, ...],
               cpu_variant: str | None = None) -> Runtime | None:
    """A cached build for ``target`` of llama.cpp ``commit`` with exactly these patches (names), of ``cpu_variant``
    (None: the target's default one), newest first; None if the cache holds none. Lets the regression gate re-run a
    baseline's build next to a candidate's."""
    root = cache_root() / "runtime"
    if not root.is_dir():
        return None
    found: list[tuple[float, Path, dict]] = []
    target = recipe_target(BuildOptions(target=target))
    arch = cpu_variants.arch_of_target(target)
    variant = cpu_variant or (cpu_variants.DEFAULT[arch] if arch else None)
    for m in root.glob(f"{target}-*/install/manifest.json"):
        try:
            man = json.loads(m.read_text())
        except (OSError, ValueError):
            continue
        names = [p.get("name") for p in man.get("patches", []) if isinstance(p, dict)]
        if man.get("target") == target and str(man.get("commit")) == str(commit) and names == list(patches) \
                and variant_of(man) in (variant, None if cpu_variant is None else variant):
            found.append((m.stat().st_mtime, m.parent, man))
    if not found:
        return None
    _, inst, man = max(found, key=lambda t: t[0])
    return Runtime(inst, man, cached=True)


def runtime_from_dir(d: Path) -> Runtime:
    """A runtime install directory (``mvlm runtime path`` prints one: bin/, lib/, manifest.json)."""
    d = Path(d).expanduser()
    if (d / "install" / "manifest.json").is_file():
        d = d / "install"
    m = d / "manifest.json"
    if not m.is_file():
        raise MvlmError(f"{d} is not an mvlm runtime (no manifest.json): give the directory `mvlm runtime path` prints")
    try:
        return Runtime(d, json.loads(m.read_text()), cached=True)
    except ValueError as e:
        raise MvlmError(f"{m} is not valid JSON ({e}): rebuild that runtime") from None


def use_runtime(target: str = "host", runtime: Runtime | None = None) -> Runtime:
    """Point llama-cpp-python at the project's build (call BEFORE ``import llama_cpp``).

    llama-cpp-python reads LLAMA_CPP_LIB_PATH / MTMD_CPP_LIB when its modules are first imported; if they were
    imported already from other libraries, results would silently come from an unpatched llama.cpp, so that is an error.
    """
    rt = runtime or find(target)
    if not rt.lib.is_dir():
        raise MvlmError(f"runtime {rt.root} has no shared libraries (target {target}): the Python bindings need the host "
                        "or cuda target")
    lib = str(rt.lib)
    loaded = sys.modules.get("llama_cpp.llama_cpp")
    if loaded is not None and os.environ.get("LLAMA_CPP_LIB_PATH") != lib:
        raise MvlmError("llama_cpp was imported before use_runtime(): results would not come from the patched runtime")
    os.environ["LLAMA_CPP_LIB_PATH"] = lib
    os.environ["MTMD_CPP_LIB"] = lib
    return rt
