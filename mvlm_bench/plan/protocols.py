"""The papers' latency protocols: what each runs on the device, with which files, and its bounds.

- ``lm``: ``llama-completion -no-cnv`` on "Building a website can be done in 10 simple steps:\\nStep 1:", 400 output
  tokens, greedy.
- ``vlm``: ``llama-mtmd-cli`` on a 336x336 image + "What is in the picture?", 256 output tokens, greedy, with the
  model's own chat template (the one ``mvlm convert`` writes into the GGUF).
- ``imp`` (Imp Table 4): ``llama-mtmd-cli`` as ``vlm``, with a fixed request cut to exactly 41 tokens of the model's
  own tokenizer (:mod:`mvlm_bench.plan.imp_prompt`) and 64 output tokens; its figures exclude model loading.
- ``dataset`` (Xmodel-VLM Table 6): a whole question file (``--data FILE.jsonl``) through one ``llama-server`` that
  loads the model once (:mod:`mvlm_bench.plan.dataset`).
- ``llama-bench``: llama.cpp's own tests (``-p``, ``-n``, ``-pg``, ``-d`` as llama-bench takes them, its defaults
  ``-p 512 -n 128``), one llama-bench process per repetition (``-r 1``), each test of it one record (its
  configuration's ``test``: pp512, tg128, pp512+tg128, pp512@d1024), so a repetition is kept the moment it ends, like
  the others'.

``--jinja`` makes llama-mtmd-cli render the GGUF's own chat template (MobileVLM's "v1" format, written by
``mvlm convert``). mvlm's runtime renders the same without it (patch 0005); the flag keeps a stock llama.cpp build
(``--llama-cpp DIR``) on the trained format too, where the built-in fallback would drop the system prompt.

Both generating protocols pass ``--ignore-eos`` so every run produces exactly the requested number of tokens (a small
or quantized model that stops early would otherwise report a different workload), and ``-lv 4`` because current
llama.cpp hides the perf block without it. One warm-up run (page cache, CPU clocks) precedes the measured repetitions.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mvlm_core import runtime as rtmod
from mvlm_core.errors import MvlmError

LM_PROMPT = "Building a website can be done in 10 simple steps:\nStep 1:"
VLM_PROMPT = "What is in the picture?"
PROTOCOLS = ("lm", "vlm", "llama-bench", "imp", "dataset")
IMAGE_PROTOCOLS = ("vlm", "imp", "dataset")  # need --mmproj
DEFAULT_N = {"lm": 400, "vlm": 256, "llama-bench": 128, "imp": 64, "dataset": 128}
# Bounds of the numeric options. lm/vlm run with a 2048-token context shared by the prompt (and the image's 144..576
# tokens); llama.cpp stops, rather than fails, when it is full, so a larger -n would measure fewer tokens than asked.
MAX_N = {"lm": 1536, "vlm": 1024, "llama-bench": 8192, "imp": 1024, "dataset": 1024}
# The context (-c) must hold the prompt (and the image's up to 576 tokens) and every generated token: a smaller one
# makes llama.cpp abort ("failed to add token") rather than measure. imp: up to 729 image tokens (Imp-3B@384) + 41
# text tokens + the chat template; dataset: 576 image tokens + a ScienceQA question with its context and choices.
PROMPT_ROOM = {"lm": 64, "vlm": 640, "llama-bench": 0, "imp": 900, "dataset": 1024}
PROGRAMS = {"lm": "llama-completion", "vlm": "llama-mtmd-cli", "imp": "llama-mtmd-cli", "dataset": "llama-server",
            "llama-bench": "llama-bench"}


def tokens(spec: Any) -> int:
    """Output tokens of a configuration: ``-n``, else the protocol's default."""
    return spec.n_predict if spec.n_predict is not None else DEFAULT_N[spec.protocol]


def prompt_of(spec: Any) -> str:
    """The prompt a configuration runs (``--prompt``, else the protocol's)."""
    return spec.prompt or (VLM_PROMPT if spec.protocol in IMAGE_PROTOCOLS else LM_PROMPT)


def build_argv(spec: Any, workdir: str, names: dict[str, str], threads: int | None, ngl: int) -> list[str]:
    """The command line run on the device for one repetition (paths are the device's). ``threads`` None: no ``-t`` at
    all, so llama.cpp picks its own default on the device (the run's log says what it used). llama.cpp's own settings
    that the configuration sets (``-b``, ``-fa``, ``-ctk``, ...: mvlm_bench.plan.engine) reach every program alike.
    The transport adds the profile's exec_wrapper (e.g. qemu-aarch64-static)."""
    from mvlm_bench.plan import engine

    t_args = ["-t", str(threads)] if threads else []
    settings = engine.argv(spec)
    wd = workdir.rstrip("/")
    model = f"{wd}/models/{names['model']}"
    exe = f"{wd}/bin/{PROGRAMS[spec.protocol]}"
    n = str(tokens(spec))
    if spec.protocol == "lm":
        return [exe, "-m", model, "-p", prompt_of(spec), "-n", n, "-no-cnv", "--temp", "0", "--seed", "0",
                "--ignore-eos", "-c", str(spec.ctx_size), *t_args, "-ngl", str(ngl), *settings, "-lv", "4"]
    if spec.protocol in ("vlm", "imp"):  # imp: the 41-token request (with_protocol_prompt) and -n 64
        return [exe, "-m", model, "--mmproj", f"{wd}/models/{names['mmproj']}", "--image", f"{wd}/images/{names['image']}",
                "-p", prompt_of(spec), "-n", n, "--temp", "0", "--seed", "0", "--ignore-eos", "-c", str(spec.ctx_size),
                *t_args, "-ngl", str(ngl), *settings, "-lv", "4", "--jinja"]
    if spec.protocol == "dataset":
        # llama-server for the whole set: the GGUF's template, the pushed images as file:// media, one slot, on the
        # device's 127.0.0.1 at a port it picks and prints ("listening on ...")
        from mvlm_bench.plan.dataset import DEVICE_DIR

        return [exe, "-m", model, "--mmproj", f"{wd}/models/{names['mmproj']}", "--jinja", "--media-path",
                f"{wd}/{DEVICE_DIR}/", "--host", "127.0.0.1", "--port", "0", "-np", "1", "-c", str(spec.ctx_size),
                *t_args, "-ngl", str(ngl), *settings, "--no-webui", "-lv", "4"]
    if spec.protocol == "llama-bench":  # one repetition: every test once (-r 1), a JSON line per test
        tests = spec.tests or engine.BenchTests()
        return [exe, "-m", model, *tests.argv(), "-r", "1", *t_args, "-ngl", str(ngl), *settings, "-o", "jsonl"]
    raise MvlmError(f"unknown protocol {spec.protocol!r}: choose one of {', '.join(PROTOCOLS)}")


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


def runtime_files(rt: rtmod.Runtime, programs: list[str]) -> dict[str, Path]:
    """A build's files for a device (device-relative path -> local file): the programs and every library once."""
    files = {f"bin/{b}": rt.exe(b) for b in programs}
    if rt.lib.is_dir():
        files.update({f"lib/{name}": real for name, real in runtime_libraries(rt.lib).items()})
    return files


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
        from mvlm_core.atomic import temporary_for

        tmp = temporary_for(out)
        Image.fromarray(img.clip(0, 255).astype("uint8")).save(tmp, format="PNG")
        tmp.replace(out)
    return out


def artifacts(rt: rtmod.Runtime, spec: Any) -> tuple[dict[str, Path], dict[str, str]]:
    """Files to push (device-relative path -> local path) and the device-side names of model/mmproj/image."""
    files = runtime_files(rt, [PROGRAMS[spec.protocol]])
    names = {"model": spec.model.name}
    files[f"models/{spec.model.name}"] = spec.model
    if spec.protocol in IMAGE_PROTOCOLS:
        if spec.mmproj is None:
            raise MvlmError(f"the {spec.protocol} protocol needs --mmproj FILE (the mmproj-*.gguf written by mvlm convert)")
        # an mmproj named like the model (two directories, one file name) gets a directory of its own on the device:
        # one device path for both would have the second push replace the first
        names["mmproj"] = spec.mmproj.name if spec.mmproj.name != spec.model.name else f"mmproj/{spec.mmproj.name}"
        files[f"models/{names['mmproj']}"] = spec.mmproj
    if spec.protocol == "dataset":
        from mvlm_bench.plan import dataset

        files.update(dataset.files(dataset.load_samples(Path(spec.data))))
    elif spec.protocol in IMAGE_PROTOCOLS:
        image = spec.image or default_image()
        names["image"] = image.name
        files[f"images/{image.name}"] = image
    for rel, p in files.items():
        if not Path(p).is_file():
            raise MvlmError(f"{p} does not exist (needed on the device as {rel})")
    return files, names


def protocol_params(spec: Any) -> dict[str, Any]:
    """Run parameters only some protocols have: imp's text-token count, dataset's question file, llama-bench's tests."""
    if spec.protocol == "imp":
        from mvlm_bench.plan.imp_prompt import count_tokens

        return {"n_text": count_tokens(spec.model, spec.prompt or "")}
    if spec.protocol == "dataset":
        from mvlm_bench.device.sync import sha256_file
        from mvlm_bench.plan import dataset

        data = Path(spec.data)
        return {"prompt": None, "image": None, "data": data.name, "data_sha256": sha256_file(data),
                "n_samples": len(dataset.load_samples(data))}
    if spec.protocol == "llama-bench":
        return {"prompt": None, "image": None}
    return {}
