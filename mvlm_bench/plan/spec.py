"""A configuration (:class:`BenchSpec`: protocol, files, numbers) and one side of a measurement (:class:`Side`: a
configuration with its build), checked before anything is pushed: numbers in range (:func:`validate_spec`), files
that exist and are what they claim (:func:`check_inputs`). Each refusal is one line naming the option as written."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from mvlm_bench.device.profiles import MAX_GPU_LAYERS, MAX_THREADS
from mvlm_bench.plan.engine import BenchTests, check_settings
from mvlm_bench.plan.protocols import IMAGE_PROTOCOLS, MAX_N, PROMPT_ROOM, PROTOCOLS, tokens
from mvlm_core import runtime as rtmod
from mvlm_core.errors import MvlmError
from mvlm_core.filenames import check_name_length
from mvlm_core.gguf_header import check_gguf
from mvlm_core.images import check_image_file

MAX_REPEAT = 1000
MAX_WARMUP = 100
MAX_TIMEOUT_S = 7 * 24 * 3600.0
MIN_CTX = 64
MAX_CTX = 131072  # beyond what these small models train on


@dataclasses.dataclass
class BenchSpec:
    protocol: str
    model: Path
    mmproj: Path | None = None
    image: Path | None = None
    repeat: int = 5
    warmup: int = 1
    n_predict: int | None = None
    threads: int | None = None
    n_gpu_layers: int | None = None
    timeout: float = 900.0
    ctx_size: int = 2048
    prompt: str | None = None
    data: Path | None = None  # the dataset protocol's question file
    # llama.cpp's own settings (mvlm_bench.plan.engine; None: the program's default), in llama-bench's encoding
    batch: int | None = None
    ubatch: int | None = None
    flash_attn: int | None = None  # 1 on, 0 off, -1 auto
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    cpu_mask: str | None = None
    cpu_strict: bool | None = None
    poll: int | None = None
    prio: int | None = None
    tests: BenchTests | None = None  # the llama-bench protocol's tests (-p, -n, -pg, -d); None: llama-bench's default

    def tokens(self) -> int:
        return tokens(self)


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



def validate_spec(spec: BenchSpec, against: tuple[str, ...] | list[str] | set[str] = (), ctx_option: bool = False) -> None:
    """Refuse nonsensical numbers and unknown protocols (one line each) before anything is pushed or measured.

    ``against``: the ``--against`` keys (threads, n-gpu-layers, ctx-size) that set this spec's values, so that an error
    names ``--against threads=0``, what the user wrote, rather than ``--threads``; ``ctx_option``: the context size came
    from ``--ctx-size`` (mvlm_bench.plan.sweep), so errors name that option."""
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
    bounded("--n-gpu-layers", spec.n_gpu_layers, -1, MAX_GPU_LAYERS)  # -1: llama.cpp's auto (llama-bench's default)
    check_settings(spec)
    if spec.tests is not None and spec.protocol != "llama-bench":
        raise MvlmError(f"-p, -pg and -d shape llama-bench's tests (--protocol llama-bench); the {spec.protocol} "
                        "protocol's prompt text is --prompt, its output tokens -n")
    if not (isinstance(spec.timeout, int | float) and math.isfinite(spec.timeout) and 0 < spec.timeout <= MAX_TIMEOUT_S):
        raise MvlmError(f"--timeout {spec.timeout} is out of range: give seconds, more than 0 and at most {MAX_TIMEOUT_S:.0f}")


def check_inputs(spec: BenchSpec, against: tuple[str, ...] | list[str] | set[str] = (),
                 needs_template: bool = True) -> None:
    """The model (and mmproj, image, question file) exist and are what they claim, checked here before anything goes
    to a device: each GGUF's header read by the one bounded reader (:mod:`mvlm_core.gguf_header`: a crafted or
    unsupported header is one line, never an allocation of what it claims), the model a language model and not an
    mmproj, the mmproj a CLIP/SigLIP one, tensor data complete.

    ``against``: the ``--against`` keys (model, mmproj) that set these paths; errors then name ``--against model=X``.
    ``needs_template``: the image protocols run llama-mtmd-cli, which stops at once on a model without a chat template
    ("Model does not have chat template.", whatever -p says), so such a model is refused here; False for callers that
    run llama-server, which falls back to its own default template (mvlm serve)."""
    def named(option: str) -> str:
        key = option.lstrip("-")
        return f"--against {key}=" if key in against else option

    for option, path in (("--model", spec.model), ("--mmproj", spec.mmproj), ("--image", spec.image)):
        if path is not None:  # pushed under its own name (and a temporary one beside it) to the device
            check_name_length(Path(path).name, f"{named(option).rstrip('=')} file name")
    if spec.protocol == "llama-bench" and "," in Path(spec.model).name:
        raise MvlmError(f"{named('--model')} {spec.model}: llama-bench splits -m on commas, so it cannot load a file "
                        "whose name has one: rename the file")
    model = check_gguf(Path(spec.model), named("--model"), "lm")
    _check_data(spec)
    if spec.protocol in IMAGE_PROTOCOLS:
        if spec.mmproj is None:
            raise MvlmError(f"the {spec.protocol} protocol needs --mmproj FILE (the mmproj-*.gguf written by mvlm convert)")
        check_gguf(Path(spec.mmproj), named("--mmproj"), "mmproj")
        if Path(spec.model).resolve() == Path(spec.mmproj).resolve():
            raise MvlmError("--model and --mmproj are the same file: give the LM GGUF and its mmproj GGUF")
        if needs_template and spec.protocol in ("vlm", "imp") and not model.has_chat_template:
            raise MvlmError(f"{named('--model')} {spec.model} has no chat template (tokenizer.chat_template), and "
                            f"llama-mtmd-cli refuses an image prompt without one (--prompt text goes through the "
                            f"template too): convert the model again with `mvlm convert` from a checkpoint whose "
                            f"tokenizer_config.json has a chat_template (MobileVLM, LLaVA-1.5, Xmodel-VLM and Imp v1 "
                            f"get one written), or bench it with --protocol lm")
        if spec.image is not None:
            check_image_file(Path(spec.image))


def _check_data(spec: BenchSpec) -> None:
    if spec.protocol == "dataset":
        from mvlm_bench.plan import dataset

        if spec.data is None:
            raise MvlmError("the dataset protocol needs --data FILE.jsonl (one {\"question_id\", \"image\", \"text\"} "
                            "object per line, image paths relative to the file)")
        for option, value in (("--image", spec.image), ("--prompt", spec.prompt)):
            if value is not None:
                raise MvlmError(f"{option} is not used by the dataset protocol: each sample of --data brings its own")
        dataset.load_samples(Path(spec.data))
    elif spec.data is not None:
        raise MvlmError(f"--data is for the dataset protocol, not {spec.protocol}: add --protocol dataset")



def device_settings(profile, spec: BenchSpec) -> tuple[int | None, int]:
    """(threads, GPU layers) a configuration runs with on a device: --threads, else the profile's (a local profile's
    default is this machine's core count); else None, so no ``-t`` at all and llama.cpp picks its own default on the
    device (never this machine's core count: the run's log says what it used). GPU layers: --n-gpu-layers, else the
    profile's."""
    threads = spec.threads or profile.threads
    ngl = spec.n_gpu_layers if spec.n_gpu_layers is not None else profile.n_gpu_layers
    return threads, ngl
