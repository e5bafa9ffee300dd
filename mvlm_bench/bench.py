"""The papers' latency protocols, run on a device: sync the runtime and models, run, parse, collect.

Protocols (the MobileVLM / MobileVLM V2 papers' latency settings; docs/devices.md, 'Reproducing the papers'):

- ``lm``: ``llama-completion -no-cnv`` on "Building a website can be done in 10 simple steps:\\nStep 1:", 400 output
  tokens, greedy.
- ``vlm``: ``llama-mtmd-cli`` on a 336x336 image + "What is in the picture?", 256 output tokens, greedy, with the
  model's own chat template (the one ``mvlm convert`` writes into the GGUF).
- ``llama-bench``: llama.cpp's own pp/tg sweep, its JSON rows kept as they are.
- ``imp`` (Imp Table 4): ``llama-mtmd-cli`` as ``vlm``, with a fixed request cut to exactly 41 tokens of the model's
  own tokenizer (mvlm_bench.imp) and 64 output tokens; its figures exclude model loading (records.imp_metrics).
- ``dataset`` (Xmodel-VLM Table 6): a whole question file (``--data FILE.jsonl``) through one ``llama-server`` that
  loads the model once (mvlm_bench.dataset: the question file; mvlm_bench.dataset_run: the run, called by `mvlm bench`).

``--jinja`` makes llama-mtmd-cli render the GGUF's own chat template (MobileVLM's "v1" format, written by
``mvlm convert``). mvlm's runtime renders the same without it (patch 0005); the flag keeps a stock llama.cpp build
(``--llama-cpp DIR``) on the trained format too, where the built-in fallback would drop the system prompt.

Both generating protocols pass ``--ignore-eos`` so every run produces exactly the requested number of tokens (a small
or quantized model that stops early would otherwise report a different workload), and ``-lv 4`` because current
llama.cpp hides the perf block without it. One warm-up run (page cache, CPU clocks) precedes the measured repetitions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path

from mvlm_bench import lease as leasemod
from mvlm_bench import resources, thermal
from mvlm_bench.devices import KNOWN_TARGETS, MAX_GPU_LAYERS, MAX_THREADS, DeviceProfile
from mvlm_bench.gguf_header import precision_of
from mvlm_bench.records import Run, RunContext
from mvlm_bench.timings import parse_llama_bench, parse_text, run_facts
from mvlm_core import runtime as rtmod
from mvlm_core.errors import MvlmError
from mvlm_core.filenames import precision_from_filename

LM_PROMPT = "Building a website can be done in 10 simple steps:\nStep 1:"
VLM_PROMPT = "What is in the picture?"
PROTOCOLS = ("lm", "vlm", "llama-bench", "imp", "dataset")
IMAGE_PROTOCOLS = ("vlm", "imp", "dataset")  # need --mmproj
DEFAULT_N = {"lm": 400, "vlm": 256, "llama-bench": 128, "imp": 64, "dataset": 128}
# Bounds of the numeric options. lm/vlm run with a 2048-token context shared by the prompt (and the image's 144..576
# tokens); llama.cpp stops, rather than fails, when it is full, so a larger -n would measure fewer tokens than asked.
MAX_N = {"lm": 1536, "vlm": 1024, "llama-bench": 8192, "imp": 1024, "dataset": 1024}
MAX_REPEAT = 1000
MAX_WARMUP = 100
MAX_TIMEOUT_S = 7 * 24 * 3600.0
# The context (-c) must hold the prompt (and the image's up to 576 tokens) and every generated token: a smaller one
# makes llama.cpp abort ("failed to add token") rather than measure. MAX_CTX: beyond what these small models train on.
# imp: up to 729 image tokens (Imp-3B@384) + 41 text tokens + the chat template; dataset: 576 image tokens + a
# ScienceQA question with its context and choices (a sample that does not fit fails with the server's own message).
PROMPT_ROOM = {"lm": 64, "vlm": 640, "llama-bench": 0, "imp": 900, "dataset": 1024}
MIN_CTX = 64
MAX_CTX = 131072
__all__ = ["MAX_GPU_LAYERS", "MAX_THREADS"]  # re-exported: the bounds live in devices (profiles share them)


@dataclasses.dataclass
class BenchSpec:
    protocol: str
    model: Path
    mmproj: Path | None = None
    image: Path | None = None
    repeat: int = 3
    warmup: int = 1
    n_predict: int | None = None
    threads: int | None = None
    n_gpu_layers: int | None = None
    timeout: float = 900.0
    ctx_size: int = 2048
    prompt: str | None = None
    data: Path | None = None  # the dataset protocol's question file

    def tokens(self) -> int:
        return self.n_predict if self.n_predict is not None else DEFAULT_N[self.protocol]


@dataclasses.dataclass
class Failure:
    repetition: int
    message: str
    output_tail: str
    output: str = ""  # the whole output of the failed run (for the log file the CLI names)


# The line of a failed run's log that says most about why, best first: llama.cpp's own aborts ("file.cpp:2158: msg",
# GGML_ASSERT) and explicit errors of its loaders, crashes and the shell's own complaints (exec format / syntax errors
# of a binary built for another CPU), then any error line.
_RELEVANT = [
    re.compile(p, re.I)
    for p in (
        r"error loading model|failed to load|GGML_ASSERT|terminate called|what\(\):",
        r"[\w./-]+\.(?:c|cc|cpp|cxx|h|hpp|cu|m|mm):\d+: \S",
        r"Illegal instruction|Segmentation fault|Bus error|Aborted|core dumped|Killed",
        r"Syntax error|Exec format error|cannot execute|not found|No such file|Permission denied|CANNOT LINK",
        r"\berror\b|\bERROR\b",
        r"\bfailed\b|\bunable\b|\bcannot\b|\binvalid\b|out of memory",
    )
]
# ggml's crash handler attaches gdb and prints a backtrace: its lines ("#3 0x... in f () from lib.so", "30\t../sysdeps/
# unix/sysv/linux/wait4.c: No such file or directory.", "[New LWP 12]", ...) say nothing about why the run failed.
_BACKTRACE_NOISE = re.compile(
    r"^(#\d+\s+0x[0-9a-f]+|0x[0-9a-f]+ in |\d+\t|\[New LWP|\[New Thread|\[Thread debugging|\[Inferior \d|"
    r"Using host libthread_db|warning: (Unable to find libthread_db|could not find '\.gnu_debug)|\(gdb\)|ptrace: )"
    r"|\.\./(sysdeps|csu|nptl)/|(sysdeps|libc-start|libc_start)[\w./-]*: No such file",
    re.I,
)
# Where a llama.cpp abort message starts inside a line (printed right after the generated text: "Step 1:../src/…").
_ABORT_AT = re.compile(r"(?:\.{1,2}/)?[\w/-][\w./-]*\.(?:c|cc|cpp|cxx|h|hpp|cu|m|mm):\d+: \S")


_LOG_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ [A-Z] ")


def relevant_line(output: str, limit: int = 240) -> str:
    """The one line of a failed run's output that best says why (see ``_RELEVANT``); else its last line, so marked.

    A crash handler's gdb backtrace is skipped; llama.cpp's abort message (``common.cpp:2158: get_sub_batch: failed
    to add token …``) is cut from the generated text printed before it on the same line."""
    # llama.cpp's timestamped log lines ("0.00.002.305 E llama_model_load: ...") lose the timestamp and level
    lines = [_LOG_PREFIX.sub("", ln.strip()) for ln in output.splitlines()
             if ln.strip() and not ln.startswith("__MVLM_RC__")]
    lines = [ln for ln in lines if not _BACKTRACE_NOISE.search(ln)]
    if not lines:
        return "no output (llama.cpp can exit before its async logger flushes)"
    pick = f"last output line: {lines[-1]}"
    for rx in _RELEVANT:
        hit = next((ln for ln in lines if rx.search(ln)), None)
        if hit:
            pick = hit
            break
    at = _ABORT_AT.search(pick)
    if at and at.start() > 0:
        pick = pick[at.start():]
    return pick if len(pick) <= limit else pick[: limit - 3] + "..."


@dataclasses.dataclass
class BenchResult:
    runs: list[Run]
    failures: list[Failure]
    context: RunContext
    pushed_bytes: int
    llama_bench_rows: list[dict] = dataclasses.field(default_factory=list)
    commands: list[list[str]] = dataclasses.field(default_factory=list)


def validate_spec(spec: BenchSpec, against: tuple[str, ...] | list[str] | set[str] = (), ctx_option: bool = False) -> None:
    """Refuse nonsensical numbers and unknown protocols (one line each) before anything is pushed or measured.

    ``against``: the ``--against`` keys (threads, n-gpu-layers, ctx-size) that set this spec's values, so that an error
    names ``--against threads=0``, what the user wrote, rather than ``--threads``; ``ctx_option``: the context size came
    from ``--ctx-size`` (mvlm_bench.sweep), so errors name that option."""
    if spec.protocol not in PROTOCOLS:
        raise MvlmError(f"unknown protocol {spec.protocol!r}: choose one of {', '.join(PROTOCOLS)}")

    def bounded(option: str, value: int | None, lo: int, hi: int, why: str = "") -> None:
        if value is None or lo <= value <= hi:
            return
        key = option.lstrip("-")
        said = f"--against {key}={value}" if key in against else f"{option} {value}"
        if key == "ctx-size" and key not in against and not ctx_option:  # not from --ctx-size: the spec was built in code
            said = f"the context size (ctx_size) {value}"
        raise MvlmError(f"{said} is out of range: give a whole number from {lo} to {hi}{why}")

    bounded("--repeat", spec.repeat, 1, MAX_REPEAT)
    bounded("--warmup", spec.warmup, 0, MAX_WARMUP)
    ctx = f" (the {spec.protocol} protocol runs with a {spec.ctx_size}-token context)" if spec.protocol != "llama-bench" else ""
    bounded("--n-predict", spec.n_predict, 1, MAX_N[spec.protocol], ctx)
    if spec.protocol != "llama-bench":
        need = spec.tokens() + PROMPT_ROOM[spec.protocol]
        bounded("--ctx-size", spec.ctx_size, max(MIN_CTX, need), MAX_CTX,
                f" (the {spec.protocol} protocol needs room for its prompt and {spec.tokens()} generated tokens)")
    bounded("--threads", spec.threads, 1, MAX_THREADS)
    bounded("--n-gpu-layers", spec.n_gpu_layers, 0, MAX_GPU_LAYERS)
    if not (isinstance(spec.timeout, int | float) and math.isfinite(spec.timeout) and 0 < spec.timeout <= MAX_TIMEOUT_S):
        raise MvlmError(f"--timeout {spec.timeout} is out of range: give seconds, more than 0 and at most {MAX_TIMEOUT_S:.0f}")


def check_inputs(spec: BenchSpec, against: tuple[str, ...] | list[str] | set[str] = (),
                 needs_template: bool = True) -> None:
    """The model (and mmproj, image) exist and are what they claim, checked here before anything goes to a device.

    ``against``: the ``--against`` keys (model, mmproj) that set these paths; errors then name ``--against model=X``.
    ``needs_template``: the image protocols run llama-mtmd-cli, which stops at once on a model without a chat template
    ("Model does not have chat template.", whatever -p says), so such a model is refused here; False for callers that
    run llama-server, which falls back to its own default template (mvlm serve)."""
    from mvlm_core.atomic import is_gguf

    def named(option: str, p: Path) -> str:
        key = option.lstrip("-")
        return f"--against {key}={p}" if key in against else f"{option} {p}"

    def gguf(option: str, p: Path) -> None:
        said = named(option, p)
        if not p.exists():
            raise MvlmError(f"{said} does not exist: give the path of a .gguf file")
        if not p.is_file():
            raise MvlmError(f"{said} is not a file: give the path of a .gguf file")
        if not is_gguf(p):
            raise MvlmError(f"{said} is not a GGUF file (it does not start with 'GGUF'): give a .gguf written by "
                            "mvlm convert or mvlm quantize")
        from mvlm_bench.gguf_header import gguf_missing_bytes

        try:
            short = gguf_missing_bytes(p)
        except (OSError, ValueError, UnicodeDecodeError):  # a header this reader cannot follow: llama.cpp says what
            short = None  # is wrong with it, in the run's one-line error
        if short:
            raise MvlmError(f"{said} is truncated: its tensor data ends {short} bytes past the end of the file "
                            f"({p.stat().st_size} bytes): copy or convert it again")

    gguf("--model", Path(spec.model))
    if spec.protocol == "dataset":
        from mvlm_bench import dataset

        if spec.data is None:
            raise MvlmError("the dataset protocol needs --data FILE.jsonl (one {\"question_id\", \"image\", \"text\"} "
                            "object per line, image paths relative to the file)")
        for option, value in (("--image", spec.image), ("--prompt", spec.prompt)):
            if value is not None:
                raise MvlmError(f"{option} is not used by the dataset protocol: each sample of --data brings its own")
        dataset.load_samples(Path(spec.data))
    elif spec.data is not None:
        raise MvlmError(f"--data is for the dataset protocol, not {spec.protocol}: add --protocol dataset")
    if spec.protocol in IMAGE_PROTOCOLS:
        if spec.mmproj is None:
            raise MvlmError(f"the {spec.protocol} protocol needs --mmproj FILE (the mmproj-*.gguf written by mvlm convert)")
        gguf("--mmproj", Path(spec.mmproj))
        if needs_template and spec.protocol in ("vlm", "imp"):
            from mvlm_bench.gguf_header import gguf_kind

            try:
                _, is_lm, has_template = gguf_kind(Path(spec.model))
            except MvlmError:  # a header this reader cannot follow: llama.cpp itself says what is wrong with it
                is_lm, has_template = False, True
            if is_lm and not has_template:
                raise MvlmError(f"{named('--model', Path(spec.model))} has no chat template (tokenizer.chat_template), and "
                                f"llama-mtmd-cli refuses an image prompt without one (--prompt text goes through the "
                                f"template too): convert the model again with `mvlm convert` from a checkpoint whose "
                                f"tokenizer_config.json has a chat_template (MobileVLM, LLaVA-1.5, Xmodel-VLM and Imp v1 "
                                f"get one written), or bench it with --protocol lm")
        if spec.image is not None:
            img = Path(spec.image)
            if not img.is_file():
                raise MvlmError(f"--image {img} does not exist or is not a file: give a PNG or JPEG image")
            try:
                from PIL import Image

                with Image.open(img) as im:
                    im.verify()
            except Exception as e:  # PIL raises many types for a non-image
                raise MvlmError(f"--image {img} is not an image PIL can read ({type(e).__name__}): give a PNG or JPEG") from None


# --------------------------------------------------------------------------------------------------- device targets

_TARGET_DESC = {
    "cuda": "this machine's own build with CUDA (an NVIDIA GPU)",
    "linux-arm64": "aarch64 Linux (static)",
    "android-arm64": "Android arm64-v8a",
    "orin": "aarch64 Linux with CUDA (Jetson Orin)",
}


def _host() -> tuple[str, str]:
    from mvlm_bench.transports import normalise_machine

    return platform.system(), normalise_machine(platform.machine())


def target_description(target: str) -> str:
    if target == "host":
        system, machine = _host()
        return f"{machine} {system}, this machine's own build"
    return _TARGET_DESC.get(target, target)


def targets_for(info) -> tuple[list[str], str | None]:
    """(runtime targets that run on a device, the one to suggest or None). ``info`` is a transports.DeviceInfo."""
    host_system, host_machine = _host()
    host_ok = not info.android and info.system == host_system and info.machine == host_machine
    if info.android:
        if info.android_abi == "arm64-v8a" or info.machine == "aarch64":
            return ["android-arm64", "linux-arm64"], "android-arm64"  # both builds are static aarch64
        return [], None
    if info.system == "Linux" and info.machine == "aarch64":
        return ["linux-arm64", "orin"] + (["host", "cuda"] if host_ok else []), "linux-arm64"
    if host_ok:
        return ["host", "cuda"], "host"  # cuda: the host recipe plus an NVIDIA GPU
    return [], None


def _wrapped_by_emulator(profile: DeviceProfile) -> bool:
    return any(Path(w).name.startswith("qemu-") for w in profile.exec_wrapper)


def resolve_target(profile: DeviceProfile, info) -> DeviceProfile:
    """Ad hoc devices: the profile with the target the probe calls for. Profiles: refused when their target cannot
    run on the probed device (one line saying which build to make). Emulated (qemu) devices are not second-guessed."""
    if _wrapped_by_emulator(profile):
        return profile
    ok, suggest = targets_for(info)
    where = str(profile.source) if profile.source else f"--device {profile.name}"
    if profile.probe_target:
        if suggest is None:
            raise MvlmError(
                f"device {profile.name} is {info.describe()}: mvlm has no runtime target for it (targets: host = "
                f"{target_description('host')}, cuda, linux-arm64, android-arm64, orin)"
            )
        return dataclasses.replace(profile, target=suggest)
    if profile.target in ok:
        return profile
    if suggest is None:
        raise MvlmError(
            f"device {profile.name} is {info.describe()}, but {where} says target {profile.target!r} "
            f"({target_description(profile.target)}), and mvlm has no runtime target for this device"
        )
    raise MvlmError(
        f"device {profile.name} is {info.describe()}, but {where} says target {profile.target!r} "
        f"({target_description(profile.target)}): set target = \"{suggest}\" there and run "
        f"`mvlm runtime build --target {suggest}` (nothing was pushed)"
    )


def default_image() -> Path:
    """A deterministic 336x336 test image (PNG) in the cache, for the vlm protocol when no --image is given."""
    out = rtmod.cache_root() / "images" / "mvlm-test-336.png"
    if not out.is_file():
        import numpy as np
        from PIL import Image

        y, x = np.mgrid[0:336, 0:336].astype(np.float32) / 335.0
        img = np.stack([x * 255, y * 255, (1 - x) * 180 + 40], -1)
        img[(x - 0.5) ** 2 + (y - 0.45) ** 2 < 0.05] = (230, 60, 40)  # a red disc
        img[200:280, 40:140] = (30, 140, 60)  # a green box
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp.png")
        Image.fromarray(img.clip(0, 255).astype("uint8")).save(tmp)
        tmp.replace(out)
    return out


def build_argv(profile: DeviceProfile, spec: BenchSpec, workdir: str, names: dict[str, str]) -> list[str]:
    """The command line run on the device for one repetition (paths are the device's). Threads: --threads, else the
    profile's (a local profile's default is this machine's core count); else no ``-t`` at all, so llama.cpp picks its
    own default on the device (never this machine's core count; the run's log says what it used)."""
    threads = spec.threads or profile.threads
    t_args = ["-t", str(threads)] if threads else []
    ngl = spec.n_gpu_layers if spec.n_gpu_layers is not None else profile.n_gpu_layers
    wd = workdir.rstrip("/")
    model = f"{wd}/models/{names['model']}"
    if spec.protocol == "lm":
        argv = [f"{wd}/bin/llama-completion", "-m", model, "-p", spec.prompt or LM_PROMPT, "-n", str(spec.tokens()),
                "-no-cnv", "--temp", "0", "--seed", "0", "--ignore-eos", "-c", str(spec.ctx_size),
                *t_args, "-ngl", str(ngl), "-lv", "4"]
    elif spec.protocol in ("vlm", "imp"):  # imp: the 41-token request (protocol_spec) and -n 64
        argv = [f"{wd}/bin/llama-mtmd-cli", "-m", model, "--mmproj", f"{wd}/models/{names['mmproj']}",
                "--image", f"{wd}/images/{names['image']}", "-p", spec.prompt or VLM_PROMPT, "-n", str(spec.tokens()),
                "--temp", "0", "--seed", "0", "--ignore-eos", "-c", str(spec.ctx_size), *t_args,
                "-ngl", str(ngl), "-lv", "4", "--jinja"]
    elif spec.protocol == "dataset":
        # llama-server for the whole set (mvlm_bench.dataset_run): the GGUF's template, the pushed images as
        # file:// media, one slot, on the device's 127.0.0.1 at a port it picks and prints ("listening on ...")
        from mvlm_bench.dataset import DEVICE_DIR

        argv = [f"{wd}/bin/llama-server", "-m", model, "--mmproj", f"{wd}/models/{names['mmproj']}", "--jinja",
                "--media-path", f"{wd}/{DEVICE_DIR}/", "--host", "127.0.0.1", "--port", "0", "-np", "1",
                "-c", str(spec.ctx_size), *t_args, "-ngl", str(ngl), "--no-webui", "-lv", "4"]
    elif spec.protocol == "llama-bench":
        argv = [f"{wd}/bin/llama-bench", "-m", model, "-p", "64,128", "-n", str(spec.tokens()), "-r", str(spec.repeat),
                *t_args, "-ngl", str(ngl), "-o", "json"]
    else:
        raise MvlmError(f"unknown protocol {spec.protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    return argv  # the transport adds the profile's exec_wrapper (e.g. qemu-aarch64-static)


_SONAME = re.compile(r"\.so\.\d+$")  # libllama.so.0: the name a binary's NEEDED entry asks the loader for


def runtime_libraries(lib: Path) -> dict[str, Path]:
    """The shared libraries a device needs from a runtime's lib/ (name -> the real file): each library once. A
    versioned library comes as libX.so -> libX.so.0 -> libX.so.0.5.0; binaries load it by its SONAME (libX.so.0), so
    that name alone is pushed (with the real file's content) instead of three full copies of one file. A library
    without that chain (libllama-bench-impl.so, an Android build's libX.so) is pushed under its own name."""
    groups: dict[Path, list[str]] = {}
    for entry in sorted(lib.iterdir()):
        if entry.is_file():
            groups.setdefault(entry.resolve(), []).append(entry.name)
    out: dict[str, Path] = {}
    for real, names in groups.items():
        sonames = [n for n in names if _SONAME.search(n)]
        for name in sonames or names:
            out[name] = real
    return dict(sorted(out.items()))


def artifacts(rt: rtmod.Runtime, spec: BenchSpec) -> tuple[dict[str, Path], dict[str, str]]:
    """Files to push (device-relative path -> local path) and the device-side names of model/mmproj/image."""
    files: dict[str, Path] = {}
    need = {"lm": ["llama-completion"], "vlm": ["llama-mtmd-cli"], "imp": ["llama-mtmd-cli"], "dataset": ["llama-server"],
            "llama-bench": ["llama-bench"]}[spec.protocol]
    for b in need:
        files[f"bin/{b}"] = rt.exe(b)
    if rt.lib.is_dir():
        files.update({f"lib/{name}": real for name, real in runtime_libraries(rt.lib).items()})
    names = {"model": spec.model.name}
    files[f"models/{spec.model.name}"] = spec.model
    if spec.protocol in IMAGE_PROTOCOLS:
        if spec.mmproj is None:
            raise MvlmError(f"the {spec.protocol} protocol needs --mmproj FILE (the mmproj-*.gguf written by mvlm convert)")
        names["mmproj"] = spec.mmproj.name
        files[f"models/{spec.mmproj.name}"] = spec.mmproj
    if spec.protocol == "dataset":
        from mvlm_bench import dataset

        files.update(dataset.files(dataset.load_samples(Path(spec.data))))  # type: ignore[arg-type]
    elif spec.protocol in IMAGE_PROTOCOLS:
        image = spec.image or default_image()
        names["image"] = image.name
        files[f"images/{image.name}"] = image
    for rel, p in files.items():
        if not Path(p).is_file():
            raise MvlmError(f"{p} does not exist (needed on the device as {rel})")
    return files, names


@dataclasses.dataclass
class Side:
    """One side of a measurement on a device: what runs (spec), with which build (runtime; None: the pinned one for
    the device's target), and where on the device its files go (``subdir`` under the profile's workdir)."""

    spec: BenchSpec
    runtime: rtmod.Runtime | None = None
    llama_cpp: Path | None = None  # or: the build of this llama.cpp checkout for the device's target
    wrapper: tuple[str, ...] = ()  # argv prefix on the device for this side only (benchmarks/gate_rates.py throttles)
    subdir: str = ""
    name: str = ""  # "baseline" / "candidate" in an A/B session; recorded in the run parameters


# llama-bench fields of a llama-completion / llama-mtmd-cli run that mvlm's command line leaves at llama.cpp's
# defaults (common/common.h; tools/llama-bench/llama-bench.cpp prints them under these names and in these forms)
COMMAND_LINE_DEFAULTS: dict[str, object] = {
    "cpu_mask": "0x0", "cpu_strict": False, "poll": 50, "n_cpu_moe": 0, "split_mode": "layer", "main_gpu": 0,
    "no_kv_offload": False, "devices": "auto", "tensor_split": "0.00", "tensor_buft_overrides": "none",
    "load_mode": "auto", "lazy_mode": "auto", "embeddings": False, "no_op_offload": 0, "no_host": False, "repack": True,
}  # fmt: skip
_VERSION = re.compile(r"version: .*?\(build (\d+), commit (\w+)\)|version: (\d+) \((\w+)\)")


def device_cpu_info(transport) -> str:
    """The CPU's name the way ggml's CPU backend (and so llama-bench's cpu_info) reads it, on the device itself:
    the first ``model name`` of /proc/cpuinfo (Linux, Android), ``sysctl machdep.cpu.brand_string`` (macOS), else
    ggml's own default, "CPU" (most ARM kernels print no model name)."""
    text = transport.read_text("/proc/cpuinfo")
    if text:
        for line in text.splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip() or "CPU"
        return "CPU"
    try:
        r = transport.run(["sysctl", "-n", "machdep.cpu.brand_string"], timeout=30)
    except (MvlmError, OSError):
        return "CPU"
    name = r.output.strip().splitlines()[-1].strip() if r.returncode == 0 and r.output.strip() else ""
    return name or "CPU"


def build_version(transport, exe: str, env: dict[str, str]) -> dict[str, object]:
    """build_number and build_commit as the device's binary states them (``--version``); {} when it does not say."""
    try:
        r = transport.run([exe, "--version"], timeout=60, env=env)
    except (MvlmError, OSError):
        return {}
    m = _VERSION.search(r.output or "")
    if r.returncode != 0 or not m:
        return {}
    number, commit = (m[1], m[2]) if m[1] is not None else (m[3], m[4])
    return {"build_number": int(number), "build_commit": commit}


def gguf_facts(path: Path) -> dict[str, object]:
    """model_size (bytes of all tensors) and model_n_params (elements of all tensors) of a GGUF, as llama.cpp's
    loader sums them (llama_model_size / llama_model_n_params, which llama-bench prints); {} if unreadable."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        return {"model_size": int(sum(int(t.n_bytes) for t in reader.tensors)),
                "model_n_params": int(sum(int(t.n_elements) for t in reader.tensors))}
    except Exception:  # a file gguf-py cannot read: the report leaves these fields null
        return {}


@dataclasses.dataclass
class Prepared:
    """A side ready to run: the command line and environment on the device, and the context of its records."""

    side: Side
    profile: DeviceProfile
    argv: list[str]
    env: dict[str, str]
    ctx: RunContext
    pushed_bytes: int
    result: BenchResult
    facts: dict[str, object] = dataclasses.field(default_factory=dict)  # llama-bench fields known before the runs
    rss_notes: set[str] = dataclasses.field(default_factory=set)  # why a run's peak RSS is null (resources.py)


def _connect(profile: DeviceProfile, log: Callable[[str], None]):
    """Transport to the device, checked and probed; the profile with its target resolved from the probe."""
    from mvlm_bench.transports import make_transport

    if profile.target not in KNOWN_TARGETS:
        raise MvlmError(f"device {profile.name}: unknown target {profile.target!r}")
    transport = make_transport(profile)
    try:
        transport.check()
        info = transport.probe()
        resolved = resolve_target(profile, info)
    except BaseException:
        transport.close()
        raise
    if resolved.probe_target:
        log(f"{resolved.name} is {info.describe()}: using the {resolved.target} runtime")
    return transport, resolved


def _prepare(transport, profile: DeviceProfile, side: Side, log: Callable[[str], None], sync_progress=None,
             outputs: dict[str, Path] | None = None) -> Prepared:
    """Find the runtime, push this side's files (content-addressed), and build its command line and context."""
    from mvlm_bench.sync import sha256_file, sync
    from mvlm_core.atomic import check_output_path

    spec = protocol_spec(side.spec)
    rt = side.runtime
    if rt is None and side.llama_cpp is not None:
        try:
            rt = rtmod.find(profile.target, llama_cpp=side.llama_cpp)
        except MvlmError as e:
            who = f"the {side.name}'s" if side.name else "the"
            raise MvlmError(f"{who} llama.cpp checkout {side.llama_cpp}: {e}") from None
    if rt is None:
        try:
            rt = rtmod.find(profile.target)
        except MvlmError as e:
            raise MvlmError(f"no {profile.target} runtime for device {profile.name}: "
                            f"run `mvlm runtime build --target {profile.target}` first") from e
    files, names = artifacts(rt, spec)
    for option, out in (outputs or {}).items():
        check_output_path(out, files.values(), option=option)
    workdir = transport.workdir.rstrip("/")  # "~" resolved on the device
    if side.subdir:
        workdir = f"{workdir}/{side.subdir}"
    log(f"syncing {len(files)} files to {profile.name}:{workdir}")
    sres = sync(transport, workdir, files, progress=sync_progress)
    for note in sres.notes:
        log(note)
    precision = precision_of(spec.model)
    named = precision_from_filename(spec.model.name)
    if named not in ("unknown", precision):
        log(f"{spec.model.name}: the name says {named}, the file holds {precision} (general.file_type): "
            f"reported as {precision}")
    log(f"pushed {sres.pushed_bytes} bytes ({len(sres.pushed_files)} files), "
        f"{len(sres.skipped_files)} already on the device")
    argv = [*side.wrapper, *build_argv(profile, spec, workdir, names)]
    env = dict(profile.env)
    if rt.lib.is_dir() and "LD_LIBRARY_PATH" not in env:
        env["LD_LIBRARY_PATH"] = f"{workdir}/lib"
    manifest = rt.manifest
    params = {
        "n_threads": spec.threads or profile.threads,  # None: llama.cpp's default on the device (see the log)
        "n_predict": spec.tokens(),
        "n_gpu_layers": spec.n_gpu_layers if spec.n_gpu_layers is not None else profile.n_gpu_layers,
        "ctx_size": spec.ctx_size,
        "target": profile.target,
        "emulated": profile.emulated,
        "prompt": spec.prompt or (VLM_PROMPT if spec.protocol == "vlm" else LM_PROMPT),
        "image": names.get("image"),
    }
    params |= _protocol_params(spec)
    if side.name:
        params["ab_side"] = side.name
    ctx = RunContext(
        device=profile.name + (" (emulated)" if profile.emulated else ""),
        model=spec.model.stem,  # the real name (history --model finds it); the A/B side is params["ab_side"]
        precision=precision,
        model_file=spec.model.name,
        model_sha256=sha256_file(spec.model),
        mmproj_file=spec.mmproj.name if spec.mmproj else "",
        mmproj_sha256=sha256_file(spec.mmproj) if spec.mmproj else "",
        size_bytes=spec.model.stat().st_size + (spec.mmproj.stat().st_size if spec.mmproj else 0),
        runtime_commit=str(manifest.get("commit")),
        runtime_patches=[p["name"] for p in manifest.get("patches", [])],
        protocol=spec.protocol,
        cpu_info=device_cpu_info(transport),
        params=params,
    )
    result = BenchResult([], [], ctx, sres.pushed_bytes, commands=[argv])
    facts: dict[str, object] = {}
    if spec.protocol != "llama-bench":
        facts = {"build_commit": ctx.runtime_commit, **gguf_facts(spec.model), **COMMAND_LINE_DEFAULTS,
                 "n_gpu_layers": params["n_gpu_layers"], "n_threads": params["n_threads"]}
    return Prepared(side, profile, argv, env, ctx, sres.pushed_bytes, result, facts)


def protocol_spec(spec: BenchSpec) -> BenchSpec:
    """The spec as it runs: the imp protocol's request cut to 41 tokens of the model's tokenizer (mvlm_bench.imp)
    unless --prompt gave one."""
    if spec.protocol == "imp" and spec.prompt is None:
        from mvlm_bench.imp import imp_prompt

        return dataclasses.replace(spec, prompt=imp_prompt(spec.model))
    return spec


def _protocol_params(spec: BenchSpec) -> dict[str, object]:
    """Run parameters only some protocols have: imp's text-token count, dataset's question file."""
    if spec.protocol == "imp":
        from mvlm_bench.imp import count_tokens

        return {"n_text": count_tokens(spec.model, spec.prompt or "")}
    if spec.protocol == "dataset":
        from mvlm_bench import dataset
        from mvlm_bench.sync import sha256_file

        data = Path(spec.data)  # type: ignore[arg-type]
        return {"prompt": None, "image": None, "data": data.name, "data_sha256": sha256_file(data),
                "n_samples": len(dataset.load_samples(data))}
    return {}


def _add_version(transport, prep: Prepared) -> None:
    """After the measured runs (never between them): the build's own --version into every run's facts."""
    if not prep.result.runs:
        return
    version = build_version(transport, prep.argv[len(prep.side.wrapper)], prep.env)
    for run in prep.result.runs:
        run.facts.update(version)


class LiveTokens:
    """The generated-token count of a run while it streams (a progress line's "123/400 tokens"), for ``on_tokens``.

    The text a run has generated so far is what follows its last llama.cpp log line (``generate: ...`` for
    llama-completion, the image's decode line for llama-mtmd-cli); it is counted with the model's own tokenizer
    (llama.cpp's, vocab only, on this machine), less the echoed prompt. A count, not a guess: re-tokenizing the text
    can differ from the sampled ids by a token or two where a piece splits differently, and it is capped at -n. The
    figures in the report come from llama.cpp's own perf lines, never from here. Any trouble (no host runtime, an
    unreadable tokenizer) turns the count off, never the run."""

    _vocabs: dict[str, object] = {}

    def __init__(self, spec: BenchSpec, on_tokens: Callable[[int, int], None], prompt: str | None = None,
                 every_s: float = 0.2):
        self.spec, self.on_tokens, self.every_s = spec, on_tokens, every_s
        self.expected = spec.tokens()
        self.prompt = prompt or spec.prompt or (VLM_PROMPT if spec.protocol in IMAGE_PROTOCOLS else LM_PROMPT)
        self.out: list[str] = []
        self.last_t = 0.0
        self.last_n = -1
        self.off = spec.protocol in ("llama-bench", "dataset")

    def _count(self, text: str) -> int:
        key = str(self.spec.model)
        vocab = LiveTokens._vocabs.get(key)
        if vocab is None:
            import os
            import sys

            from mvlm_bench.imp import _vocab

            # llama.cpp's C code warns on stderr while it loads (n_ctx_train ...): not into the progress line
            sys.stderr.flush()
            saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, 2)
                vocab = LiveTokens._vocabs[key] = _vocab(Path(self.spec.model))
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                os.close(null)

        def n(t: str) -> int:
            return len(vocab.tokenize(t.encode("utf-8"), add_bos=False, special=False)) if t else 0  # type: ignore[attr-defined]

        total = n(text)
        if text.startswith(self.prompt):  # llama-completion echoes the prompt before the generated text
            total -= n(self.prompt)
        return max(0, min(total, self.expected))

    def feed(self, piece: str) -> None:
        if self.off:
            return
        self.out.append(piece)
        now = time.monotonic()
        if now - self.last_t < self.every_s:
            return
        self.last_t = now
        text = "".join(self.out)
        cut = 0
        for m in _LOG_LINE.finditer(text):
            cut = m.end()
        generated = "\n".join(ln for ln in text[cut:].split("\n") if not ln.startswith("\t")).lstrip("\n")
        try:
            count = self._count(generated)
        except Exception:  # noqa: BLE001 - the progress line loses its count, the run goes on
            self.off = True
            return
        if count != self.last_n:
            self.last_n = count
            self.on_tokens(count, self.expected)


# a whole llama.cpp log line ("0.00.218.341 I generate: ..."), as -lv 4 prints them (timestamp, level)
_LOG_LINE = re.compile(r"(?m)^\d+\.\d+\.\d+\.\d+ [A-Z] .*(?:\n|$)")


def _run_once(transport, prep: Prepared, index: int, measured: bool,
              on_tokens: Callable[[int, int], None] | None = None) -> bool:
    """One run of a prepared side; a measured run is parsed into ``prep.result``. False (failure kept) on error.
    ``on_tokens(generated, expected)``: the live token count while it runs (:class:`LiveTokens`)."""
    spec = prep.side.spec
    # on-device resources (resources.py, thermal.py): the temperature right before and after, the peak RSS of the
    # process itself; the start and end times bracket the run (the lease keeps other benches out of them)
    temp_start = thermal.read_celsius(transport) if measured else None
    t_start = time.time()
    prompt = prep.ctx.params.get("prompt")  # as it runs (imp: the 41-token request)
    stream = {"on_output": LiveTokens(spec, on_tokens, str(prompt) if prompt else None).feed} if on_tokens else {}
    r, rss_mb = resources.run_measured(transport, prep.argv, timeout=spec.timeout, env=prep.env, **stream)
    t_end = time.time()
    if measured and getattr(r, "rss_note", None):
        prep.rss_notes.add(r.rss_note)
    if r.returncode != 0 or r.timed_out:
        prep.result.failures.append(Failure(index, _describe_failure(r, spec.timeout), r.output[-4000:], r.output))
        return False
    if measured:
        rec = parse_text(r.output)
        # the local transport times the process itself; over ssh/adb the wall time includes the link, so the
        # report rebuilds Total from llama.cpp's own numbers instead
        wall = r.duration_s if prep.profile.transport == "local" else None
        prep.result.runs.append(Run(rec, prep.ctx, tokens_out=spec.tokens(), wall_s=wall,
                                    facts={**prep.facts, **run_facts(r.output)}, started_at=t_start, ended_at=t_end,
                                    peak_rss_mb=rss_mb, temp_start_c=temp_start,
                                    temp_end_c=thermal.read_celsius(transport)))
    return True


def run_bench(
    profile: DeviceProfile,
    spec: BenchSpec,
    log: Callable[[str], None] = lambda s: None,
    on_run: Callable[[int, int], None] | None = None,
    sync_progress=None,
    outputs: dict[str, Path] | None = None,
    runtime: rtmod.Runtime | None = None,
    lease_db: str | None = None,
    lease_timeout: float = leasemod.DEFAULT_TIMEOUT_S,
    on_wait: Callable[[str], None] | None = None,
    before_run: Callable[[object, int, int], None] | None = None,
    on_tokens: Callable[[int, int], None] | None = None,
) -> BenchResult:
    """Check, connect, probe, sync, warm up, run ``spec.repeat`` repetitions, parse each; failures are kept, not
    raised, once runs started. ``outputs`` (option -> report path) are refused if they are one of the pushed files.
    The push, the warm-up and the measured runs hold the device's lease (mvlm_bench.lease: ``lease_db``, the history
    location, picks its kind; ``on_wait`` hears whom it waits for), so another bench's push of a same-named file cannot
    replace the model mid-measurement, nor its I/O disturb one.

    Progress: ``on_run(i, total)`` before run i (the first ``spec.warmup`` are the warm-up), ``on_tokens(n, of)``
    while it generates (:class:`LiveTokens`). ``before_run(transport, i, total)``: called first, under the lease
    (mvlm_bench.sweep: ``--delay`` and the ``--max-temp`` wait); an MvlmError it raises ends the bench."""
    if spec.protocol == "dataset":
        raise MvlmError("the dataset protocol runs through mvlm_bench.dataset_run.run_dataset (one server for the set)")
    validate_spec(spec)
    check_inputs(spec)
    leasemod.check_timeout(lease_timeout)
    transport, profile = _connect(profile, log)
    held = contextlib.ExitStack()
    try:
        still_leased = _hold_lease(held, profile, lease_db, lease_timeout, on_wait, log)  # before the push: see
        prep = _prepare(transport, profile, Side(spec, runtime), log, sync_progress, outputs)  # docs/devices.md
        result = prep.result
        if spec.protocol == "llama-bench":
            r = transport.run(prep.argv, timeout=spec.timeout, env=prep.env)
            still_leased()
            if r.returncode != 0 or r.timed_out:
                result.failures.append(Failure(0, _describe_failure(r, spec.timeout), r.output[-4000:], r.output))
            else:
                result.llama_bench_rows = parse_llama_bench(r.output)
            return result
        total = spec.warmup + spec.repeat
        for i in range(total):
            measured = i >= spec.warmup
            if before_run:
                before_run(transport, i, total)
            if on_run:
                on_run(i, total)
            t0 = time.monotonic()
            if not _run_once(transport, prep, i - spec.warmup, measured, on_tokens):
                break
            still_leased()
            log(f"{run_label(i, spec.warmup, spec.repeat)} done in {time.monotonic() - t0:.1f} s")
        held.close()
        _resource_notes([prep], log)
        _add_version(transport, prep)
        return result
    finally:
        held.close()
        transport.close()


def run_label(i: int, warmup: int, repeat: int) -> str:
    """What run ``i`` of a bench is, in words: ``warm-up 1/1`` or ``run 2/3`` (measured runs counted apart)."""
    return f"warm-up {i + 1}/{warmup}" if i < warmup else f"run {i - warmup + 1}/{repeat}"


def _hold_lease(stack: contextlib.ExitStack, profile: DeviceProfile, db: str | None, timeout: float,
                on_wait: Callable[[str], None] | None, log: Callable[[str], None]) -> Callable[[], None]:
    """Take the device's lease into ``stack`` (released when it closes); waits up to ``timeout`` s, else MvlmError.
    Returns the check to call after each run: it raises (exit 3) when the lease was lost meanwhile (a PostgreSQL
    lease whose connection dropped: the server released it, so another bench may have measured at the same time)."""
    info = stack.enter_context(leasemod.profile_lease(profile, db, timeout, on_wait))
    if info["waited_s"] >= 1:
        log(f"waited {info['waited_s']:.0f} s for device {profile.name} (another bench was measuring on it)")
    return info["check"]


def _resource_notes(preps: list[Prepared], log: Callable[[str], None]) -> None:
    """Say once when the device gave no peak RSS or no temperature (the records then hold null)."""
    runs = [r for p in preps for r in p.result.runs]
    if not runs:
        return
    name = preps[0].profile.name
    if all(r.temp_start_c is None and r.temp_end_c is None for r in runs):
        log(f"device {name} has no readable thermal zone (/sys/class/thermal/thermal_zone*/temp): temperatures are null")
    if all(r.peak_rss_mb is None for r in runs):
        notes = {n for p in preps for n in p.rss_notes}
        log(f"device {name}: the llama.cpp process {sorted(notes)[0]}" if notes else
            f"device {name} gave no peak RSS (no /proc/PID/status VmHWM): peak_rss_mb is null")


@dataclasses.dataclass
class ABResult:
    """An interleaved session: the baseline's and the candidate's runs (pair i = ``runs[i]`` of each) and the order."""

    baseline: BenchResult
    candidate: BenchResult
    order: list[str]

    @property
    def failures(self) -> list[tuple[str, Failure]]:
        return [("baseline", f) for f in self.baseline.failures] + [("candidate", f) for f in self.candidate.failures]

    @property
    def runs(self) -> list[Run]:
        return self.baseline.runs + self.candidate.runs


def _pinned_if_none(profile: DeviceProfile, side: Side) -> rtmod.Runtime | None:
    """The side's build, where "none given" is the pinned build for the device's target (a baseline re-measured from
    the history names its cached build, which is often that very build: it need not be pushed twice)."""
    if side.runtime is not None or side.llama_cpp is not None:
        return side.runtime
    try:
        return rtmod.find(profile.target)
    except MvlmError:
        return None  # _prepare says what to do


def _same_runtime(a: rtmod.Runtime | None, b: rtmod.Runtime | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.root.resolve() == b.root.resolve()


def run_ab(
    profile: DeviceProfile,
    baseline: Side,
    candidate: Side,
    order: str = "abba",
    log: Callable[[str], None] = lambda s: None,
    on_run: Callable[[int, int, str], None] | None = None,
    sync_progress=None,
    outputs: dict[str, Path] | None = None,
    lease_db: str | None = None,
    lease_timeout: float = leasemod.DEFAULT_TIMEOUT_S,
    on_wait: Callable[[str], None] | None = None,
    before_run: Callable[[object, int, int], None] | None = None,
    on_tokens: Callable[[int, int], None] | None = None,
) -> ABResult:
    """Baseline (A) and candidate (B) on one device in one session, interleaved (``gate.interleave``: A B B A …).

    ``candidate.spec.repeat`` is the number of A/B pairs; each side first gets ``spec.warmup`` warm-up runs, also
    interleaved. When the two sides use different builds, the baseline's files go to a subdirectory of the device's
    workdir, so both builds are on the device at once. A failed run stops the session; completed pairs are kept.
    The device's lease is held from the push to the last measured run (see :func:`run_bench`).
    """
    from mvlm_bench import gate

    for side in (baseline, candidate):
        validate_spec(side.spec)
        check_inputs(side.spec)
        if side.spec.protocol in ("llama-bench", "dataset"):
            raise MvlmError("an interleaved A/B session runs the lm, vlm or imp protocol (llama-bench keeps its own "
                            "order; dataset runs a whole set through one server)")
    if baseline.spec.protocol != candidate.spec.protocol:
        raise MvlmError("both sides of an A/B session must run the same protocol")
    baseline = dataclasses.replace(baseline, name="baseline")
    candidate = dataclasses.replace(candidate, name="candidate")
    differs = baseline.llama_cpp != candidate.llama_cpp or \
        not _same_runtime(_pinned_if_none(profile, baseline), _pinned_if_none(profile, candidate))
    if differs and not baseline.subdir:
        tag = (baseline.runtime.manifest.get("key") or str(baseline.runtime.root)) if baseline.runtime else \
            str(baseline.llama_cpp or "pinned")
        import hashlib

        baseline = dataclasses.replace(baseline, subdir=f"ab/{hashlib.sha256(str(tag).encode()).hexdigest()[:12]}")
    n_pairs = candidate.spec.repeat
    warm = max(baseline.spec.warmup, candidate.spec.warmup)
    leasemod.check_timeout(lease_timeout)
    transport, profile = _connect(profile, log)
    held = contextlib.ExitStack()
    try:
        still_leased = _hold_lease(held, profile, lease_db, lease_timeout, on_wait, log)  # the push too (run_bench)
        preps = {"A": _prepare(transport, profile, baseline, log, sync_progress, outputs),
                 "B": _prepare(transport, profile, candidate, log, sync_progress, outputs)}
        seq = gate.interleave(warm, "abba") + gate.interleave(n_pairs, order)
        total = len(seq)
        index = {"A": 0, "B": 0}
        for i, who in enumerate(seq):
            measured = i >= 2 * warm
            if before_run:  # --delay / --max-temp (mvlm_bench.sweep.Pacer), as in run_bench
                before_run(transport, i, total)
            if on_run:
                on_run(i, total, who)
            t0 = time.monotonic()
            rep = index[who] - warm
            if not _run_once(transport, preps[who], rep, measured, on_tokens):
                break
            still_leased()
            index[who] += 1
            name = "baseline" if who == "A" else "candidate"
            log(f"{run_label(i, 2 * warm, 2 * n_pairs)} {name} done in {time.monotonic() - t0:.1f} s")
        held.close()
        _resource_notes(list(preps.values()), log)
        for prep in preps.values():
            _add_version(transport, prep)
        a, b = preps["A"].result, preps["B"].result
        n = min(len(a.runs), len(b.runs))  # complete pairs only
        del a.runs[n:], b.runs[n:]
        return ABResult(a, b, seq[2 * warm:2 * warm + 2 * n])
    finally:
        held.close()
        transport.close()


def _describe_failure(r, timeout: float) -> str:
    if r.timed_out:
        return f"timed out after {timeout:.0f} s"
    if getattr(r, "signal", None) == 4:
        return ("killed by signal 4 (SIGILL: the binary uses an instruction this CPU does not run; host builds are "
                "-march=native: build the runtime on this CPU)")
    if getattr(r, "signal", None):
        return f"killed by signal {r.signal} (crash?)"
    return f"exited with status {r.returncode}"

