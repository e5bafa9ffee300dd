"""The papers' latency protocols, run on a device: sync the runtime and models, run, parse, collect.

Protocols (MobileVLM / MobileVLM V2, see ../shared/DESIGN.md §6):

- ``lm``: ``llama-completion -no-cnv`` on "Building a website can be done in 10 simple steps:\\nStep 1:", 400 output
  tokens, greedy.
- ``vlm``: ``llama-mtmd-cli`` on a 336x336 image + "What is in the picture?", 256 output tokens, greedy, with the
  model's own chat template (the one ``mvlm convert`` writes into the GGUF).
- ``llama-bench``: llama.cpp's own pp/tg sweep, its JSON rows kept as they are.

``--jinja`` makes llama-mtmd-cli render the GGUF's own chat template (MobileVLM's "v1" format, written by
``mvlm convert``). mvlm's runtime renders the same without it (patch 0005); the flag keeps a stock llama.cpp build
(``--llama-cpp DIR``) on the trained format too, where the built-in fallback would drop the system prompt.

Both generating protocols pass ``--ignore-eos`` so every run produces exactly the requested number of tokens (a small
or quantized model that stops early would otherwise report a different workload), and ``-lv 4`` because current
llama.cpp hides the perf block without it. One warm-up run (page cache, CPU clocks) precedes the measured repetitions.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

from mvlm_bench import runtime as rtmod
from mvlm_bench.devices import DeviceProfile
from mvlm_bench.report import Run, RunContext
from mvlm_bench.timings import parse_llama_bench, parse_text
from mvlm_convert.errors import MvlmError

LM_PROMPT = "Building a website can be done in 10 simple steps:\nStep 1:"
VLM_PROMPT = "What is in the picture?"
PROTOCOLS = ("lm", "vlm", "llama-bench")
DEFAULT_N = {"lm": 400, "vlm": 256, "llama-bench": 128}


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

    def tokens(self) -> int:
        return self.n_predict if self.n_predict is not None else DEFAULT_N[self.protocol]


@dataclasses.dataclass
class Failure:
    repetition: int
    message: str
    output_tail: str


@dataclasses.dataclass
class BenchResult:
    runs: list[Run]
    failures: list[Failure]
    context: RunContext
    pushed_bytes: int
    llama_bench_rows: list[dict] = dataclasses.field(default_factory=list)
    commands: list[list[str]] = dataclasses.field(default_factory=list)


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
    """The command line run on the device for one repetition (paths are the device's)."""
    threads = spec.threads or profile.threads or os.cpu_count() or 1
    ngl = spec.n_gpu_layers if spec.n_gpu_layers is not None else profile.n_gpu_layers
    wd = workdir.rstrip("/")
    model = f"{wd}/models/{names['model']}"
    if spec.protocol == "lm":
        argv = [f"{wd}/bin/llama-completion", "-m", model, "-p", spec.prompt or LM_PROMPT, "-n", str(spec.tokens()),
                "-no-cnv", "--temp", "0", "--seed", "0", "--ignore-eos", "-c", str(spec.ctx_size),
                "-t", str(threads), "-ngl", str(ngl), "-lv", "4"]
    elif spec.protocol == "vlm":
        argv = [f"{wd}/bin/llama-mtmd-cli", "-m", model, "--mmproj", f"{wd}/models/{names['mmproj']}",
                "--image", f"{wd}/images/{names['image']}", "-p", spec.prompt or VLM_PROMPT, "-n", str(spec.tokens()),
                "--temp", "0", "--seed", "0", "--ignore-eos", "-c", str(spec.ctx_size), "-t", str(threads),
                "-ngl", str(ngl), "-lv", "4", "--jinja"]
    elif spec.protocol == "llama-bench":
        argv = [f"{wd}/bin/llama-bench", "-m", model, "-p", "64,128", "-n", str(spec.tokens()), "-r", str(spec.repeat),
                "-t", str(threads), "-ngl", str(ngl), "-o", "json"]
    else:
        raise MvlmError(f"unknown protocol {spec.protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    return argv  # the transport adds the profile's exec_wrapper (e.g. qemu-aarch64-static)


def artifacts(rt: rtmod.Runtime, spec: BenchSpec) -> tuple[dict[str, Path], dict[str, str]]:
    """Files to push (device-relative path -> local path) and the device-side names of model/mmproj/image."""
    files: dict[str, Path] = {}
    need = {"lm": ["llama-completion"], "vlm": ["llama-mtmd-cli"], "llama-bench": ["llama-bench"]}[spec.protocol]
    for b in need:
        files[f"bin/{b}"] = rt.exe(b)
    if rt.lib.is_dir():
        for so in sorted(rt.lib.iterdir()):
            files[f"lib/{so.name}"] = so.resolve()
    names = {"model": spec.model.name}
    files[f"models/{spec.model.name}"] = spec.model
    if spec.protocol == "vlm":
        if spec.mmproj is None:
            raise MvlmError("the vlm protocol needs --mmproj FILE (the mmproj-*.gguf written by mvlm convert)")
        image = spec.image or default_image()
        names["mmproj"], names["image"] = spec.mmproj.name, image.name
        files[f"models/{spec.mmproj.name}"] = spec.mmproj
        files[f"images/{image.name}"] = image
    for rel, p in files.items():
        if not Path(p).is_file():
            raise MvlmError(f"{p} does not exist (needed on the device as {rel})")
    return files, names


def run_bench(
    profile: DeviceProfile,
    spec: BenchSpec,
    log: Callable[[str], None] = lambda s: None,
    on_run: Callable[[int, int], None] | None = None,
    sync_progress=None,
) -> BenchResult:
    """Sync, warm up, run ``spec.repeat`` repetitions, parse each; failures are kept, not raised, once runs started."""
    from mvlm_bench.sync import sha256_file, sync
    from mvlm_bench.transports import make_transport

    if spec.protocol not in PROTOCOLS:
        raise MvlmError(f"unknown protocol {spec.protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    if spec.repeat < 1:
        raise MvlmError("--repeat must be at least 1")
    try:
        rt = rtmod.find(profile.target)
    except MvlmError as e:
        raise MvlmError(f"no {profile.target} runtime for device {profile.name}: "
                        f"run `mvlm runtime build --target {profile.target}` first") from e
    files, names = artifacts(rt, spec)
    transport = make_transport(profile)
    try:
        transport.check()
        workdir = transport.workdir  # "~" resolved on the device
        log(f"syncing {len(files)} files to {profile.name}:{workdir}")
        sres = sync(transport, workdir, files, progress=sync_progress)
        log(f"pushed {sres.pushed_bytes} bytes ({len(sres.pushed_files)} files), "
            f"{len(sres.skipped_files)} already on the device")
        argv = build_argv(profile, spec, workdir, names)
        env = dict(profile.env)
        if rt.lib.is_dir() and "LD_LIBRARY_PATH" not in env:
            env["LD_LIBRARY_PATH"] = f"{workdir.rstrip('/')}/lib"
        manifest = rt.manifest
        ctx = RunContext(
            device=profile.name + (" (emulated)" if profile.emulated else ""),
            model=spec.model.stem,
            precision=_precision(spec.model.name),
            model_file=spec.model.name,
            model_sha256=sha256_file(spec.model),
            mmproj_file=spec.mmproj.name if spec.mmproj else "",
            mmproj_sha256=sha256_file(spec.mmproj) if spec.mmproj else "",
            size_bytes=spec.model.stat().st_size + (spec.mmproj.stat().st_size if spec.mmproj else 0),
            runtime_commit=str(manifest.get("commit")),
            runtime_patches=[p["name"] for p in manifest.get("patches", [])],
            protocol=spec.protocol,
            params={
                "n_threads": spec.threads or profile.threads or os.cpu_count(),
                "n_predict": spec.tokens(),
                "n_gpu_layers": spec.n_gpu_layers if spec.n_gpu_layers is not None else profile.n_gpu_layers,
                "ctx_size": spec.ctx_size,
                "target": profile.target,
                "emulated": profile.emulated,
                "prompt": spec.prompt or (VLM_PROMPT if spec.protocol == "vlm" else LM_PROMPT),
                "image": names.get("image"),
            },
        )
        result = BenchResult([], [], ctx, sres.pushed_bytes, commands=[argv])
        if spec.protocol == "llama-bench":
            r = transport.run(argv, timeout=spec.timeout, env=env)
            if r.returncode != 0 or r.timed_out:
                result.failures.append(Failure(0, _describe_failure(r, spec.timeout), r.output[-4000:]))
            else:
                result.llama_bench_rows = parse_llama_bench(r.output)
            return result
        total = spec.warmup + spec.repeat
        for i in range(total):
            measured = i >= spec.warmup
            if on_run:
                on_run(i, total)
            t0 = time.monotonic()
            r = transport.run(argv, timeout=spec.timeout, env=env)
            if r.returncode != 0 or r.timed_out:
                result.failures.append(Failure(i - spec.warmup, _describe_failure(r, spec.timeout), r.output[-4000:]))
                break
            if measured:
                rec = parse_text(r.output)
                # the local transport times the process itself; over ssh/adb the wall time includes the link, so the
                # report rebuilds Total from llama.cpp's own numbers instead
                wall = r.duration_s if profile.transport == "local" else None
                result.runs.append(Run(rec, ctx, tokens_out=spec.tokens(), wall_s=wall))
            log(f"run {i + 1}/{total} {'(warm-up) ' if not measured else ''}done in {time.monotonic() - t0:.1f} s")
        return result
    finally:
        transport.close()


def _describe_failure(r, timeout: float) -> str:
    if r.timed_out:
        return f"timed out after {timeout:.0f} s"
    if getattr(r, "signal", None):
        return f"killed by signal {r.signal} (crash?)"
    return f"exited with status {r.returncode}"


def _precision(filename: str) -> str:
    import re

    m = re.search(r"[-.](F32|F16|BF16|Q\d\w*|IQ\d\w*)\.gguf$", filename, re.I)
    return m.group(1).lower() if m else "unknown"
