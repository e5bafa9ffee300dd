"""``mvlm runtime build|path|info|env``: the pinned, patched llama.cpp for a target (``check``: runtime_check_cli)."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mvlm_core import runtime as rtmod
from mvlm_core.console import console as make_console
from mvlm_core.errors import MvlmError

app = typer.Typer(no_args_is_help=True)
console = make_console(stderr=True)

TARGET_HELP = "host (this machine; used by tests and verify), cuda (this machine's NVIDIA GPU: CUDA, shared " \
              "libraries, --cuda-arch), linux-arm64 (static, Debian cross gcc), android-arm64 (NDK, else Debian " \
              "cross gcc), orin (CUDA sm_87)."
VARIANT_HELP = ("The CPU variant: linux-arm64/android-arm64 armv8.0, dotprod (default: Armv8.2 dotprod+fp16) or i8mm "
                "(+ int8 matrix multiply), dotprod+kleidiai or i8mm+kleidiai (+ Arm's KleidiAI kernels); host native "
                "(default) or generic (x86-64, no AVX). docs/runtime.md.")


@app.command("build")
def build_cmd(
    target: str = typer.Option("host", "--target", help=TARGET_HELP),
    llama_cpp: Path | None = typer.Option(
        None, "--llama-cpp", help="Build this llama.cpp checkout instead of the pinned one (e.g. to bisect)."
    ),
    ndk: Path | None = typer.Option(None, "--ndk", help="Android NDK dir (default: $ANDROID_NDK_HOME)."),
    toolchain: Path | None = typer.Option(None, "--toolchain", help="A CMake toolchain file for a cross build."),
    device: str | None = typer.Option(
        None, "--device", help="Build natively on this device (profile name or ssh://...); for orin."
    ),
    jobs: int | None = typer.Option(None, "--jobs", "-j", help="Parallel compile jobs (default: all cores)."),
    cuda_arch: str | None = typer.Option(
        None, "--cuda-arch", help="--target cuda: the GPU architectures to compile for, e.g. 90 (H100/H200), 89 (L4, "
                                  "RTX 40xx), 86, 80 (A100), several as 80;90 (default: this machine's GPUs, from "
                                  "nvidia-smi)."),
    cpu_variant: str | None = typer.Option(
        None, "--cpu-variant", help=VARIANT_HELP + " 'all': every variant of the target, one build each (the KleidiAI "
                                    "ones with --kleidiai-src)."),
    kleidiai_src: Path | None = typer.Option(
        None, "--kleidiai-src", envvar="MVLM_KLEIDIAI_SRC", help="A +kleidiai variant: the source tree of the KleidiAI "
        "release the pinned llama.cpp names (v1.24.0); without it CMake downloads it from GitHub while configuring."),
    json_: bool = typer.Option(False, "--json", help="Print the build manifest as JSON on stdout."),
) -> None:
    """Build llama.cpp (pinned source + the project's patches) for TARGET, or find it in the cache.

    Only the tools mvlm needs are built: llama-completion, llama-mtmd-cli, llama-bench, llama-quantize,
    llama-perplexity, mvlm-dump (+ shared libraries for host and cuda, which the Python bindings load). Cached by
    (source, patches, target, options; for cuda also the nvcc release): a second build with nothing changed returns
    at once.
    """
    if device and (target == "cuda" or cuda_arch):
        raise MvlmError("the cuda target is built on the machine that has the GPU: run `mvlm runtime build --target "
                        "cuda` there (--device builds the orin target on a Jetson)")
    if device and cpu_variant:
        raise MvlmError("--cpu-variant is for the builds made here (linux-arm64, android-arm64, host); a build on a "
                        "device (--device) is compiled for that device's own CPU")
    if device:
        from mvlm_bench.session.remote_build import build_on_device

        rt_root, manifest = build_on_device(device, target, llama_cpp=llama_cpp, jobs=jobs, console=console)
        if json_:
            print(json.dumps(manifest, indent=2))
        else:
            console.print(f"built on {device}: {rt_root}")
        return
    from mvlm_core import cpu_variants

    if cpu_variant == "all":
        names = [v.name for v in cpu_variants.variants_for(target) if kleidiai_src or not v.optional]
        if not names:
            cpu_variants.get(target, "all")  # the one line: this target has one build
    else:
        names = [cpu_variant]
    if kleidiai_src is not None:  # checked before any build: never after three others
        if not any(n and cpu_variants.kleidiai_of(n) for n in names):
            if "--kleidiai-src" in " ".join(sys.argv):  # (from $MVLM_KLEIDIAI_SRC it simply does not apply)
                raise MvlmError("--kleidiai-src is for the KleidiAI variants: add --cpu-variant i8mm+kleidiai (or "
                                "dotprod+kleidiai, or all)")
            kleidiai_src = None
        else:
            rtmod.kleidiai_version(kleidiai_src)
    manifests = []
    try:
        for name in names:
            src = kleidiai_src if name and cpu_variants.kleidiai_of(name) else None
            opts = rtmod.BuildOptions(target=target, ndk=ndk, toolchain=toolchain, jobs=jobs, cuda_arch=cuda_arch,
                                      cpu_variant=name, kleidiai_src=src)
            manifests.append(_build_one(opts, target, llama_cpp, json_))
    finally:  # the builds that finished are printed even when a later one fails
        if json_ and manifests:
            print(json.dumps(manifests[0] if cpu_variant != "all" else manifests, indent=2))


def _build_one(opts: rtmod.BuildOptions, target: str, llama_cpp: Path | None, json_: bool) -> dict:
    t0 = time.monotonic()
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=json_ or not console.is_terminal,  # a log gets no bar (nor its blank line)
    ) as prog:
        task = prog.add_task(f"llama.cpp {target}" + (f" ({opts.cpu_variant})" if opts.cpu_variant else ""),
                             total=None)

        def progress(done: int, total: int, line: str) -> None:
            prog.update(task, completed=done, total=total)

        def log(msg: str) -> None:
            prog.console.print(f"[dim]{msg}[/]")

        rt = rtmod.build(opts, llama_cpp=llama_cpp, progress=progress, log=log)
    dt = time.monotonic() - t0
    if json_:
        return {**rt.manifest, "root": str(rt.root), "cached": rt.cached}
    patches = ", ".join(f"{p['name']} ({p['status']})" for p in rt.manifest.get("patches", [])) or "none"
    state = f"cached, {dt:.2f} s" if rt.cached else f"built in {dt:.0f} s"
    variant = rtmod.variant_of(rt.manifest)
    console.print(f"[green]{target} runtime ready[/]" + (f" (CPU variant {variant})" if variant else "") +
                  f" ({state}): {rt.root}")
    console.print(f"  llama.cpp {rt.manifest.get('commit')}  patches: {patches}")
    console.print(f"  toolchain: {rt.manifest.get('toolchain')}")
    if rt.manifest.get("target") != target:  # android-arm64 without an NDK: one static aarch64 build serves both
        console.print(f"  the {rt.manifest.get('target')} build serves {target} too (static aarch64; no NDK given)")
    if rt.manifest.get("cuda"):
        cuda = rt.manifest["cuda"]
        console.print(f"  CUDA: {cuda.get('release')}; architectures {cuda.get('architectures')}", highlight=False)
    return {**rt.manifest, "root": str(rt.root), "cached": rt.cached}


@app.command("path")
def path_cmd(
    target: str = typer.Option("host", "--target", help=TARGET_HELP),
    llama_cpp: Path | None = typer.Option(None, "--llama-cpp", help="The checkout the runtime was built from."),
    cpu_variant: str | None = typer.Option(None, "--cpu-variant", help=VARIANT_HELP),
) -> None:
    """Print the install dir of a built runtime (bin/, lib/, manifest.json); exit 2 if it is not built."""
    _check_variant(target, cpu_variant)
    print(rtmod.find(target, llama_cpp, cpu_variant).root)


def _check_variant(target: str, cpu_variant: str | None) -> None:
    from mvlm_core import cpu_variants

    if cpu_variant:
        cpu_variants.get(target, cpu_variant)


@app.command("info")
def info_cmd(
    target: str = typer.Option("host", "--target", help=TARGET_HELP),
    llama_cpp: Path | None = typer.Option(None, "--llama-cpp", help="The checkout the runtime was built from."),
    cpu_variant: str | None = typer.Option(None, "--cpu-variant", help=VARIANT_HELP),
) -> None:
    """Print a built runtime's manifest (source, commit, patches, CMake arguments) as JSON."""
    _check_variant(target, cpu_variant)
    rt = rtmod.find(target, llama_cpp, cpu_variant)
    print(json.dumps({**rt.manifest, "root": str(rt.root)}, indent=2))


# What llama-cpp-python 0.3.36 reads when its modules are first imported: llama_cpp/llama_cpp.py loads libllama from
# $LLAMA_CPP_LIB_PATH, llama_cpp/mtmd_cpp.py loads libmtmd from $MTMD_CPP_LIB (else both from the package's own lib/).
# Their dependencies (libggml*) are found through the runtime's RUNPATH ($ORIGIN/../lib), so nothing else is needed.
BINDINGS_ENV = {"LLAMA_CPP_LIB_PATH": "libllama.so", "MTMD_CPP_LIB": "libmtmd.so"}


@app.command("env")
def env_cmd(
    target: str = typer.Option("host", "--target", help="host or cuda (the targets with shared libraries)."),
    llama_cpp: Path | None = typer.Option(None, "--llama-cpp", help="The checkout the runtime was built from."),
) -> None:
    """Print `export` lines that point llama-cpp-python 0.3.36 at the runtime's patched libraries.

    Use it as  eval "$(mvlm runtime env)"  before starting Python: then `import llama_cpp` and `import
    llama_cpp.mtmd_cpp` load this build (the same llama.cpp source as the bindings, plus the project's patches).
    Exit 2 with one line if the runtime is not built.
    """
    rt = rtmod.find(target, llama_cpp)  # not built: one line naming the build command, exit 2
    missing = [name for name in BINDINGS_ENV.values() if not (rt.lib / name).is_file()]
    if missing:
        raise MvlmError(f"runtime {rt.root} has no {', '.join(missing)} (target {target}): the Python bindings need "
                        "the shared libraries of the host or cuda target (`mvlm runtime build --target host`)")
    for var in BINDINGS_ENV:
        print(f"export {var}={shlex.quote(str(rt.lib))}")
