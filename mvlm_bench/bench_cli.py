"""``mvlm bench`` (run a protocol on a device), ``mvlm bench parse`` and ``mvlm devices``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mvlm_bench.parse_cli import parse_cmd

app = typer.Typer(invoke_without_command=True)
console = _console = Console()
err = Console(stderr=True)

app.command("parse", help="Parse saved llama.cpp output (any era since 2023) into timing records.")(parse_cmd)


def _check_reports(outputs: dict[str, str | Path], inputs: list[Path | None]) -> None:
    """Refuse, before anything is measured, report paths that would destroy an input (the model, ...), an existing
    GGUF, or each other, paths that are not regular files (a device, a FIFO, ``dir/``), and paths whose directory cannot
    be written. ``outputs`` holds the options' text (a trailing slash is seen there)."""
    import os

    from mvlm_core.atomic import check_output_path
    from mvlm_core.errors import MvlmError

    seen: dict[Path, str] = {}
    for option, raw in outputs.items():
        out = check_output_path(raw, inputs, option=option)
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
    from mvlm_core.atomic import AtomicOutputs, is_disk_full
    from mvlm_core.errors import MvlmError

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

    from mvlm_core.atomic import write_text
    from mvlm_core.errors import MvlmError
    from mvlm_core.runtime import cache_root

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
                                      "llama-bench: pp/tg sweep; imp: Imp Table 4 (a 41-token request + the image, "
                                      "64 tokens, loading excluded); dataset: a whole --data set through one "
                                      "llama-server (Xmodel-VLM Table 6)."),
    model: list[Path] | None = typer.Option(None, "--model", "-m", help="The language-model GGUF; repeat it to sweep "
                                                                        "over models (docs/devices.md, 'Sweeps')."),
    mmproj: Path | None = typer.Option(None, "--mmproj", help="The mmproj GGUF (vlm, imp and dataset protocols)."),
    image: Path | None = typer.Option(None, "--image", help="Image for the vlm and imp protocols (default: a built-in "
                                                            "336x336)."),
    data: Path | None = typer.Option(None, "--data", help="The dataset protocol's question file: JSONL, one "
                                                          "{question_id, image, text} per line (LLaVA's eval format), "
                                                          "image paths relative to the file."),
    repeat: int = typer.Option(3, "--repeat", "-r", help="Measured repetitions (after the warm-up)."),
    warmup: int = typer.Option(1, "--warmup", help="Unmeasured warm-up runs."),
    n_predict: int | None = typer.Option(None, "--n-predict", "-n", help="Output tokens (default 400 lm, 256 vlm, 64 "
                                                                        "imp; dataset: at most, default 128)."),
    threads: str | None = typer.Option(None, "--threads", "-t", help="CPU threads (default: the profile's); a comma "
                                                                     "list (1,2,4) sweeps."),
    n_gpu_layers: str | None = typer.Option(None, "--n-gpu-layers", "-ngl", help="Layers on the GPU (default: the "
                                                                                  "profile's); a comma list sweeps."),
    ctx_size: str | None = typer.Option(None, "--ctx-size", "-c", help="Context size in tokens (default 2048); a comma "
                                                                       "list sweeps."),
    delay: float = typer.Option(0.0, "--delay", help="Seconds to sleep before every run but the first (warm-up runs, "
                                                     "repetitions and configurations alike), to let the device settle."),
    max_temp: float | None = typer.Option(None, "--max-temp", help="Before every run, wait until the device's hottest "
                                          "thermal zone reads below this many degrees Celsius (a device without "
                                          "one is said once and not waited for)."),
    max_temp_wait: float = typer.Option(1800.0, "--max-temp-wait", help="The longest --max-temp waits before one run, "
                                        "seconds; then exit 3 (completed configurations are reported)."),
    timeout: float = typer.Option(900.0, "--timeout", help="Per-run time limit, seconds."),
    prompt: str | None = typer.Option(None, "--prompt", help="Override the protocol's prompt."),
    # report and history paths are taken as text: a trailing slash ("--json-file dir/") is refused, not dropped
    json_flag: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout (every llama-bench field, "
                                                         "then mvlm's own; nothing else on stdout)."),
    json_arg: str | None = typer.Option(None, "--json-file", help="Write the report as JSON (every llama-bench field, "
                                                                  "then mvlm's own) to this file."),
    markdown_arg: str | None = typer.Option(None, "--markdown", help="Write the report as Markdown (papers' layout)."),
    csv_arg: str | None = typer.Option(None, "--csv", help="Write one CSV row per repetition."),
    save: bool = typer.Option(False, "--save/--no-save", help="Store every repetition in the benchmark history."),
    db_arg: str | None = typer.Option(None, "--db", help="History: a SQLite file or a PostgreSQL URL (default "
                                                         "$MVLM_HISTORY or ./mvlm-history.sqlite; docs/lab.md)."),
    label: str = typer.Option("", "--label", help="Free-form label stored with the measurement (e.g. main, pr-42)."),
    baseline: str | None = typer.Option(None, "--baseline", help="Compare with this history selector (latest, "
                                        "label:main, id:N, ...) or `mvlm bench --json-file` file."),
    fail_on_regression: str | None = typer.Option(
        None, "--fail-on-regression", help="With --baseline: exit 4 when a gated metric is slower by more than this "
                                           "(e.g. 5%) and the repetitions support it (docs/ci.md)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="On a failed run, also print the tail of its output "
                                                                "(the whole output is always saved to a log file)."),
    against: list[str] | None = typer.Option(
        None, "--against", help="Interleaved A/B session: the baseline side differs from the command line by KEY=VALUE "
                                "(repeatable): model=FILE, mmproj=FILE, runtime=DIR (`mvlm runtime path`), llama-cpp=DIR "
                                "(a checkout built with `mvlm runtime build --llama-cpp DIR`), threads=N, "
                                "n-gpu-layers=N, ctx-size=N. --repeat is then the number of A/B pairs; "
                                "--fail-on-regression gates on the paired runs (docs/ci.md)."),
    order: str = typer.Option("abba", "--order", help="A/B run order: abba (A B B A ..., cancels drift and order "
                                                      "effects) or alternate (A B A B ...)."),
    lease_timeout: float = typer.Option(3600.0, "--lease-timeout", help="Seconds to wait while another bench measures "
                                        "on the same device (0: do not wait); then exit 75 with nothing measured. "
                                        "The lease is a PostgreSQL advisory lock when the history (--db, "
                                        "$MVLM_HISTORY) is PostgreSQL, else a lock file (docs/devices.md)."),
) -> None:
    """Run the papers' latency protocols on a device and report Sample / Eval_prompt / Eval / Total (+ VE, Eval_avg).

    Pushes the runtime for the device's target and the model files (content-addressed: unchanged files are not pushed
    again), runs one warm-up and --repeat measured runs with -lv 4, parses llama.cpp's timing output and prints the
    report. Examples:

      mvlm bench --device local --model MobileVLM_V2-1.7B-Q4_K_S.gguf

      mvlm bench --device sd888 --protocol vlm --model M-Q4_K_S.gguf --mmproj mmproj-M-F16.gguf --json-file r.json

      mvlm bench --device orin --model new.gguf --against model=old.gguf --repeat 6 --fail-on-regression 5%

      mvlm bench --device sd888 -m A.gguf -m B.gguf --threads 2,4 --delay 10 --max-temp 45   (a sweep: 4 configurations)
    """
    if ctx.invoked_subcommand is not None:
        return
    from mvlm_bench import bench, report, sweep
    from mvlm_bench.devices import load_profile
    from mvlm_bench.store import cli_location
    from mvlm_core.errors import MvlmError

    models = list(model or [])
    model = models[0] if models else None
    if model is None:
        raise MvlmError("no model given: pass --model FILE.gguf (see `mvlm bench --help`)")
    raw_outputs = {opt: p for opt, p in (("--json-file", json_arg), ("--markdown", markdown_arg), ("--csv", csv_arg))
                   if p}
    json_out, markdown_out, csv_out = (Path(p) if p else None for p in (json_arg, markdown_arg, csv_arg))
    db = cli_location(db_arg)
    spec = bench.BenchSpec(protocol=protocol, model=model, mmproj=mmproj, image=image, repeat=repeat, warmup=warmup,
                           n_predict=n_predict, timeout=timeout, prompt=prompt, data=data)
    # Everything that can be refused is refused here, before a device is touched or a run measured: every
    # configuration of a sweep (mvlm_bench.sweep) is built and checked (numbers, then files) now.
    specs = sweep.configurations(spec, models, threads, n_gpu_layers, ctx_size)
    spec = specs[0]
    sweep.check_pacing(delay, max_temp, max_temp_wait)
    if len(specs) > 1 and (against or baseline or fail_on_regression):
        which = "--against" if against else "--baseline" if baseline else "--fail-on-regression"
        raise MvlmError(f"{which} compares one configuration, and this is a sweep of {len(specs)}: give one --model and "
                        "one value of --threads, --n-gpu-layers and --ctx-size, or drop " + which)
    from mvlm_bench.lease import check_timeout

    check_timeout(lease_timeout)
    if fail_on_regression:
        from mvlm_bench.compare import parse_threshold

        parse_threshold(fail_on_regression)
        if not baseline and not against:
            raise MvlmError("--fail-on-regression needs --baseline SELECTOR (e.g. label:main or latest) or an "
                            "interleaved baseline (--against model=OLD.gguf, runtime=DIR, ...)")
    if against and baseline:
        raise MvlmError("--against (an interleaved A/B session) and --baseline (a stored measurement) exclude each "
                        "other: give one")
    sides = _parse_against(against, spec, order) if against else None
    if sides is not None and fail_on_regression:
        from mvlm_bench.gate import signed_rank_min_p

        if signed_rank_min_p(repeat) > 0.05:
            raise MvlmError(f"--fail-on-regression with {repeat} A/B pairs can never fire (the smallest p of {repeat} "
                            f"pairs is {signed_rank_min_p(repeat):.3g} > 0.05): use --repeat 5 or more")
    profile = load_profile(device)
    outputs = {opt: Path(p) for opt, p in raw_outputs.items()}
    inputs: list[Path | None] = [*models, mmproj, image, data, profile.source]
    if sides is not None:
        inputs += [sides[0].spec.model, sides[0].spec.mmproj]
    if baseline and (baseline.endswith(".json") or Path(baseline).is_file()):  # a file, read after the reports
        inputs.append(Path(baseline))
    if save or baseline:
        from mvlm_bench.history import default_db_path
        from mvlm_core.atomic import check_output_path

        history_db = db or default_db_path()
        check_output_path(db_arg or history_db, [*models, mmproj, image], option="--db")
        inputs.append(history_db)
    _check_reports(raw_outputs, inputs)
    if baseline and not (baseline.endswith(".json") or Path(baseline).is_file()):
        from mvlm_bench.history_cli import resolve

        resolve(baseline, db)  # a selector that names nothing stored is refused now, not after the measurement
    log_prog: list = []

    def log(m: str) -> None:
        (log_prog[0].console if log_prog else err).print(f"[dim]{m}[/]", highlight=False)

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), _AmountColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal) as prog:
        log_prog.append(prog)
        push_task = prog.add_task(f"push to {profile.name}", total=None, visible=False, unit="bytes")
        run_task = prog.add_task(f"{protocol} on {profile.name}", total=None, visible=False,
                                 unit="samples" if protocol == "dataset" else "runs")
        status = _RunStatus(prog, run_task, push_task, protocol, profile.name, specs, ab=sides is not None)

        def sync_progress(done: int, total: int) -> None:
            prog.update(push_task, completed=done, total=total, visible=True)

        on_run = status.on_run
        on_tokens = status.on_tokens if err.is_terminal else None  # the live count is for a live progress line only

        waiting: list[str] = []

        def on_wait(message: str) -> None:  # the lease is held by another bench: say whom we wait for
            if not waiting:  # once as a line (logs, CI), then on the live status line
                log(message)
            waiting.append(message)
            prog.update(push_task, visible=False)
            prog.update(run_task, visible=True, description=message)

        leasing = {"lease_db": db_arg, "lease_timeout": lease_timeout, "on_wait": on_wait}
        pacer = sweep.Pacer(delay, max_temp, max_temp_wait, on_status=status.on_status, log=log) \
            if delay or max_temp is not None else None
        if sides is not None:
            res = bench.run_ab(profile, sides[0], sides[1], order=order, log=log, on_run=on_run,
                               sync_progress=sync_progress, outputs=outputs, before_run=pacer,
                               on_tokens=on_tokens, **leasing)
        elif protocol == "dataset":  # one llama-server for the whole set
            from mvlm_bench.dataset_run import run_dataset

            res = run_dataset(profile, spec, log=log, on_run=on_run, sync_progress=sync_progress, outputs=outputs,
                              **leasing)
        elif len(specs) > 1:  # a sweep: one run_bench per configuration, one report
            res = sweep.run_sweep(profile, specs, pacer, log=log, on_config=status.on_config, on_run=on_run,
                                  on_tokens=on_tokens, sync_progress=sync_progress, outputs=outputs, **leasing)
        else:
            res = bench.run_bench(profile, spec, log=log, on_run=on_run, sync_progress=sync_progress, outputs=outputs,
                                  before_run=pacer, on_tokens=on_tokens, **leasing)
    log_prog.clear()
    if profile.emulated:
        err.print("[yellow]note:[/] this device is emulated: its timings measure the emulator, not a device")
    texts: dict[Path, str] = {}
    json_text: str | None = None
    console = _console if not json_flag else err  # --json: stdout holds the JSON and nothing else
    if json_flag:
        from mvlm_bench import history_cli

        history_cli.console.file = sys.stderr  # comparison tables (--baseline) too
    if getattr(res, "llama_bench_rows", None):
        t = Table(title=f"llama-bench on {profile.name}")
        for col in ("model_filename", "n_prompt", "n_gen", "avg_ts", "stddev_ts"):
            t.add_column(col)
        for row in res.llama_bench_rows:
            t.add_row(*(str(row.get(c, "")) for c in ("model_filename", "n_prompt", "n_gen", "avg_ts", "stddev_ts")))
        console.print(t)
        json_text = json.dumps(res.llama_bench_rows, indent=2) + "\n"
    elif res.runs and sides is not None:
        # one table (and one Markdown section) per side; the records keep the real model name, the side is in
        # params["ab_side"] (JSON, CSV, history)
        titled = [(f"baseline (--against {' '.join(against or [])})", res.baseline.runs),
                  ("candidate (the command line)", res.candidate.runs)]
        for title, runs in titled:
            if runs:
                console.print(report.render_table(runs, title=f"{title}: latency (medians over repetitions)"))
        json_text = report.render_json(res.runs)
        if markdown_out:
            texts[markdown_out] = "\n".join(f"## {title}\n\n{report.render_markdown(runs)}" for title, runs in titled)
        if csv_out:
            texts[csv_out] = report.render_csv(res.runs)
    elif res.runs:
        console.print(report.render_table(res.runs))
        json_text = report.render_json(res.runs)
        if markdown_out:
            texts[markdown_out] = report.render_markdown(res.runs)
        if csv_out:
            texts[csv_out] = report.render_csv(res.runs)
    if json_out and json_text is not None:
        texts[json_out] = json_text
    if json_flag and json_text is not None:
        sys.stdout.write(json_text)
        sys.stdout.flush()
    # A report that cannot be written (disk full, ...) must not cost the measurement: the history save (or its spill
    # file) still happens, and the error names both afterwards.
    report_error: MvlmError | None = None
    if texts:
        try:
            _write_reports(texts)
        except MvlmError as e:
            report_error = e
    failures = res.failures if sides is not None else [("", f) for f in res.failures]
    saved_note = ""
    if failures and save and getattr(res, "results", None):
        # a sweep cut short by a failed run: --save still stores the configurations that completed
        from mvlm_bench.history_cli import bench_history
        from mvlm_bench.sweep import SweepResult

        done = [r for r in res.results if not r.failures]
        if done:
            bench_history(SweepResult([run for r in done for run in r.runs], [], res.configs[:len(done)], done),
                          save=True, db=db, label=label, baseline=None, fail_on_regression=None)
            saved_note = f"; the {len(done)} configuration(s) completed before it were saved to the history"
    if failures:
        who, f = failures[0]
        if texts and report_error is None:
            err.print(f"[dim]{len(res.runs)} completed repetition(s) kept in {', '.join(map(str, texts))}[/]",
                      highlight=False)
        which = "the warm-up run" if f.repetition < 0 else f"run {f.repetition + 1}"
        if protocol == "llama-bench":
            which = "the llama-bench run"
        if protocol == "dataset":
            which = "the warm-up request" if f.repetition < 0 else f"pass {f.repetition + 1} over the set"
        if who:
            which = f"the {who}'s {which.removeprefix('the ')}"
        logfile = _failure_log(profile.name, f.output or f.output_tail)
        where = f"full log: {logfile}" if logfile else "run with --verbose for its output"
        tail = f.output_tail[-3000:].strip() or "(no output)"
        why = bench.relevant_line(f.output or f.output_tail)
        also = saved_note + (f"; and {report_error}" if report_error is not None else "")
        raise MvlmError(f"{protocol} protocol on {profile.name}: {which} failed: {f.message}: {why} ({where}){also}",
                        exit_code=3, detail=tail if verbose else None)
    try:
        if sides is not None:
            _finish_ab(res, save=save, db=db, label=label, fail_on_regression=fail_on_regression)
        elif save or baseline or fail_on_regression:
            from mvlm_bench.history_cli import bench_history

            bench_history(res, save=save, db=db, label=label, baseline=baseline, fail_on_regression=fail_on_regression,
                          confirm=_confirmer(profile, spec, log, lease_db=db_arg, lease_timeout=lease_timeout))
    except MvlmError as e:
        if report_error is None:
            raise
        # a regression verdict (exit 4) is what CI acts on; otherwise the report's own code (28: disk full)
        code = e.exit_code if e.exit_code == EXIT_REGRESSION else report_error.exit_code
        raise MvlmError(f"{report_error}; and {e}", exit_code=code) from None
    if report_error is not None:
        if save:
            raise MvlmError(f"{report_error}; the measurement itself was saved to the history {history_db}",
                            exit_code=report_error.exit_code) from None
        raise report_error
    if getattr(res, "stopped", ""):  # a sweep cut short (the device did not cool): the completed ones are reported
        raise MvlmError(res.stopped, exit_code=3)


EXIT_REGRESSION = 4


class _AmountColumn(DownloadColumn):
    """The progress bar's amount in each task's own unit: bytes for the push, ``2/4 runs`` for the runs."""

    def render(self, task):
        from rich.text import Text

        unit = task.fields.get("unit", "bytes")
        if unit == "bytes":
            return super().render(task)
        if task.total is None:
            return Text("")
        return Text(f"{int(task.completed)}/{int(task.total)} {unit}", style="progress.download")


class _RunStatus:
    """The bench's live progress line: what runs (``warm-up 1/1``, ``run 2/3``; in a sweep also ``config 2/4`` and
    what it is), the tokens generated so far in this run, an ETA from the runs completed, and what a wait is for
    (cooling, --delay). The bar counts all runs of the command (warm-ups included); the ETA is the mean duration of
    the completed runs (waits included) times the runs left."""

    def __init__(self, prog, task, push_task, protocol: str, device: str, specs, ab: bool = False):
        from mvlm_bench import sweep

        self.prog, self.task, self.push_task = prog, task, push_task
        self.head = f"{protocol} on {device}"
        self.specs, self.ab, self.dataset = list(specs), ab, protocol == "dataset"
        self.varying = sweep.varying(self.specs)
        self.config = 0
        self.offset = 0  # runs of the configurations before this one
        self.sweep_total = sum(s.warmup + s.repeat for s in self.specs)
        self.head_config = ""
        self.run = ""
        self.tokens = ""
        self.note = ""
        self.starts: list[float] = []

    def on_config(self, k: int, n: int, spec) -> None:
        from mvlm_bench import sweep

        self.config = k
        self.offset = sum(s.warmup + s.repeat for s in self.specs[:k])
        self.head_config = f"config {k + 1}/{n} ({sweep.describe(spec, self.varying)})"

    def _eta(self, now: float, left: int) -> str:
        if len(self.starts) < 2 or left <= 0:
            return ""
        per = (now - self.starts[0]) / (len(self.starts) - 1)
        s = int(per * left + 0.5)
        return f"ETA {s // 60}:{s % 60:02d}"

    def on_run(self, i: int, total: int, who: str = "") -> None:
        import time

        from mvlm_bench.bench import run_label

        now = time.monotonic()
        self.starts.append(now)
        spec = self.specs[self.config]
        if self.dataset:
            self.run = f"sample {i + 1}/{total}"
        elif self.ab:  # run_ab: both sides' warm-ups first, then the pairs
            side = {"A": " baseline", "B": " candidate"}.get(who, "")
            self.run = run_label(i, 2 * spec.warmup, 2 * spec.repeat) + side
        else:
            self.run = run_label(i, spec.warmup, spec.repeat)
        done, grand = (self.offset + i, self.sweep_total) if len(self.specs) > 1 else (i, total)
        self.tokens, self.note = "", self._eta(now, grand - done)
        self.prog.update(self.push_task, visible=False)
        self.prog.update(self.task, completed=done, total=grand, visible=True, description=self._text())

    def on_tokens(self, n: int, of: int) -> None:
        self.tokens = f"{n}/{of} tokens"
        self.prog.update(self.task, description=self._text())

    def on_status(self, text: str) -> None:  # a wait before the next run (cooling, --delay)
        self.prog.update(self.push_task, visible=False)
        self.prog.update(self.task, visible=True, description=f"{self.head}: {text}")

    def _text(self) -> str:
        parts = [self.head + (f" {self.head_config}" if len(self.specs) > 1 else "") + f": {self.run}"]
        parts += [p for p in (self.tokens, self.note) if p]
        return " · ".join(parts)
AGAINST_KEYS = ("model", "mmproj", "runtime", "llama-cpp", "threads", "n-gpu-layers", "ctx-size")


def _parse_against(items: list[str], spec, order: str):
    """``--against KEY=VALUE ...`` -> (baseline Side, candidate Side): the baseline is the command line changed by
    the given keys. One line naming the bad item otherwise."""
    import dataclasses

    from mvlm_bench import bench, gate
    from mvlm_core import runtime as rtmod
    from mvlm_core.errors import MvlmError

    if order not in gate.ORDERS:
        raise MvlmError(f"--order {order!r}: choose one of {', '.join(gate.ORDERS)}")
    changes: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lower().replace("_", "-")
        if not sep or not value.strip():
            raise MvlmError(f"--against {item!r}: write KEY=VALUE, with KEY one of {', '.join(AGAINST_KEYS)}")
        if key not in AGAINST_KEYS:
            raise MvlmError(f"--against {item!r}: unknown key {key!r}; choose from {', '.join(AGAINST_KEYS)}")
        if key in changes:
            raise MvlmError(f"--against {key}= is given twice")
        changes[key] = value.strip()
    if "runtime" in changes and "llama-cpp" in changes:
        raise MvlmError("--against runtime= and llama-cpp= both name the baseline's build: give one")
    if "llama-cpp" in changes:  # before anything else: one line when the directory is no llama.cpp checkout
        raw = changes["llama-cpp"]
        d = Path(raw).expanduser()
        if not d.is_dir():
            raise MvlmError(f"--against llama-cpp={raw}: {d} is not a directory: give a llama.cpp checkout built with "
                            "`mvlm runtime build --target TARGET --llama-cpp DIR`")
        if not (d / "CMakeLists.txt").is_file() or not (d / "ggml").is_dir():
            raise MvlmError(f"--against llama-cpp={raw}: {d} is not a llama.cpp checkout (it needs CMakeLists.txt and "
                            "ggml/): give the directory of a llama.cpp source tree built with "
                            "`mvlm runtime build --target TARGET --llama-cpp DIR`")
    base_spec = spec
    ints = {"threads": "threads", "n-gpu-layers": "n_gpu_layers", "ctx-size": "ctx_size"}
    for key, field_name in ints.items():
        if key in changes:
            try:
                v = int(changes[key])
            except ValueError:
                raise MvlmError(f"--against {key}={changes[key]!r}: not a whole number") from None
            base_spec = dataclasses.replace(base_spec, **{field_name: v})
    for key in ("model", "mmproj"):
        if key in changes:
            base_spec = dataclasses.replace(base_spec, **{key: Path(changes[key]).expanduser()})
    runtime = None
    if "runtime" in changes:
        try:
            runtime = rtmod.runtime_from_dir(Path(changes["runtime"]))
        except MvlmError as e:
            raise MvlmError(f"--against runtime={changes['runtime']}: {e}") from None
    llama_cpp = Path(changes["llama-cpp"]).expanduser() if "llama-cpp" in changes else None
    bench.validate_spec(base_spec, against=set(changes))  # errors name `--against threads=0`, as the user wrote it
    bench.check_inputs(base_spec, against=set(changes))
    if base_spec == spec and runtime is None and llama_cpp is None:
        err.print("[yellow]note:[/] both sides of the A/B session are the same: an A/A session measures the noise")
    return (bench.Side(base_spec, runtime=runtime, llama_cpp=llama_cpp), bench.Side(spec))


def _finish_ab(ab, *, save: bool, db: Path | None, label: str, fail_on_regression: str | None) -> None:
    """After an interleaved session: the paired comparison, the gate, and (with --save) both sides in the history."""
    from mvlm_bench import compare
    from mvlm_bench.history import entries_from_runs, save_or_spill
    from mvlm_bench.history_cli import run_interleaved_report
    from mvlm_core.errors import MvlmError

    threshold = compare.parse_threshold(fail_on_regression) if fail_on_regression else None
    saved_error: MvlmError | None = None
    if save:
        outcome = save_or_spill(entries_from_runs(ab.runs, label=label), db)
        if outcome.saved:
            err.print(outcome.message())
        else:
            if outcome.spilled is None:
                print(outcome.unsaved_json, flush=True)
            saved_error = MvlmError(outcome.message(), exit_code=outcome.exit_code)
    try:
        run_interleaved_report(ab, None, 0.05, threshold)
    except MvlmError as e:
        if saved_error is not None:
            raise MvlmError(f"{e}; and {saved_error}", exit_code=e.exit_code) from None
        raise
    if saved_error is not None:
        raise saved_error


def _confirmer(profile, spec, log, lease_db: str | None = None, lease_timeout: float | None = None):
    """For history mode: ``factory(base_entry, cand_entry)`` -> a callable that re-measures the stored baseline and
    the candidate interleaved on this device, or None when the baseline cannot be re-run here (its build is not in
    the cache, or its model file is not at hand with the same sha256). The re-measure holds the device's lease the
    way the measurement did: through ``lease_db`` (the bench's --db; else $MVLM_HISTORY), so a lab's other runners
    wait for it too."""
    import dataclasses

    from mvlm_bench import bench, gate
    from mvlm_bench.history import entries_from_runs
    from mvlm_bench.sync import sha256_file
    from mvlm_core import runtime as rtmod

    def local_copy(current: Path | None, name: str, sha: str) -> Path | None:
        if not sha:
            return None
        for cand in ([current] if current else []) + ([current.parent / name] if current and name else []):
            if cand is not None and cand.is_file() and sha256_file(cand) == sha:
                return cand
        return None

    def factory(base, cand):
        c = base.context
        target = str(c.params.get("target") or profile.target)
        rt = rtmod.find_build(target, c.runtime_commit, list(c.runtime_patches))
        model = local_copy(spec.model, c.model_file, c.model_sha256)
        mmproj = local_copy(spec.mmproj, c.mmproj_file, c.mmproj_sha256) if c.mmproj_sha256 else None
        missing = [what for what, ok in (("its llama.cpp build", rt), ("its model file", model)) if ok is None]
        if c.mmproj_sha256 and mmproj is None:
            missing.append("its mmproj file")
        if missing:
            log(f"the baseline ({base.describe()}) cannot be re-run here ({' and '.join(missing)} not found): "
                "the gate judges by the history alone")
            return None

        def run():
            pairs = max(spec.repeat, gate.CONFIRM_PAIRS)
            log(f"re-measuring the baseline ({base.describe()}) and this build interleaved, "
                f"{pairs} A/B pairs, to confirm")
            bspec = dataclasses.replace(spec, model=model, mmproj=mmproj if c.mmproj_sha256 else spec.mmproj,
                                        repeat=pairs)
            said: list[str] = []

            def on_wait(message: str) -> None:  # once: the lease is polled every second
                if not said:
                    log(message)
                said.append(message)

            leasing = {"lease_db": lease_db, "on_wait": on_wait}
            if lease_timeout is not None:
                leasing["lease_timeout"] = lease_timeout
            ab = bench.run_ab(profile, bench.Side(bspec, runtime=rt), bench.Side(dataclasses.replace(spec, repeat=pairs)),
                              log=log, **leasing)
            if ab.failures:
                who, f = ab.failures[0]
                log(f"the confirming A/B run failed ({who}: {f.message}); judging by the history alone")
                return []
            b, k = entries_from_runs(ab.baseline.runs), entries_from_runs(ab.candidate.runs)
            return gate.compare_interleaved(b[0].samples, k[0].samples) if b and k else []

        return run

    return factory


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
    from mvlm_core.errors import MvlmError

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
