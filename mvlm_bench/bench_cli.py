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


def _check_reports(outputs: dict[str, Path], inputs: list[Path | None]) -> None:
    """Refuse, before anything is measured, report paths that would destroy an input (the model, ...), an existing
    GGUF, or each other, and paths whose directory cannot be written."""
    import os

    from mvlm_convert.atomic import check_output_path
    from mvlm_convert.errors import MvlmError

    seen: dict[Path, str] = {}
    for option, out in outputs.items():
        check_output_path(out, inputs, option=option)
        key = out.resolve()
        if key in seen:
            raise MvlmError(f"{option} {out} is also given to {seen[key]}: give each report its own file")
        seen[key] = option
        parent = key.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise MvlmError(f"{option} {out}: cannot create it ({parent} is not a writable directory); choose another path")


def _write_reports(texts: dict[Path, str]) -> None:
    """Every report of this command is written to a temporary name, then all are renamed together: a failure on the
    last one leaves the earlier ones (and any old reports at those paths) untouched, and no temporaries."""
    from mvlm_convert.atomic import AtomicOutputs, is_disk_full
    from mvlm_convert.errors import MvlmError

    with AtomicOutputs() as out:
        for final, text in texts.items():
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
                out.path(final).write_text(text)
            except OSError as e:
                names = ", ".join(str(p) for p in texts)
                if is_disk_full(e):
                    raise MvlmError(f"disk full while writing {final}: free space and run again (no report was written: "
                                    f"{names})", exit_code=28) from None
                raise MvlmError(f"cannot write {final}: {e.strerror or e} (no report was written: {names})") from None
        out.commit()


def _failure_log(device: str, output: str) -> Path | None:
    """The whole output of a failed run, kept in the cache (the error names the file); None if it cannot be written."""
    import os
    import re
    import time

    from mvlm_bench.runtime import cache_root
    from mvlm_convert.atomic import write_text
    from mvlm_convert.errors import MvlmError

    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", device).strip("_")[:60] or "device"
    path = cache_root() / "logs" / f"bench-{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_text(path, output)
    except (OSError, MvlmError):
        return None


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
    verbose: bool = typer.Option(False, "--verbose", "-v", help="On a failed run, also print the tail of its output "
                                                                "(the whole output is always saved to a log file)."),
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
    spec = bench.BenchSpec(protocol=protocol, model=model, mmproj=mmproj, image=image, repeat=repeat, warmup=warmup,
                           n_predict=n_predict, threads=threads, n_gpu_layers=n_gpu_layers, timeout=timeout, prompt=prompt)
    # Everything that can be refused is refused here, before a device is touched or a run measured.
    bench.validate_spec(spec)
    bench.check_inputs(spec)
    if fail_on_regression:
        from mvlm_bench.compare import parse_threshold

        parse_threshold(fail_on_regression)
        if not baseline:
            raise MvlmError("--fail-on-regression needs --baseline SELECTOR (e.g. label:main or latest)")
    profile = load_profile(device)
    outputs = {opt: p for opt, p in (("--json", json_out), ("--markdown", markdown_out), ("--csv", csv_out)) if p}
    inputs: list[Path | None] = [model, mmproj, image, profile.source]
    if baseline and (baseline.endswith(".json") or Path(baseline).is_file()):  # a file, read after the reports
        inputs.append(Path(baseline))
    if save or baseline:
        from mvlm_bench.history import default_db_path
        from mvlm_convert.atomic import check_output_path

        history_db = db or default_db_path()
        check_output_path(history_db, [model, mmproj, image], option="--db")
        inputs.append(history_db)
    _check_reports(outputs, inputs)
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

        res = bench.run_bench(profile, spec, log=lambda m: prog.console.print(f"[dim]{m}[/]", highlight=False),
                              on_run=on_run, sync_progress=sync_progress, outputs=outputs)
    if profile.emulated:
        err.print("[yellow]note:[/] this device is emulated: its timings measure the emulator, not a device")
    texts: dict[Path, str] = {}
    if res.llama_bench_rows:
        t = Table(title=f"llama-bench on {profile.name}")
        for col in ("model_filename", "n_prompt", "n_gen", "avg_ts", "stddev_ts"):
            t.add_column(col)
        for row in res.llama_bench_rows:
            t.add_row(*(str(row.get(c, "")) for c in ("model_filename", "n_prompt", "n_gen", "avg_ts", "stddev_ts")))
        console.print(t)
        if json_out:
            texts[json_out] = json.dumps(res.llama_bench_rows, indent=2)
    elif res.runs:
        console.print(report.render_table(res.runs))
        if json_out:
            texts[json_out] = report.render_json(res.runs)
        if markdown_out:
            texts[markdown_out] = report.render_markdown(res.runs)
        if csv_out:
            texts[csv_out] = report.render_csv(res.runs)
    if texts:
        _write_reports(texts)
    if res.failures:
        f = res.failures[0]
        if texts:
            err.print(f"[dim]{len(res.runs)} completed repetition(s) kept in {', '.join(map(str, texts))}[/]",
                      highlight=False)
        which = "the warm-up run" if f.repetition < 0 else f"run {f.repetition + 1}"
        if protocol == "llama-bench":
            which = "the llama-bench run"
        logfile = _failure_log(profile.name, f.output or f.output_tail)
        where = f"full log: {logfile}" if logfile else "run with --verbose for its output"
        tail = f.output_tail[-3000:].strip() or "(no output)"
        why = bench.relevant_line(f.output or f.output_tail)
        raise MvlmError(f"{protocol} {which} on {profile.name} failed: {f.message}: {why} ({where})",
                        exit_code=3, detail=tail if verbose else None)
    if save or baseline or fail_on_regression:
        from mvlm_bench.history_cli import bench_history

        bench_history(res, save=save, db=db, label=label, baseline=baseline, fail_on_regression=fail_on_regression)


def devices_cmd(
    names: list[str] | None = typer.Argument(None, help="Only these profiles (default: all). A named profile that is "
                                                        "invalid (exit 2) or unreachable (exit 3) fails the command."),
    check: bool = typer.Option(True, "--check/--no-check", help="Check that each device is reachable."),
    json_: bool = typer.Option(False, "--json", help="JSON list instead of a table."),
) -> None:
    """List the device profiles (devices/*.toml, ~/.config/mvlm/devices) and whether each is reachable now.

    An invalid profile file is listed with what is wrong with it (status `invalid: ...`); the others are still listed
    and checked, and the exit status stays 0. Name profiles (`mvlm devices orin sd888`) to check just those: then an
    invalid one exits 2 and an unreachable one exits 3.
    """
    from mvlm_bench.devices import scan_profiles
    from mvlm_bench.transports import make_transport
    from mvlm_convert.errors import MvlmError

    entries = scan_profiles()
    if names:
        by_name = {e.name: e for e in entries}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise MvlmError(f"no device profile {', '.join(map(repr, missing))}; known: {', '.join(sorted(by_name)) or 'none'}")
        entries = [by_name[n] for n in names]
    rows = []
    worst: MvlmError | None = None
    for e in entries:
        p = e.profile
        if p is None:
            rows.append({"name": e.name, "transport": "", "address": "", "target": "", "threads": None,
                         "emulated": False, "status": f"invalid: {e.error}", "source": str(e.path), "error": e.error})
            if names and (worst is None or worst.exit_code != 2):
                worst = MvlmError(e.error or f"{e.path}: invalid device profile")
            continue
        status = "not checked"
        if check:
            try:
                t = make_transport(p)
                try:
                    t.check()
                    status = "reachable"
                finally:
                    t.close()
            except MvlmError as err_:
                status = f"unreachable: {err_}"
                if names and worst is None:
                    worst = MvlmError(f"device {p.name} is unreachable: {err_}", exit_code=3)
        rows.append({"name": p.name, "transport": p.transport, "address": p.address or "", "target": p.target,
                     "threads": p.threads, "emulated": p.emulated, "status": status,
                     "source": str(p.source) if p.source else ""})
    if json_:
        print(json.dumps(rows, indent=2))
    else:
        t = Table(title="Device profiles")
        for col in ("name", "transport", "address", "target", "status"):
            t.add_column(col, overflow="fold")
        for r in rows:
            style = "red" if r["status"].startswith("invalid") else None
            t.add_row(r["name"], r["transport"], r["address"], r["target"] + (" (emulated)" if r["emulated"] else ""),
                      r["status"], style=style)
        console.print(t)
        sys.stdout.flush()
    if worst is not None:
        raise worst
