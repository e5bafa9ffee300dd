"""llama.cpp backends: ways of calling a build (``mvlm_core.runtime.Runtime``) from Python.

A *build* is a compiled llama.cpp on disk; a *backend* runs one on given inputs and returns raw arrays: token ids,
logits, image embeddings, the multimodal prompt's last-position logits. ``mvlm verify`` and ``mvlm quantize`` use them.

- ``host`` (:class:`HostBackend`): llama-cpp-python's bindings in this process, pointed at the project's patched host
  build (``mvlm_core.runtime.use_runtime``) before ``llama_cpp`` is imported.
- ``linux-arm64`` / ``android-arm64`` (:class:`Arm64QemuBackend`, :class:`Android64Backend`): the target's
  ``mvlm-dump`` tool (patch 0002) as a process, through ``qemu-aarch64-static`` on a non-arm64 machine: the bindings
  cannot load a foreign build, the tool needs no bindings.
- ``host-bin`` (:class:`HostBinaryBackend`): the host build's ``mvlm-dump`` the same way (no wrapper); its arrays
  equal the bindings' bit for bit.
- ``cuda`` (:class:`CudaBackend`): the bindings on the cuda build, every layer and the mmproj on the GPU.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mvlm_core import conversation
from mvlm_core import runtime as rtmod
from mvlm_core.errors import MvlmError

# ggml type ids for the KV cache. verify defaults to f32 so the logits measure the GGUF alone (llama.cpp's
# default f16 cache adds ~3e-4 relative error on its own); "f16" reproduces what llama-cli users run.
KV_CACHE_TYPES = {"f32": 0, "f16": 1}


def exec_wrapper_for(target: str, qemu_cpu: str | None = None) -> list[str]:
    """How this machine runs the target's binaries: directly, or through qemu-user for arm64 on another CPU
    (``qemu_cpu``: the CPU model qemu emulates, ``-cpu``; default qemu's own, ``max``)."""
    if target in ("host", "cuda") or platform.machine() in ("aarch64", "arm64"):
        return []
    if target in ("linux-arm64", "android-arm64"):
        qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
        if not qemu:
            raise MvlmError(f"running {target} binaries on {platform.machine()} needs qemu-user: "
                            "apt-get install qemu-user-static")
        return [qemu, "-cpu", qemu_cpu] if qemu_cpu else [qemu]
    raise MvlmError(f"{target} binaries cannot run on this machine ({platform.machine()}): run the check on the device")


@dataclass
class MultimodalRun:
    """Tokens of the multimodal prompt as llama.cpp split them, and its last-position logits."""

    before: list[int]
    n_image_tokens: int
    after: list[int]
    last_logits: np.ndarray
    image_embd: np.ndarray


class Backend(Protocol):
    """What verify and quantize need from a llama.cpp build: tokens, logits, image embeddings, a multimodal run."""

    name: str

    def tokenize(self, gguf_path: Path, text: str) -> list[int]: ...

    def logits(self, gguf_path: Path, tokens: list[int], kv_cache: str = "f32") -> np.ndarray: ...

    def image_embedding(self, mmproj_path: Path, gguf_path: Path, rgb: np.ndarray) -> np.ndarray: ...

    def multimodal(self, mmproj_path: Path, gguf_path: Path, rgb: np.ndarray, prompt: str,
                   kv_cache: str = "f32") -> MultimodalRun: ...


def _llama_modules(target: str):
    """Import llama_cpp + mtmd_cpp against the project's runtime for ``target`` (idempotent)."""
    rtmod.use_runtime(target)
    import llama_cpp
    import llama_cpp._logger as llama_logger
    from llama_cpp import mtmd_cpp

    llama_logger.set_verbose(False)
    # Route mtmd/clip logging through the same (quiet) callback llama-cpp-python installs for llama.
    mtmd_cpp.mtmd_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
    return llama_cpp, mtmd_cpp


class HostBackend:
    """llama.cpp in this process through llama-cpp-python, on the project's patched host build."""

    name = "host"
    n_gpu_layers = 0  # layers offloaded to a GPU (llama-cpp-python: -1 = all)
    mmproj_on_gpu = False

    def __init__(self, target: str = "host", n_threads: int | None = None, n_ctx: int = 1024):
        self.target = target
        self.n_threads = n_threads or max(1, min(os.cpu_count() or 1, 8))
        self.n_ctx = n_ctx
        self.llama_cpp, self.mtmd = _llama_modules(target)

    def _load(self, gguf_path: Path, kv_cache: str = "f16"):
        from llama_cpp import Llama

        if not Path(gguf_path).is_file():
            raise MvlmError(f"GGUF not found: {gguf_path}")
        if kv_cache not in KV_CACHE_TYPES:
            raise MvlmError(f"kv cache type {kv_cache!r} not supported: choose {', '.join(KV_CACHE_TYPES)}")
        kv = KV_CACHE_TYPES[kv_cache]
        try:
            return Llama(model_path=str(gguf_path), n_ctx=self.n_ctx, n_batch=self.n_ctx, n_ubatch=self.n_ctx,
                         logits_all=True, n_threads=self.n_threads, n_gpu_layers=self.n_gpu_layers, type_k=kv, type_v=kv,
                         verbose=False)
        except (ValueError, RuntimeError) as e:
            raise MvlmError(f"llama.cpp cannot load {gguf_path}: {e}") from e

    def tokenize(self, gguf_path: Path, text: str) -> list[int]:
        llm = self._load(gguf_path)
        try:
            return list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))
        finally:
            llm.close()

    def logits(self, gguf_path: Path, tokens: list[int], kv_cache: str = "f32") -> np.ndarray:
        llm = self._load(gguf_path, kv_cache)
        try:
            llm.eval(tokens)
            return np.array(llm.scores[: len(tokens)], dtype=np.float32)
        finally:
            llm.close()

    # -- mtmd --------------------------------------------------------------------------------------------------
    def _mtmd_ctx(self, mmproj_path: Path, llm):
        if not Path(mmproj_path).is_file():
            raise MvlmError(f"mmproj GGUF not found: {mmproj_path}")
        params = self.mtmd.mtmd_context_params_default()
        params.use_gpu = self.mmproj_on_gpu
        params.n_threads = self.n_threads
        params.print_timings = False
        params.warmup = False
        ctx = self.mtmd.mtmd_init_from_file(str(mmproj_path).encode(), llm.model, params)
        if not ctx:
            raise MvlmError(f"llama.cpp (mtmd) cannot load {mmproj_path} with {llm.model_path}: run with a matching "
                            "language model (its n_embd must equal the projector output)")
        return ctx

    def _tokenize_mm(self, ctx, rgb: np.ndarray, prompt: str):
        m = self.mtmd
        h, w = rgb.shape[:2]
        data = (ctypes.c_uint8 * rgb.size).from_buffer_copy(np.ascontiguousarray(rgb, np.uint8).tobytes())
        bitmap = m.mtmd_bitmap_init(w, h, data)
        if not bitmap:
            raise MvlmError("mtmd could not create a bitmap from the image")
        chunks = m.mtmd_input_chunks_init()
        text = prompt.encode("utf-8")
        inp = m.mtmd_input_text(text=text, text_len=len(text), add_special=True, parse_special=True)
        bitmaps = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
        rc = m.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), bitmaps, 1)
        m.mtmd_bitmap_free(bitmap)
        if rc != 0:
            m.mtmd_input_chunks_free(chunks)
            raise MvlmError(f"mtmd_tokenize failed (code {rc})")
        return chunks

    def _chunk_list(self, chunks):
        m = self.mtmd
        out = []
        for i in range(m.mtmd_input_chunks_size(chunks)):
            ch = m.mtmd_input_chunks_get(chunks, i)
            kind = m.mtmd_input_chunk_get_type(ch)
            if kind == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t(0)
                ptr = m.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(n))
                out.append(("text", ch, [int(ptr[j]) for j in range(n.value)]))
            else:
                out.append(("image" if kind == m.MTMD_INPUT_CHUNK_TYPE_IMAGE else "other", ch,
                            m.mtmd_input_chunk_get_n_tokens(ch)))
        return out

    def _encode(self, ctx, chunk, n_tokens: int, n_embd: int) -> np.ndarray:
        rc = self.mtmd.mtmd_encode_chunk(ctx, chunk)
        if rc != 0:
            raise MvlmError(f"mtmd_encode_chunk failed (code {rc})")
        ptr = self.mtmd.mtmd_get_output_embd(ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_tokens * n_embd,)).reshape(n_tokens, n_embd).copy()

    def image_embedding(self, mmproj_path: Path, gguf_path: Path, rgb: np.ndarray) -> np.ndarray:
        llm = self._load(gguf_path)
        try:
            ctx = self._mtmd_ctx(mmproj_path, llm)
            try:
                chunks = self._tokenize_mm(ctx, rgb, self.mtmd.mtmd_default_marker().decode())
                try:
                    images = [c for c in self._chunk_list(chunks) if c[0] == "image"]
                    if len(images) != 1:
                        raise MvlmError(f"mtmd produced {len(images)} image chunks for one image")
                    n_embd = self.llama_cpp.llama_model_n_embd(llm.model)
                    return self._encode(ctx, images[0][1], images[0][2], n_embd)
                finally:
                    self.mtmd.mtmd_input_chunks_free(chunks)
            finally:
                self.mtmd.mtmd_free(ctx)
        finally:
            llm.close()

    def multimodal(self, mmproj_path: Path, gguf_path: Path, rgb: np.ndarray, prompt: str,
                   kv_cache: str = "f32") -> MultimodalRun:
        lc, m = self.llama_cpp, self.mtmd
        llm = self._load(gguf_path, kv_cache)
        try:
            ctx = self._mtmd_ctx(mmproj_path, llm)
            try:
                marker = m.mtmd_default_marker().decode()
                chunks = self._tokenize_mm(ctx, rgb, prompt.replace(conversation.IMAGE_PLACEHOLDER, marker))
                try:
                    parts = self._chunk_list(chunks)
                    kinds = [p[0] for p in parts]
                    if kinds.count("image") != 1 or kinds.count("other"):
                        raise MvlmError(f"unexpected mtmd chunk layout {kinds}")
                    i = kinds.index("image")
                    before = [t for p in parts[:i] for t in p[2]]
                    after = [t for p in parts[i + 1:] for t in p[2]]
                    n_embd = lc.llama_model_n_embd(llm.model)
                    embd = self._encode(ctx, parts[i][1], parts[i][2], n_embd)
                    mem = lc.llama_get_memory(llm.ctx)
                    if mem is not None:
                        lc.llama_memory_clear(mem, True)
                    new_n_past = lc.llama_pos(0)
                    rc = m.mtmd_helper_eval_chunks(ctx, llm.ctx, chunks, 0, 0, self.n_ctx, True,
                                                   ctypes.byref(new_n_past))
                    if rc != 0:
                        raise MvlmError(f"mtmd_helper_eval_chunks failed (code {rc})")
                    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(llm.model))
                    ptr = lc.llama_get_logits_ith(llm.ctx, -1)
                    last = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float32).copy()
                    return MultimodalRun(before, parts[i][2], after, last, embd)
                finally:
                    m.mtmd_input_chunks_free(chunks)
            finally:
                m.mtmd_free(ctx)
        finally:
            llm.close()


class CudaBackend(HostBackend):
    """The cuda build (``mvlm runtime build --target cuda``) through llama-cpp-python: every layer and the mmproj on
    the GPU, so verify measures the CUDA kernels against PyTorch."""

    name = "cuda"
    n_gpu_layers = -1
    mmproj_on_gpu = True

    def __init__(self, **kw):
        super().__init__("cuda", **kw)


class BinaryBackend:
    """A built runtime's ``mvlm-dump`` (patch 0002) run as a process, optionally through an exec wrapper (qemu-user).

    Same settings as HostBackend (n_ctx, n_batch = n_ubatch = n_ctx, flash attention off, KV type, no GPU, the
    mmproj loaded with mtmd's defaults, no warm-up), so the two backends return the same arrays up to the target's
    own kernels. Inputs and outputs travel as raw files in a temporary directory.
    """

    MEDIA_MARKER = conversation.MEDIA_MARKER  # mtmd_default_marker() at the pinned commit; the tool reports its own, checked

    def __init__(self, target: str = "linux-arm64", exec_wrapper: list[str] | None = None,
                 n_threads: int | None = None, n_ctx: int = 1024, timeout: float = 900.0,
                 cpu_variant: str | None = None):
        self.target = target
        self.build = rtmod.find(target, cpu_variant=cpu_variant)
        self.exe = self.build.exe("mvlm-dump")
        if not self.exe.is_file():
            raise MvlmError(f"the {target} runtime at {self.build.root} has no mvlm-dump (built before patch 0002): "
                            f"run `mvlm runtime build --target {target}`")
        self.wrapper = list(exec_wrapper) if exec_wrapper is not None else exec_wrapper_for(target)
        under = " ".join([Path(self.wrapper[0]).name, *self.wrapper[1:]]) if self.wrapper else ""
        self.name = f"{target}" + (f" {cpu_variant}" if cpu_variant else "") + " (mvlm-dump" + \
            (f" under {under})" if under else ")")
        self.n_threads = n_threads or max(1, min(os.cpu_count() or 1, 8))
        self.n_ctx = n_ctx
        self.timeout = timeout

    def _run(self, gguf_path: Path, args: list[str], mmproj_path: Path | None = None) -> dict[str, Any]:
        if not Path(gguf_path).is_file():
            raise MvlmError(f"GGUF not found: {gguf_path}")
        if mmproj_path is not None and not Path(mmproj_path).is_file():
            raise MvlmError(f"mmproj GGUF not found: {mmproj_path}")
        argv = [*self.wrapper, str(self.exe), "-m", str(gguf_path), "-t", str(self.n_threads), "-c", str(self.n_ctx)]
        if mmproj_path is not None:
            argv += ["--mmproj", str(mmproj_path)]
        try:
            r = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=self.timeout, errors="replace")
        except subprocess.TimeoutExpired as e:
            raise MvlmError(f"mvlm-dump ({self.name}) ran past {self.timeout:.0f} s: use a smaller model") from e
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("MVLM_DUMP ")]
        if r.returncode != 0 or not lines:
            tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-10:])
            raise MvlmError(f"mvlm-dump ({self.name}) failed with status {r.returncode}", detail=tail)
        info = json.loads(lines[-1][len("MVLM_DUMP "):])
        if info.get("media_marker") != self.MEDIA_MARKER:
            raise MvlmError(f"mvlm-dump uses media marker {info.get('media_marker')!r}, expected {self.MEDIA_MARKER!r}")
        return info

    @staticmethod
    def _read(path: Path, dtype, shape: tuple[int, ...]) -> np.ndarray:
        arr = np.fromfile(path, dtype=dtype)
        if arr.size != int(np.prod(shape)):
            raise MvlmError(f"mvlm-dump wrote {arr.size} values to {path.name}, expected {shape}")
        return arr.reshape(shape)

    def tokenize(self, gguf_path: Path, text: str) -> list[int]:
        with tempfile.TemporaryDirectory(prefix="mvlm-dump-") as td:
            d = Path(td)
            (d / "text.txt").write_bytes(text.encode("utf-8"))
            info = self._run(gguf_path, ["--tokenize", str(d / "text.txt"), "--tokens-out", str(d / "tokens.i32")])
            return [int(t) for t in self._read(d / "tokens.i32", np.int32, (info["n_tokens"],))]

    def logits(self, gguf_path: Path, tokens: list[int], kv_cache: str = "f32") -> np.ndarray:
        if kv_cache not in KV_CACHE_TYPES:
            raise MvlmError(f"kv cache type {kv_cache!r} not supported: choose {', '.join(KV_CACHE_TYPES)}")
        with tempfile.TemporaryDirectory(prefix="mvlm-dump-") as td:
            d = Path(td)
            np.asarray(tokens, np.int32).tofile(d / "tokens.i32")
            info = self._run(gguf_path, ["--kv", kv_cache, "--tokens", str(d / "tokens.i32"),
                                         "--logits-out", str(d / "logits.f32")])
            return self._read(d / "logits.f32", np.float32, (len(tokens), info["n_vocab"])).copy()

    def _image_args(self, d: Path, rgb: np.ndarray) -> list[str]:
        rgb = np.ascontiguousarray(rgb, np.uint8)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise MvlmError(f"image must be an RGB array [H, W, 3], got shape {list(rgb.shape)}")
        rgb.tofile(d / "image.rgb")
        return ["--rgb", str(d / "image.rgb"), "--nx", str(rgb.shape[1]), "--ny", str(rgb.shape[0])]

    def image_embedding(self, mmproj_path: Path, gguf_path: Path, rgb: np.ndarray) -> np.ndarray:
        with tempfile.TemporaryDirectory(prefix="mvlm-dump-") as td:
            d = Path(td)
            info = self._run(gguf_path, [*self._image_args(d, rgb), "--embd-out", str(d / "embd.f32")], mmproj_path)
            return self._read(d / "embd.f32", np.float32, (info["n_image_tokens"], info["n_embd"])).copy()

    def multimodal(self, mmproj_path: Path, gguf_path: Path, rgb: np.ndarray, prompt: str,
                   kv_cache: str = "f32") -> MultimodalRun:
        if kv_cache not in KV_CACHE_TYPES:
            raise MvlmError(f"kv cache type {kv_cache!r} not supported: choose {', '.join(KV_CACHE_TYPES)}")
        with tempfile.TemporaryDirectory(prefix="mvlm-dump-") as td:
            d = Path(td)
            (d / "prompt.txt").write_bytes(prompt.replace(conversation.IMAGE_PLACEHOLDER, self.MEDIA_MARKER).encode("utf-8"))
            info = self._run(gguf_path, [*self._image_args(d, rgb), "--kv", kv_cache, "--embd-out", str(d / "embd.f32"),
                                         "--prompt-file", str(d / "prompt.txt"),
                                         "--mm-logits-out", str(d / "last.f32")], mmproj_path)
            embd = self._read(d / "embd.f32", np.float32, (info["n_image_tokens"], info["n_embd"])).copy()
            last = self._read(d / "last.f32", np.float32, (info["n_vocab"],)).copy()
            return MultimodalRun([int(t) for t in info["mm_before"]], int(info["mm_n_image_tokens"]),
                                 [int(t) for t in info["mm_after"]], last, embd)


class Arm64QemuBackend(BinaryBackend):
    """The static linux-arm64 build, run here through qemu-aarch64-static (natively on an arm64 machine)."""

    def __init__(self, **kw):
        super().__init__("linux-arm64", **kw)


class Android64Backend(BinaryBackend):
    """The android-arm64 build (static; without an NDK the same Debian cross build), through qemu here."""

    def __init__(self, **kw):
        super().__init__("android-arm64", **kw)


class HostBinaryBackend(BinaryBackend):
    """The host build's mvlm-dump as a process: checks the tool path against the bindings on one machine."""

    def __init__(self, **kw):
        super().__init__("host", exec_wrapper=[], **kw)


BACKENDS: dict[str, type] = dict(zip(rtmod.VERIFY_RUNTIMES, (HostBackend, HostBinaryBackend, Arm64QemuBackend,
                                                             Android64Backend, CudaBackend), strict=True))
_backend_cache: dict[str, Backend] = {}


def get_backend(backend: str | Backend = "host") -> Backend:
    """A Backend instance by name (cached per process: the bindings can load only one build per process).

    The names are what ``mvlm verify --runtime`` accepts.
    """
    if not isinstance(backend, str):
        return backend
    if backend not in BACKENDS:
        raise MvlmError(f"unknown verify runtime {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend not in _backend_cache:
        _backend_cache[backend] = BACKENDS[backend]()
    return _backend_cache[backend]
