"""``mvlm bench`` (run a protocol on a device), ``mvlm bench parse`` and ``mvlm devices``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mvlm_bench.parse_cli import parse_cmd

app = typer.Typer(invoke_without_command=True)
console = Console()
err = Console(stderr=True)

app.command("parse", help="Parse saved llama.cpp output (any era since 2023) into timing records.")(parse_cmd)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


@app.callback()
def bench_cmd(
    ctx: typer.Context,
    device: str = typer.Option("local", "--device", "-d",
                               help="Profile name (devices/*.toml: orin, sd888, local, qemu-arm64, ...), "
                                    "ssh://user@host[:port] or adb:SERIAL."),
    protocol: str = typer.Option("lm", "--protocol", "-P",
                                 help="lm: text generation (400 tokens); vlm: image + question (256 tokens); "
                                      "llama-bench: pp/tg sweep."),
    model: Path | None = typer.Option(None, "--model", "-m", help="The language-model GGUF."),
    mmproj: Path | None = typer.Option(None, "--mmproj", help="The mmproj GGUF (vlm protocol)."),
    image: Path | None = typer.Option(None, "--image", help="Image for the vlm protocol (default: a built-in 336x336)."),
    repeat: int = typer.Option(3, "--repeat", "-r", help="Measured repetitions (after the warm-up)."),
    warmup: int = typer.Option(1, "--warmup", help="Unmeasured warm-up runs."),
    n_predict: int | None = typer.Option(None, "--n-predict", "-n", help="Output tokens (default 400 lm, 256 vlm)."),
    threads: int | None = typer.Option(None, "--threads", "-t", help="CPU threads (default: the profile's)."),
    n_gpu_layers: int | None = typer.Option(None, "--n-gpu-layers", "-ngl", help="Layers on the GPU (default: the profile's)."),
    timeout: float = typer.Option(900.0, "--timeout", help="Per-run time limit, seconds."),
    prompt: str | None = typer.Option(None, "--prompt", help="Override the protocol's prompt."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the report as JSON (llama-bench-compatible fields)."),
    markdown_out: Path | None = typer.Option(None, "--markdown", help="Write the report as Markdown (papers' layout)."),
    csv_out: Path | None = typer.Option(None, "--csv", help="Write one CSV row per repetition."),
    save: bool = typer.Option(False, "--save/--no-save", help="Store every repetition in the benchmark history."),
    db: Path | None = typer.Option(None, "--db", help="History file (default $MVLM_HISTORY or ./mvlm-history.sqlite)."),
    label: str = typer.Option("", "--label", help="Free-form label stored with the measurement (e.g. main, pr-42)."),
    baseline: str | None = typer.Option(None, "--baseline", help="Compare with this history selector (latest, "
                                        "label:main, id:N, ...) or `mvlm bench --json` file."),
    fail_on_regression: str | None = typer.Option(
        None, "--fail-on-regression", help="With --baseline: exit 4 when a gated metric is slower by more than this "
                                           "(e.g. 5%) and the repetitions support it (docs/ci.md)."),
) -> None:
    """Run the papers' latency protocols on a device and report Sample / Eval_prompt / Eval / Total (+ VE, Eval_avg).

    Pushes the runtime for the device's target and the model files (content-addressed: unchanged files are not pushed
    again), runs one warm-up and --repeat measured runs with -lv 4, parses llama.cpp's timing output and prints the
    report. Examples:

      mvlm bench --device local --model MobileVLM_V2-1.7B-Q4_K_S.gguf

      mvlm bench --device sd888 --protocol vlm --model M-Q4_K_S.gguf --mmproj mmproj-M-F16.gguf --json r.json
    """
    if ctx.invoked_subcommand is not None:
        return
    from mvlm_bench import bench, report
    from mvlm_bench.devices import load_profile
    from mvlm_convert.errors import MvlmError

    if model is None:
        raise MvlmError("no model given: pass --model FILE.gguf (see `mvlm bench --help`)")
    profile = load_profile(device)
    spec = bench.BenchSpec(protocol=protocol, model=model, mmproj=mmproj, image=image, repeat=repeat, warmup=warmup,
                           n_predict=n_predict, threads=threads, n_gpu_layers=n_gpu_layers, timeout=timeout, prompt=prompt)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as prog:
        push_task = prog.add_task(f"push to {profile.name}", total=None, visible=False)
        run_task = prog.add_task(f"{protocol} on {profile.name}", total=None, visible=False)

        def sync_progress(done: int, total: int) -> None:
            prog.update(push_task, completed=done, total=total, visible=True)

        def on_run(i: int, total: int) -> None:
            prog.update(push_task, visible=False)
            prog.update(run_task, completed=i, total=total, visible=True,
                        description=f"{protocol} on {profile.name}: run {i + 1}/{total}")

        res = bench.run_bench(profile, spec, log=lambda m: prog.console.print(f"[dim]{m}[/]"),
                              on_run=on_run, sync_progress=sync_progress)
    if profile.emulated:
        err.print("[yellow]note:[/] this device is emulated: its timings measure the emulator, not a device")
    if res.llama_bench_rows:
        t = Table(title=f"llama-bench on {profile.name}")
        for col in ("model_filename", "n_prompt", "n_gen", "avg_ts", "stddev_ts"):
            t.add_column(col)
        for row in res.llama_bench_rows:
            t.add_row(*(str(row.get(c, "")) for c in ("model_filename", "n_prompt", "n_gen", "avg_ts", "stddev_ts")))
        console.print(t)
        if json_out:
            _write(json_out, json.dumps(res.llama_bench_rows, indent=2))
    elif res.runs:
        console.print(report.render_table(res.runs))
        if json_out:
            _write(json_out, report.render_json(res.runs))
        if markdown_out:
            _write(markdown_out, report.render_markdown(res.runs))
        if csv_out:
            _write(csv_out, report.render_csv(res.runs))
    if res.failures:
        f = res.failures[0]
        if json_out and res.runs:
            err.print(f"[dim]{len(res.runs)} completed repetition(s) kept in {json_out}[/]")
        from rich.text import Text

        tail = f.output_tail[-1500:].strip() or "(no output: llama.cpp can exit before its async logger flushes)"
        err.print(Text(tail, style="dim"))
        which = "the warm-up run" if f.repetition < 0 else f"run {f.repetition + 1}"
        raise MvlmError(f"{protocol} {which} on {profile.name} failed: {f.message} (output tail above)", exit_code=3)
    if save or baseline or fail_on_regression:
        from mvlm_bench.history_cli import bench_history

        bench_history(res, save=save, db=db, label=label, baseline=baseline, fail_on_regression=fail_on_regression)


def devices_cmd(
    check: bool = typer.Option(True, "--check/--no-check", help="Check that each device is reachable."),
    json_: bool = typer.Option(False, "--json", help="JSON list instead of a table."),
) -> None:
    """List the device profiles (devices/*.toml, ~/.config/mvlm/devices) and whether each is reachable now."""
    from mvlm_bench.devices import list_profiles
    from mvlm_bench.transports import make_transport
    from mvlm_convert.errors import MvlmError

    rows = []
    for p in list_profiles():
        status = "not checked"
        if check:
            try:
                t = make_transport(p)
                try:
                    t.check()
                    status = "reachable"
                finally:
                    t.close()
            except MvlmError as e:
                status = f"unreachable: {e}"
        rows.append({"name": p.name, "transport": p.transport, "address": p.address or "", "target": p.target,
                     "threads": p.threads, "emulated": p.emulated, "status": status,
                     "source": str(p.source) if p.source else ""})
    if json_:
        print(json.dumps(rows, indent=2))
        return
    t = Table(title="Device profiles")
    for col in ("name", "transport", "address", "target", "status"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(r["name"], r["transport"], r["address"], r["target"] + (" (emulated)" if r["emulated"] else ""),
                  r["status"])
    console.print(t)
    sys.stdout.flush()
